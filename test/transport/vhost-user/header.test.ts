// Framing: what every message must satisfy before its request is even looked at. A bad header cannot be answered
// (the byte stream is no longer trusted): the back-end closes, logs the request and the reason, counts it, releases
// the connection's resources and serves the next front-end.
import t from 'tap';
import { encodeHeader, encodeMessage, FrontendRequest as R, MAX_PAYLOAD_SIZE } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, host, lastRefusal, negotiate, rig, V, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

const cases: { name: string; bytes: Uint8Array; request: string; reason: RegExp }[] = [
  { name: 'version 2', bytes: encodeMessage(R.GET_FEATURES, 2), request: 'GET_FEATURES (1)', reason: /version 2, expected 1/ },
  { name: 'version 0', bytes: encodeMessage(R.GET_FEATURES, 0), request: 'GET_FEATURES (1)', reason: /version 0, expected 1/ },
  { name: 'reserved flag bit 4', bytes: encodeMessage(R.GET_FEATURES, V | 0x10), request: 'GET_FEATURES (1)', reason: /reserved flag bits set/ },
  { name: 'REPLY flag on a request', bytes: encodeMessage(R.GET_FEATURES, V | 0x4), request: 'GET_FEATURES (1)', reason: /REPLY flag set on a request/ },
  {
    name: 'payload larger than the maximum',
    bytes: encodeHeader({ request: R.SET_CONFIG, flags: V, size: MAX_PAYLOAD_SIZE + 1 }),
    request: 'SET_CONFIG (25)',
    reason: /payload size 4097 exceeds the maximum 4096/,
  },
];

for (const c of cases) {
  t.test(`bad header: ${c.name}`, async (t) => {
    const r = await rig();
    r.fe.sendRaw(c.bytes);
    await expectClose(t, r, c.request, 'BadHeader', c.reason);
    t.same(await r.finish(), { watchers: 0, mappings: 0 });
  });
}

t.test('unknown request code: close without REPLY_ACK', async (t) => {
  const r = await rig();
  await negotiate(r, WITHOUT_REPLY_ACK);
  r.fe.send(99, new Uint8Array(0), [], V | 0x8);
  await expectClose(t, r, 'unknown request 99', 'UnknownRequest', /not a vhost-user request code/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('unknown request code: REPLY_ACK failure when asked', async (t) => {
  const r = await rig();
  await negotiate(r);
  await expectAckFailure(t, r, 99, new Uint8Array(0), [], { request: 'unknown request 99', kind: 'UnknownRequest', reason: /not a vhost-user request code/ });
  t.equal(await ack(r, R.SET_OWNER), 0n, 'the connection goes on');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a request this back-end does not implement (SET_LOG_BASE) closes', async (t) => {
  const r = await rig();
  r.fe.send(R.SET_LOG_BASE, new Uint8Array(16));
  await expectClose(t, r, 'SET_LOG_BASE (6)', 'UnsupportedRequest', /does not implement/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('more fds than a message may carry: close, and the fds are not leaked', async (t) => {
  const r = await rig();
  const fds = Array.from({ length: 9 }, () => host.eventfd());
  r.fe.send(R.SET_MEM_TABLE, new Uint8Array(8), fds);
  for (const fd of fds) host.close(fd);
  await expectClose(t, r, 'message', 'BadFdCount', /more than 8 fds/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a message split across many writes is reassembled', async (t) => {
  const r = await rig();
  const m = encodeMessage(R.GET_FEATURES, V);
  for (const b of m) r.fe.sendRaw(Uint8Array.of(b));
  const reply = await r.fe.reply(R.GET_FEATURES, 8);
  t.equal(reply.header.flags, 0x5, 'reply flags exactly REPLY | version');
  t.equal(lastRefusal(r), undefined);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('the front-end hanging up mid-message releases everything', async (t) => {
  const r = await rig();
  const ram = r.ram();
  await r.fe.setMemTable(ram.regions);
  r.fe.sendRaw(encodeHeader({ request: R.SET_FEATURES, flags: V, size: 8 }));
  r.fe.close();
  await new Promise((res) => setTimeout(res, 50));
  t.equal(r.server.closeReasons.at(-1), 'front-end closed the connection in the middle of a message');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
