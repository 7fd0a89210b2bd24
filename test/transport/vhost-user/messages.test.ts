// The codec alone: header checks and the syntactic validation of every request layout (no fds, no state).
// The per-request conformance files next to this one drive the same rules through a real socket.
import t from 'tap';
import {
  FrontendRequest as R,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  MAX_PAYLOAD_SIZE,
  VHOST_USER_VERSION,
  VhostUserProtocolError,
  checkRequestHeader,
  decodeHeader,
  decodeRequest,
  encodeConfig,
  encodeHeader,
  encodeInflight,
  encodeMemTable,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  requestName,
  type MessageHeader,
} from '../../../vmm-device/transport/vhost-user/messages.ts';

const V = VHOST_USER_VERSION;

function req(request: number, payload: Uint8Array, fds = 0) {
  return decodeRequest({ request, flags: V, size: payload.length }, payload, fds);
}
type Asserts = Pick<typeof t, 'fail' | 'ok' | 'equal' | 'match'>;
function rejects(t: Asserts, fn: () => unknown, kind: string, reason: RegExp) {
  try {
    fn();
    t.fail(`expected ${kind}`);
  } catch (e) {
    t.ok(e instanceof VhostUserProtocolError, 'a VhostUserProtocolError');
    t.equal((e as VhostUserProtocolError).kind, kind);
    t.match((e as VhostUserProtocolError).reason, reason);
  }
}

t.test('header round trip and byte layout', async (t) => {
  const h: MessageHeader = { request: R.GET_VRING_BASE, flags: V | FLAG_NEED_REPLY, size: 8 };
  const bytes = encodeHeader(h);
  t.same([...bytes], [11, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0]);
  t.same(decodeHeader(bytes), h);
});

t.test('checkRequestHeader', async (t) => {
  t.doesNotThrow(() => checkRequestHeader({ request: 1, flags: V, size: 0 }));
  t.doesNotThrow(() => checkRequestHeader({ request: 1, flags: V | FLAG_NEED_REPLY, size: MAX_PAYLOAD_SIZE }));
  rejects(t, () => checkRequestHeader({ request: 1, flags: 2, size: 0 }), 'BadHeader', /version 2/);
  rejects(t, () => checkRequestHeader({ request: 1, flags: 0, size: 0 }), 'BadHeader', /version 0/);
  rejects(t, () => checkRequestHeader({ request: 1, flags: V | 0x10, size: 0 }), 'BadHeader', /reserved flag bits/);
  rejects(t, () => checkRequestHeader({ request: 1, flags: V | FLAG_REPLY, size: 0 }), 'BadHeader', /REPLY flag/);
  rejects(t, () => checkRequestHeader({ request: 1, flags: V, size: MAX_PAYLOAD_SIZE + 1 }), 'BadHeader', /exceeds/);
});

t.test('names', async (t) => {
  t.equal(requestName(5), 'SET_MEM_TABLE (5)');
  t.equal(requestName(999), 'unknown request 999');
});

t.test('requests without payload', async (t) => {
  for (const code of [R.GET_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.RESET_DEVICE, R.GET_MAX_MEM_SLOTS, R.GET_STATUS]) {
    t.equal(req(code, new Uint8Array(0)).type, requestName(code).split(' ')[0]);
    rejects(t, () => req(code, new Uint8Array(8)), 'BadSize', /expected 0/);
    rejects(t, () => req(code, new Uint8Array(0), 1), 'BadFdCount', /1 fds, expected 0/);
  }
});

t.test('header size must match the payload that arrived', async (t) => {
  rejects(t, () => decodeRequest({ request: R.SET_FEATURES, flags: V, size: 8 }, new Uint8Array(4), 0), 'BadSize', /header says 8/);
});

t.test('u64 requests', async (t) => {
  t.same(req(R.SET_FEATURES, encodeU64(0x1_4000_0000n)), { type: 'SET_FEATURES', features: 0x1_4000_0000n });
  t.same(req(R.SET_PROTOCOL_FEATURES, encodeU64(9n)), { type: 'SET_PROTOCOL_FEATURES', features: 9n });
  rejects(t, () => req(R.SET_FEATURES, new Uint8Array(4)), 'BadSize', /expected 8/);
  t.same(req(R.SET_STATUS, encodeU64(0xfn)), { type: 'SET_STATUS', status: 15 });
  rejects(t, () => req(R.SET_STATUS, encodeU64(0x100n)), 'BadPayload', /8-bit/);
});

t.test('unknown and unsupported codes', async (t) => {
  rejects(t, () => req(0, new Uint8Array(0)), 'UnknownRequest', /not a vhost-user request/);
  rejects(t, () => req(77, new Uint8Array(0)), 'UnknownRequest', /not a vhost-user request/);
  rejects(t, () => req(R.SET_LOG_BASE, new Uint8Array(16)), 'UnsupportedRequest', /does not implement/);
  rejects(t, () => req(R.IOTLB_MSG, new Uint8Array(0)), 'UnsupportedRequest', /does not implement/);
});

