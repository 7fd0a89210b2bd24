// SET_INFLIGHT_FD (32): the front-end hands the inflight area back (after a back-end restart); it must hold every
// queue region and lie inside its fd.
import t from 'tap';
import { FrontendRequest as R, encodeInflight } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { inflightAreaSize } from '../../../vmm-device/transport/vhost-user/inflight.ts';
import { ack, expectAckFailure, host, negotiate, prepare, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { KeptInflightArea } from '../../../guest-driver-spec/frontend/frontend.ts';
import { GuestAllocator, SplitRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { F_VERSION_1, bit } from '../../../vmm-device/abi/virtio.ts';

t.test('the area from GET_INFLIGHT_FD is accepted back', async (t) => {
  const r = await rig();
  await negotiate(r);
  const { desc, fd } = await r.fe.getInflightFd(2, 64);
  t.equal(await ack(r, R.SET_INFLIGHT_FD, encodeInflight(desc), [fd!]), 0n);
  host.close(fd!);
  t.ok(r.session().describe().inflight);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('refused: area too small for the queues; area past the end of its fd; no fd', async (t) => {
  const r = await rig();
  await negotiate(r);
  const size = inflightAreaSize(2, 64);
  const fd = host.memfd('inflight-test', size);
  await expectAckFailure(t, r, R.SET_INFLIGHT_FD, encodeInflight({ mmapSize: BigInt(size - 64), mmapOffset: 0n, numQueues: 2, queueSize: 64 }), [fd], {
    request: 'SET_INFLIGHT_FD (32)', kind: 'BadPayload', reason: /smaller than the \d+ bytes 2 queues of 64 need/,
  });
  await expectAckFailure(t, r, R.SET_INFLIGHT_FD, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 4096n, numQueues: 2, queueSize: 64 }), [fd], {
    request: 'SET_INFLIGHT_FD (32)', kind: 'BadPayload', reason: /ends past the end of its fd/,
  });
  await expectAckFailure(t, r, R.SET_INFLIGHT_FD, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: 2, queueSize: 64 }), [], {
    request: 'SET_INFLIGHT_FD (32)', kind: 'BadFdCount', reason: /0 fds, expected 1/,
  });
  await expectAckFailure(t, r, R.SET_INFLIGHT_FD, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: 5, queueSize: 64 }), [fd], {
    request: 'SET_INFLIGHT_FD (32)', kind: 'BadState', reason: /num_queues 5 exceeds the queue count 2/,
  });
  host.close(fd);
  t.notOk(r.session().describe().inflight);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('refused while a ring is started (the rings are tracked in the area they started with)', async (t) => {
  const r = await rig();
  const ram = await prepare(r);
  await startRing(r, ram, new GuestAllocator(ram), 0, 64);
  const size = inflightAreaSize(2, 64);
  const fd = host.memfd('inflight-test', size);
  await expectAckFailure(t, r, R.SET_INFLIGHT_FD, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: 2, queueSize: 64 }), [fd], {
    request: 'SET_INFLIGHT_FD (32)', kind: 'BadState', reason: /cannot change while a ring is started/,
  });
  host.close(fd);
  t.notOk(r.session().describe().inflight);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

// Offsets of the split layout inside a queue region (inflight.ts): last_batch_head, used_idx, DescStateSplit[i].
const LAST_BATCH_HEAD = 12;
const USED_IDX = 14;
const descState = (head: number): number => 16 + 16 * head;

t.test('a restart after a completion cut short: that chain is settled, the others resubmitted once, bad entries ignored', async (t) => {
  const r = await rig();
  await r.fe.init({ queues: 2 });
  const got = await r.fe.getInflightFd(2, 64);
  const kept = new KeptInflightArea(host, got.fd!, got.desc);
  const ram = r.ram();
  const alloc = new GuestAllocator(ram);
  const ring = new SplitRingDriver(ram, alloc, 16);
  const a = ring.post(alloc, new TextEncoder().encode('A'), 8);
  const b = ring.post(alloc, new TextEncoder().encode('B'), 8);
  const c = ring.post(alloc, new TextEncoder().encode('C'), 8);

  // What a back-end killed at the worst moment leaves: A, B, C popped (counters 0..2); A completed; C's used
  // element written and used->idx moved to 2, but C still marked in flight and used_idx still 1. Head 40 is marked
  // too, which a ring of 16 cannot have.
  const mapping = host.mmapShared(kept.fd, Number(got.desc.mmapSize), 0);
  const area = new DataView(mapping);
  for (const [head, counter] of [[b.head, 1], [c.head, 2], [40, 3]] as const) {
    area.setUint8(descState(head), 1);
    area.setBigUint64(descState(head) + 8, BigInt(counter), true);
  }
  area.setUint16(LAST_BATCH_HEAD, c.head, true);
  area.setUint16(USED_IDX, 1, true);
  const used = ram.memory.contiguous(ring.addrs.used, 4 + 8 * 16)!;
  const usedView = new DataView(used.buffer, used.byteOffset, used.byteLength);
  usedView.setUint32(4, a.head, true);
  usedView.setUint32(8, 1, true);
  usedView.setUint32(12, c.head, true);
  usedView.setUint32(16, 1, true);
  usedView.setUint16(2, 2, true);

  await r.fe.start({ ram, features: bit(F_VERSION_1), queues: [{ index: 0, size: 16, ...ring.addrs, base: 2 }], inflight: { numQueues: 2, queueSize: 64, kept } });
  await r.fe.sync();
  t.ok((await r.fe.waitCall(0)) > 0n, 'the resubmission interrupted the guest, without a kick');
  t.same(ring.readUsed().map((u) => u.id), [a.head, c.head, b.head], 'B answered once; A and C not again');
  t.equal(r.device.served, 1, 'the device served only B');
  t.equal(area.getUint8(descState(c.head)), 0, 'C settled in the area');
  t.equal(area.getUint8(descState(b.head)), 0, 'B cleared once completed');
  t.equal(area.getUint16(USED_IDX, true), 3, 'used_idx follows used->idx');
  t.equal(area.getUint8(descState(40)), 0, 'the entry beyond the ring was dropped');
  t.equal(r.server.counters.badInflightEntries, 1, 'and counted');
  t.equal(await r.fe.getVringBase(0), 3, 'the ring resumes after A, B and C');
  host.munmap(mapping);
  kept.release();
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
