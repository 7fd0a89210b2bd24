// GET_INFLIGHT_FD (31): the back-end allocates the inflight area (a memfd) and replies with its size and the fd.
import t from 'tap';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit, encodeInflight } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { inflightAreaSize } from '../../../vmm-device/transport/vhost-user/inflight.ts';
import { expectClose, host, negotiate, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('a memfd sized for every queue, each region initialised (version 1, desc_num)', async (t) => {
  const r = await rig();
  await negotiate(r);
  const { desc, fd } = await r.fe.getInflightFd(2, 64);
  t.equal(desc.mmapSize, BigInt(inflightAreaSize(2, 64)));
  t.equal(desc.mmapOffset, 0n);
  t.same([desc.numQueues, desc.queueSize], [2, 64]);
  t.ok(fd !== undefined, 'an fd came with the reply');
  t.equal(host.fileSize(fd!), inflightAreaSize(2, 64));
  const m = host.mmapShared(fd!, Number(desc.mmapSize), 0);
  const dv = new DataView(m);
  const region = inflightAreaSize(1, 64);
  t.same([dv.getUint16(8, true), dv.getUint16(10, true)], [1, 64], 'queue 0: version 1, desc_num 64');
  t.same([dv.getUint16(region + 8, true), dv.getUint16(region + 10, true)], [1, 64], 'queue 1 too');
  host.munmap(m);
  host.close(fd!);
  t.ok(r.session().describe().inflight);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('more queues than the device has: close', async (t) => {
  const r = await rig();
  await negotiate(r);
  r.fe.send(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 3, queueSize: 64 }));
  await expectClose(t, r, 'GET_INFLIGHT_FD (31)', 'BadState', /num_queues 3 exceeds the queue count 2/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('queue size above the maximum: close', async (t) => {
  const r = await rig();
  await negotiate(r);
  r.fe.send(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 1024 }));
  await expectClose(t, r, 'GET_INFLIGHT_FD (31)', 'BadState', /queue_size 1024 exceeds the maximum 256/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without INFLIGHT_SHMFD: close', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.INFLIGHT_SHMFD));
  r.fe.send(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 64 }));
  await expectClose(t, r, 'GET_INFLIGHT_FD (31)', 'BadState', /INFLIGHT_SHMFD was not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