t.test('too many fds is refused before anything else', async (t) => {
  rejects(t, () => req(R.SET_MEM_TABLE, new Uint8Array(8), 9), 'BadFdCount', /9 fds, at most 8/);
});

const region = (gpa: bigint, size: bigint, uva: bigint, off = 0n) => ({ guestPhysAddr: gpa, size, userAddr: uva, mmapOffset: off });

t.test('SET_MEM_TABLE', async (t) => {
  const p = encodeMemTable([region(0n, 0x10000n, 0x7f0000000000n), region(0x100000n, 0x1000n, 0x7f1000000000n, 0x2000n)]);
  t.equal(p.length, 8 + 64);
  const m = req(R.SET_MEM_TABLE, p, 2);
  t.same(m, {
    type: 'SET_MEM_TABLE',
    regions: [
      { guestPhysAddr: 0, size: 0x10000, userAddr: 0x7f0000000000, mmapOffset: 0 },
      { guestPhysAddr: 0x100000, size: 0x1000, userAddr: 0x7f1000000000, mmapOffset: 0x2000 },
    ],
  });
  rejects(t, () => req(R.SET_MEM_TABLE, p, 1), 'BadFdCount', /1 fds, expected 2/);
  rejects(t, () => req(R.SET_MEM_TABLE, encodeMemTable([]), 0), 'BadPayload', /0 regions/);
  const nine = encodeMemTable(Array.from({ length: 9 }, (_, i) => region(BigInt(i) * 0x1000n, 0x1000n, BigInt(i) * 0x1000n)));
  rejects(t, () => req(R.SET_MEM_TABLE, nine, 8), 'BadPayload', /9 regions, expected 1\.\.8/);
  rejects(t, () => req(R.SET_MEM_TABLE, p.subarray(0, 8 + 32), 2), 'BadSize', /expected 72/);
  const padded = p.slice();
  padded[4] = 1;
  rejects(t, () => req(R.SET_MEM_TABLE, padded, 2), 'BadPayload', /padding/);
  rejects(t, () => req(R.SET_MEM_TABLE, encodeMemTable([region(0n, 0n, 0n)]), 1), 'BadPayload', /size is 0/);
  rejects(t, () => req(R.SET_MEM_TABLE, encodeMemTable([region(2n ** 64n - 0x1000n, 0x2000n, 0n)]), 1), 'BadPayload', /wraps/);
  rejects(t, () => req(R.SET_MEM_TABLE, encodeMemTable([region(2n ** 60n, 0x2000n, 0n)]), 1), 'BadPayload', /above 2\^53/);
});

t.test('ADD_MEM_REG / REM_MEM_REG', async (t) => {
  const p = encodeSingleRegion(region(0x1000n, 0x1000n, 0x7f00n * 0x1000n));
  t.equal(p.length, 40);
  t.equal(req(R.ADD_MEM_REG, p, 1).type, 'ADD_MEM_REG');
  rejects(t, () => req(R.ADD_MEM_REG, p, 0), 'BadFdCount', /0 fds, expected 1/);
  t.equal(req(R.REM_MEM_REG, p, 0).type, 'REM_MEM_REG');
  t.equal(req(R.REM_MEM_REG, p, 1).type, 'REM_MEM_REG', 'one fd tolerated on REM_MEM_REG');
  rejects(t, () => req(R.REM_MEM_REG, p, 2), 'BadFdCount', /2 fds/);
  rejects(t, () => req(R.ADD_MEM_REG, p.subarray(0, 32), 1), 'BadSize', /expected 40/);
});

t.test('vring state requests', async (t) => {
  t.same(req(R.SET_VRING_NUM, encodeVringState({ index: 1, num: 256 })), { type: 'SET_VRING_NUM', index: 1, num: 256 });
  t.same(req(R.SET_VRING_BASE, encodeVringState({ index: 0, num: 7 })), { type: 'SET_VRING_BASE', index: 0, num: 7 });
  t.same(req(R.GET_VRING_BASE, encodeVringState({ index: 3, num: 0 })), { type: 'GET_VRING_BASE', index: 3 });
  t.same(req(R.SET_VRING_ENABLE, encodeVringState({ index: 2, num: 1 })), { type: 'SET_VRING_ENABLE', index: 2, enable: true });
  rejects(t, () => req(R.SET_VRING_ENABLE, encodeVringState({ index: 2, num: 2 })), 'BadPayload', /enable value 2/);
  rejects(t, () => req(R.SET_VRING_NUM, new Uint8Array(4)), 'BadSize', /expected 8/);
});

