// SET_BACKEND_REQ_FD (21): the back-end channel (BACKEND_REQ). Over it the back-end sends CONFIG_CHANGE_MSG and
// VRING_HOST_NOTIFIER_MSG (an fd for a queue's notify page; only after DRIVER_OK, with HOST_NOTIFIER and
// BACKEND_SEND_FD), asking for an answer when REPLY_ACK is negotiated.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { BackendRequest, FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit, decodeVringArea } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { expectAckFailure, expectClose, host, negotiate, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('channel installed; VRING_HOST_NOTIFIER_MSG after DRIVER_OK carries the page fd and waits for the answer', async (t) => {
  const r = await rig();
  await r.fe.init({ queues: 2 });
  await r.fe.sync();
  t.ok(r.session().describe().backendChannel);
  const ram = r.ram();
  await r.fe.setFeatures(bit(32) | bit(30));
  await r.fe.setMemTable(ram.regions);
  await startRing(r, ram, new GuestAllocator(ram), 0, 64);
  const page = host.memfd('notify-page', host.pageSize);
  await t.rejects(r.session().setHostNotifier(0, page, host.pageSize, 0), /only valid after DRIVER_OK/);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  const answer = r.session().setHostNotifier(0, page, host.pageSize, 0);
  const req = await r.fe.nextBackendRequest();
  t.ok(req !== undefined, 'request arrived');
  t.equal(req!.header.request, BackendRequest.VRING_HOST_NOTIFIER_MSG);
  t.equal(req!.header.flags, 0x9, 'version 1 with NEED_REPLY (REPLY_ACK negotiated)');
  t.same(decodeVringArea(req!.payload), { u64: 0n, size: BigInt(host.pageSize), offset: 0n });
  t.equal(req!.fds.length, 1, 'the page fd travelled with it');
  // The front-end maps the page; a store there lands in the back-end's memfd.
  const m = host.mmapShared(req!.fds[0]!, host.pageSize, 0);
  new Uint32Array(m)[0] = 0xc0ffee;
  const mine = host.mmapShared(page, host.pageSize, 0);
  t.equal(new Uint32Array(mine)[0], 0xc0ffee, 'the store is visible in the back-end page');
  host.munmap(m);
  host.munmap(mine);
  host.close(req!.fds[0]!);
  r.fe.answerBackendRequest(BackendRequest.VRING_HOST_NOTIFIER_MSG, 0n);
  t.equal(await answer, 0n, 'the front-end answer is returned');
  // Unregistering: NOFD, no fd.
  const off = r.session().setHostNotifier(0, undefined, host.pageSize, 0);
  const req2 = await r.fe.nextBackendRequest();
  t.equal(decodeVringArea(req2!.payload)!.u64, 0x100n);
  t.equal(req2!.fds.length, 0);
  r.fe.answerBackendRequest(BackendRequest.VRING_HOST_NOTIFIER_MSG, 0n);
  t.equal(await off, 0n);
  host.close(page);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('CONFIG_CHANGE_MSG when the device raises NEEDS_RESET', async (t) => {
  const r = await rig();
  await r.fe.init({ queues: 2 });
  await r.fe.sync();
  const p = r.session().channel!.configChanged();
  const req = await r.fe.nextBackendRequest();
  t.equal(req!.header.request, BackendRequest.CONFIG_CHANGE_MSG);
  t.equal(req!.header.size, 0);
  r.fe.answerBackendRequest(BackendRequest.CONFIG_CHANGE_MSG, 0n);
  t.equal(await p, 0n);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('no fd: refused; without BACKEND_REQ: close', async (t) => {
  const r = await rig();
  await negotiate(r);
  await expectAckFailure(t, r, R.SET_BACKEND_REQ_FD, new Uint8Array(0), [], { request: 'SET_BACKEND_REQ_FD (21)', kind: 'BadFdCount', reason: /0 fds, expected 1/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
  const r2 = await rig();
  await negotiate(r2, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.BACKEND_REQ) & ~bit(P.REPLY_ACK));
  const [a, b] = host.socketPair();
  r2.fe.send(R.SET_BACKEND_REQ_FD, new Uint8Array(0), [b]);
  host.close(a);
  host.close(b);
  await expectClose(t, r2, 'SET_BACKEND_REQ_FD (21)', 'BadState', /BACKEND_REQ was not negotiated/);
  t.same(await r2.finish(), { watchers: 0, mappings: 0 });
});
