// SET_INFLIGHT_FD (32): the front-end hands the inflight area back (after a back-end restart); it must hold every
// queue region and lie inside its fd.
import t from 'tap';
import { FrontendRequest as R, encodeInflight } from '../../vmm-device/transport/vhost-user/messages.ts';
import { inflightAreaSize } from '../../vmm-device/transport/vhost-user/inflight.ts';
import { ack, expectAckFailure, host, negotiate, rig } from '../../guest-driver-spec/frontend/conformance/harness.ts';

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