t.test('SET_VRING_ADDR', async (t) => {
  const a = { index: 0, flags: 0, desc: 0x7f0000001000n, used: 0x7f0000003000n, avail: 0x7f0000002000n, log: 0n };
  t.same(req(R.SET_VRING_ADDR, encodeVringAddr(a)), {
    type: 'SET_VRING_ADDR', index: 0, flags: 0, desc: 0x7f0000001000, used: 0x7f0000003000, avail: 0x7f0000002000, log: 0n,
  });
  rejects(t, () => req(R.SET_VRING_ADDR, encodeVringAddr({ ...a, desc: a.desc + 8n })), 'BadPayload', /16-byte aligned/);
  rejects(t, () => req(R.SET_VRING_ADDR, encodeVringAddr({ ...a, avail: a.avail + 1n })), 'BadPayload', /2-byte aligned/);
  rejects(t, () => req(R.SET_VRING_ADDR, encodeVringAddr({ ...a, used: a.used + 2n })), 'BadPayload', /4-byte aligned/);
  rejects(t, () => req(R.SET_VRING_ADDR, encodeVringAddr({ ...a, flags: 2 })), 'BadPayload', /unknown ring flags/);
  rejects(t, () => req(R.SET_VRING_ADDR, encodeVringAddr({ ...a, desc: 2n ** 63n })), 'BadPayload', /above 2\^53/);
});

t.test('SET_VRING_KICK / CALL / ERR', async (t) => {
  for (const code of [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]) {
    t.match(req(code, encodeU64(5n), 1), { index: 5, hasFd: true });
    t.match(req(code, encodeU64(0x105n), 0), { index: 5, hasFd: false });
    rejects(t, () => req(code, encodeU64(5n), 0), 'BadFdCount', /0 fds, expected 1/);
    rejects(t, () => req(code, encodeU64(0x105n), 1), 'BadFdCount', /1 fds, expected 0/);
    rejects(t, () => req(code, encodeU64(0x205n), 1), 'BadPayload', /reserved bits/);
  }
});

t.test('SET_BACKEND_REQ_FD', async (t) => {
  t.equal(req(R.SET_BACKEND_REQ_FD, new Uint8Array(0), 1).type, 'SET_BACKEND_REQ_FD');
  rejects(t, () => req(R.SET_BACKEND_REQ_FD, new Uint8Array(0), 0), 'BadFdCount', /expected 1/);
});

t.test('GET_CONFIG / SET_CONFIG', async (t) => {
  t.same(req(R.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(16) })), { type: 'GET_CONFIG', offset: 0, size: 16, flags: 0 });
  const set = req(R.SET_CONFIG, encodeConfig({ offset: 4, flags: 1, data: Uint8Array.of(1, 2) }));
  t.same(set, { type: 'SET_CONFIG', offset: 4, flags: 1, data: Uint8Array.of(1, 2) });
  rejects(t, () => req(R.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(0) })), 'BadPayload', /size 0/);
  rejects(t, () => req(R.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(257) })), 'BadPayload', /size 257/);
  rejects(t, () => req(R.GET_CONFIG, encodeConfig({ offset: 250, flags: 0, data: new Uint8Array(8) })), 'BadPayload', /ends past 256/);
  rejects(t, () => req(R.GET_CONFIG, encodeConfig({ offset: 0, flags: 2, data: new Uint8Array(8) })), 'BadPayload', /flags 2/);
  const short = encodeConfig({ offset: 0, flags: 0, data: new Uint8Array(8) }).subarray(0, 16);
  rejects(t, () => req(R.GET_CONFIG, short), 'BadSize', /expected 20/);
  rejects(t, () => req(R.GET_CONFIG, new Uint8Array(4)), 'BadSize', /shorter than the config header/);
});

t.test('GET_INFLIGHT_FD / SET_INFLIGHT_FD', async (t) => {
  const p = encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 2, queueSize: 64 });
  t.equal(p.length, 24);
  t.same(req(R.GET_INFLIGHT_FD, p), { type: 'GET_INFLIGHT_FD', numQueues: 2, queueSize: 64 });
  rejects(t, () => req(R.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 0, queueSize: 64 })), 'BadPayload', /num_queues 0/);
  const s = encodeInflight({ mmapSize: 4096n, mmapOffset: 0n, numQueues: 2, queueSize: 64 });
  t.same(req(R.SET_INFLIGHT_FD, s, 1), { type: 'SET_INFLIGHT_FD', mmapSize: 4096, mmapOffset: 0, numQueues: 2, queueSize: 64 });
  rejects(t, () => req(R.SET_INFLIGHT_FD, s, 0), 'BadFdCount', /expected 1/);
  rejects(t, () => req(R.SET_INFLIGHT_FD, p, 1), 'BadPayload', /mmap_size is 0/);
});
