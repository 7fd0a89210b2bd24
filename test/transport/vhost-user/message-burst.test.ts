// A burst of requests that arrives in one piece. The connection reads a bounded number of steps per readiness
// callback (a peer that keeps the socket full must not starve the loop). The Linux guest boot froze about one boot
// in three when QEMU's start sequence (SET_VRING_NUM/BASE/ADDR/KICK/CALL for three rings, SET_STATUS, then
// SET_VRING_ENABLE with NEED_REPLY, each queued without waiting) made that budget run out right after the last
// message's payload was read: the message was complete but not dispatched, the socket was empty so no readiness
// came again, and QEMU waited for the SET_VRING_ENABLE reply holding its big lock until it was killed (the close's
// readiness then dispatched it). These tests land the budget's end on every step of a message.
import t from 'tap';
import { encodeMessage, encodeVringState, FrontendRequest as R } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { NEED_REPLY, negotiate, rig, V } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

// A header-only request (GET_FEATURES) takes the connection two steps (header, dispatch); one with a payload
// three (header, payload, dispatch). Prefixes of k header-only requests, with or without one request with a
// payload (SET_VRING_ENABLE of ring 1 without NEED_REPLY: no reply), shift the last message across the budget.
for (const withPayload of [false, true]) {
  for (let k = 26; k <= 36; k++) {
  t.test(`${withPayload ? 'SET_VRING_ENABLE, ' : ''}${k} GET_FEATURES, then SET_VRING_ENABLE with NEED_REPLY, in one write`, async (t) => {
    const r = await rig();
    await negotiate(r);
    const parts = [
      ...(withPayload ? [encodeMessage(R.SET_VRING_ENABLE, V, encodeVringState({ index: 1, num: 1 }))] : []),
      ...Array.from({ length: k }, () => encodeMessage(R.GET_FEATURES, V)),
      encodeMessage(R.SET_VRING_ENABLE, NEED_REPLY, encodeVringState({ index: 0, num: 1 })),
    ];
    const burst = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      burst.set(p, at);
      at += p.length;
    }
    r.fe.sendRaw(burst);
    for (let i = 0; i < k; i++) await r.fe.reply(R.GET_FEATURES, 8);
    const m = await r.fe.reply(R.SET_VRING_ENABLE, 8);
    t.equal(new DataView(m.payload.buffer, m.payload.byteOffset, 8).getBigUint64(0, true), 0n, 'the last request of the burst is answered (REPLY_ACK success)');
    t.equal(r.session().describe().rings[0]!.enabled, true, 'and acted on');
    t.same(await r.finish(), { watchers: 0, mappings: 0 });
  });
  }
}
