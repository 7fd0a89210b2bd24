// VIRTIO shared memory regions, the back-end's side (spec 13.14; transport/vhost-user/shmem.ts): SHMEM (bit 22) is
// offered only when the device model declares regions; GET_SHMEM_CONFIG is answered with them; the model's
// mapShared/unmapShared go out as SHMEM_MAP (with the fd) / SHMEM_UNMAP on the back-end channel and wait for the
// front-end's REPLY_ACK; the mapper refuses by itself what the front-end would refuse; a disconnect forgets every
// mapping. Real sockets and memfds, with the reference front-end answering by hand (nextBackendRequest).
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { NEED_REPLY, host, lastRefusal, negotiate, rig, startRing, type Rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { EchoDevice } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { REGIONS, RegionDevice } from '../../../guest-driver-spec/frontend/conformance/region-device.ts';
import { ShmemRefusedError } from '../../../vmm-device/transport/vhost-user/backend-channel.ts';
import {
  BackendRequest,
  FrontendRequest as R,
  ProtocolFeature as P,
  SUPPORTED_PROTOCOL_FEATURES,
  bit,
  encodeU64,
} from '../../../vmm-device/transport/vhost-user/messages.ts';
import { SHMEM_CONFIG_SIZE, decodeShmemConfig, decodeShmemMap } from '../../../vmm-device/transport/vhost-user/shmem-messages.ts';
import { MAX_OUTSTANDING_SHMEM_REQUESTS } from '../../../vmm-device/transport/vhost-user/shmem.ts';
import type { HostPageMapper } from '../../../vmm-device/virtio/device.ts';
import { VhostUserServer } from '../../../vmm-device/transport/vhost-user/server.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';

const PAGE = BigInt(host.pageSize);

async function running(opts: { protocol?: bigint } = {}): Promise<{ r: Rig; pages: HostPageMapper; device: RegionDevice }> {
  const device = new RegionDevice();
  const r = await rig({ device });
  if (opts.protocol === undefined) {
    await r.fe.init({ queues: 2, shmem: 'manual' });
  } else {
    await negotiate(r, opts.protocol);
    const [ours, theirs] = host.socketPair();
    r.fe.backendChannelFd = ours;
    await r.fe.request(R.SET_BACKEND_REQ_FD, undefined, [theirs]);
    host.close(theirs);
  }
  const ram = r.ram();
  await r.fe.setFeatures(bit(32) | bit(30));
  await r.fe.setMemTable(ram.regions);
  await startRing(r, ram, new GuestAllocator(ram), 0, 16);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  const pages = device.ctx?.hostPages;
  if (pages === undefined) throw new Error('the activation context carries no host-page mapper');
  return { r, pages, device };
}

t.test('SHMEM is offered when the model declares regions, and only then', async (t) => {
  const r = await rig({ device: new RegionDevice() });
  await r.fe.getFeatures();
  const offered = await r.fe.getProtocolFeatures();
  t.equal(offered, SUPPORTED_PROTOCOL_FEATURES | bit(P.SHMEM), 'the usual features plus SHMEM (22)');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });

  const plain = await rig({ device: new EchoDevice(2) });
  await plain.fe.getFeatures();
  t.equal(await plain.fe.getProtocolFeatures(), SUPPORTED_PROTOCOL_FEATURES, 'no SHMEM without regions');
  plain.fe.send(R.SET_PROTOCOL_FEATURES, encodeU64(SUPPORTED_PROTOCOL_FEATURES | bit(P.SHMEM)), [], NEED_REPLY);
  t.ok(await plain.fe.waitClosed(), 'SET_PROTOCOL_FEATURES with SHMEM not offered: refused (no ack negotiated yet, so closed)');
  t.match(lastRefusal(plain), { request: 'SET_PROTOCOL_FEATURES (16)', kind: 'BadState', reason: /protocol feature bits 0x400000 were not offered/ });
  t.same(await plain.finish(), { watchers: 0, mappings: 0 });
});

t.test('a model whose regions no front-end could expose is refused when the server is built', async (t) => {
  const opts = (regions: Map<number, bigint>) => ({ path: '/nonexistent/never-listened.sock', host, model: new RegionDevice(regions), log: new RecordingLogger('t') });
  t.throws(() => new VhostUserServer(opts(new Map([[0, 100n]]))), /region 0: size 100 is not a positive multiple of the page size/);
  t.throws(() => new VhostUserServer(opts(new Map([[256, PAGE]]))), /id 256 is outside 0..255/);
  t.doesNotThrow(() => new VhostUserServer(opts(new Map([[255, PAGE]]))), 'id 255 of one page is fine');
});

t.test('GET_SHMEM_CONFIG is answered with the model\'s regions once SHMEM is negotiated', async (t) => {
  const r = await rig({ device: new RegionDevice() });
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES);
  r.fe.send(R.GET_SHMEM_CONFIG);
  const early = await r.fe.reply(R.GET_SHMEM_CONFIG);
  t.equal(early.header.size, 0, 'without SHMEM negotiated: an empty reply');
  t.match(lastRefusal(r), { request: 'GET_SHMEM_CONFIG (44)', kind: 'BadState', reason: /SHMEM was not negotiated/ });
  t.equal(r.server.counters.badMessages.BadState, 1, 'counted');

  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES | bit(P.SHMEM));
  r.fe.send(R.GET_SHMEM_CONFIG);
  const m = await r.fe.reply(R.GET_SHMEM_CONFIG, SHMEM_CONFIG_SIZE);
  t.same(decodeShmemConfig(m.payload), REGIONS, 'sizes by id, sparse ids kept');
  t.equal(new DataView(m.payload.buffer, m.payload.byteOffset).getUint32(0, true), REGIONS.size, 'nregions');
  t.equal(m.fds.length, 0);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a malformed GET_SHMEM_CONFIG gets the protocol error, an empty reply, and the session goes on', async (t) => {
  const r = await rig({ device: new RegionDevice() });
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES | bit(P.SHMEM));
  r.fe.send(R.GET_SHMEM_CONFIG, new Uint8Array(8));
  t.equal((await r.fe.reply(R.GET_SHMEM_CONFIG)).header.size, 0, 'a payload: empty reply');
  t.match(lastRefusal(r), { request: 'GET_SHMEM_CONFIG (44)', kind: 'BadSize', reason: /payload is 8 bytes, expected 0/ });
  const fd = host.eventfd();
  r.fe.send(R.GET_SHMEM_CONFIG, new Uint8Array(0), [fd]);
  host.close(fd);
  t.equal((await r.fe.reply(R.GET_SHMEM_CONFIG)).header.size, 0, 'an fd: empty reply');
  t.match(lastRefusal(r), { request: 'GET_SHMEM_CONFIG (44)', kind: 'BadFdCount', reason: /1 fds, expected 0/ });
  t.equal(r.server.counters.badMessages.BadSize, 1);
  t.equal(r.server.counters.badMessages.BadFdCount, 1);
  t.notOk(r.fe.closedByBackend, 'connection kept');
  r.fe.send(R.GET_SHMEM_CONFIG);
  t.same(decodeShmemConfig((await r.fe.reply(R.GET_SHMEM_CONFIG, SHMEM_CONFIG_SIZE)).payload), REGIONS, 'a good one is answered afterwards');
  t.same(await r.finish(), { watchers: 0, mappings: 0 }, 'the fd that came with the bad request was closed');
});

t.test('capabilities: the regions once SHMEM, the channel, fds and REPLY_ACK are negotiated; the model sees them at FEATURES_OK', async (t) => {
  const { r, pages, device } = await running();
  t.ok(r.fe.protocolFeatures & bit(P.SHMEM), 'the front-end negotiated SHMEM');
  t.same(pages.capabilities().sharedMemory, REGIONS);
  t.same(pages.capabilities().missing, []);
  t.equal(device.facts.length, 1, 'acceptFeatures was asked once');
  t.same(device.facts[0]?.hostPages?.sharedMemory, REGIONS, 'with the negotiated regions');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });

  const without = await running({ protocol: (SUPPORTED_PROTOCOL_FEATURES | bit(P.SHMEM)) & ~bit(P.REPLY_ACK) });
  t.equal(without.pages.capabilities().sharedMemory.size, 0);
  t.match(without.pages.capabilities().missing, [/^shared memory \(SHMEM_MAP\/SHMEM_UNMAP\): protocol feature REPLY_ACK \(3\) not negotiated$/]);
  t.equal(without.device.facts[0]?.hostPages?.sharedMemory.size, 0, 'the model saw no region at FEATURES_OK');
  t.same(await without.r.finish(), { watchers: 0, mappings: 0 });

  const noShmem = await running({ protocol: SUPPORTED_PROTOCOL_FEATURES });
  t.match(noShmem.pages.capabilities().missing, [/protocol feature SHMEM \(22\) not negotiated/]);
  const fd = host.memfd('never-mapped', host.pageSize);
  await t.rejects(noShmem.pages.mapShared({ shmid: 0, shmOffset: 0n, fd, fdOffset: 0n, length: PAGE, writable: true }), { name: 'ShmemRefusedError', message: /SHMEM \(22\) not negotiated/ });
  host.close(fd);
  t.same(await noShmem.r.finish(), { watchers: 0, mappings: 0 });
});

t.test('mapShared sends SHMEM_MAP with the fd and resolves on REPLY_ACK 0; unmapShared sends SHMEM_UNMAP', async (t) => {
  const { r, pages } = await running();
  const shmem = r.session().hostPages.shmem;
  const memfd = host.memfd('queue-pages', 4 * host.pageSize);
  const mapped = pages.mapShared({ shmid: 3, shmOffset: 2n * PAGE, fd: memfd, fdOffset: PAGE, length: 2n * PAGE, writable: true });
  const req = await r.fe.nextBackendRequest();
  t.equal(req?.header.request, BackendRequest.SHMEM_MAP);
  t.ok((req!.header.flags & 0x8) !== 0, 'NEED_REPLY set');
  t.same(decodeShmemMap(req!.payload), { shmid: 3, fdOffset: PAGE, shmOffset: 2n * PAGE, len: 2n * PAGE, writable: true });
  t.equal(req!.fds.length, 1, 'the fd travelled');
  const theirs = host.mmapShared(req!.fds[0]!, 2 * host.pageSize, host.pageSize);
  const ours = host.mmapShared(memfd, 4 * host.pageSize, 0);
  new Uint32Array(theirs)[1] = 0xfeedf00d;
  t.equal(new DataView(ours).getUint32(host.pageSize + 4, true), 0xfeedf00d, 'the front-end\'s copy is the same file');
  host.munmap(theirs);
  host.munmap(ours);
  host.close(req!.fds[0]!);
  t.same(shmem.describe(), [{ shmid: 3, offset: 2n * PAGE, length: 2n * PAGE, state: 'mapping' }], 'reserved while in flight');
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  await t.resolves(mapped);
  t.same(shmem.describe(), [{ shmid: 3, offset: 2n * PAGE, length: 2n * PAGE, state: 'live' }]);

  const unmapped = pages.unmapShared(3, 2n * PAGE, 2n * PAGE);
  const req2 = await r.fe.nextBackendRequest();
  t.equal(req2?.header.request, BackendRequest.SHMEM_UNMAP);
  t.same(decodeShmemMap(req2!.payload), { shmid: 3, fdOffset: PAGE, shmOffset: 2n * PAGE, len: 2n * PAGE, writable: true }, 'the same 40 bytes');
  t.equal(req2!.fds.length, 0, 'no fd with an unmap');
  r.fe.answerBackendRequest(BackendRequest.SHMEM_UNMAP, 0n);
  await t.resolves(unmapped);
  t.same(shmem.describe(), []);
  t.match(shmem.counters, { mapped: 1, unmapped: 1, refusedLocally: 0, refusedByFrontend: 0 });
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('maps asked for in one turn go out as one batch, each with its own fd; the answers settle them in order', async (t) => {
  const { r, pages } = await running();
  const a = host.memfd('queue-a', host.pageSize);
  const b = host.memfd('queue-b', host.pageSize);
  const first = pages.mapShared({ shmid: 0, shmOffset: 0n, fd: a, fdOffset: 0n, length: PAGE, writable: true });
  const second = pages.mapShared({ shmid: 0, shmOffset: PAGE, fd: b, fdOffset: 0n, length: PAGE, writable: true });
  const req1 = await r.fe.nextBackendRequest();
  const req2 = await r.fe.nextBackendRequest(200);
  t.ok(req2 !== undefined, 'the second request came before the first was answered');
  t.same([decodeShmemMap(req1!.payload)?.shmOffset, decodeShmemMap(req2!.payload)?.shmOffset], [0n, PAGE], 'in the order asked');
  t.same([req1!.fds.length, req2!.fds.length], [1, 1], 'one fd each');
  for (const [req, mine] of [[req1!, a], [req2!, b]] as const) {
    const theirs = host.mmapShared(req.fds[0]!, host.pageSize, 0);
    const ours = host.mmapShared(mine, host.pageSize, 0);
    new Uint8Array(ours)[0] = mine & 0xff;
    t.equal(new Uint8Array(theirs)[0], mine & 0xff, 'each request carries its own queue\'s fd');
    host.munmap(theirs);
    host.munmap(ours);
    host.close(req.fds[0]!);
  }
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 1n);
  await t.resolves(first, 'the first answer settles the first request');
  await t.rejects(second, /refused it \(answer 1\)/, 'the second answer the second');
  t.same(r.session().hostPages.shmem.describe().map((e) => e.offset), [0n], 'only the first is mapped');
  host.close(a);
  host.close(b);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a map the front-end refuses rejects with its answer and leaves nothing; a refused unmap keeps the mapping', async (t) => {
  const { r, pages } = await running();
  const shmem = r.session().hostPages.shmem;
  const memfd = host.memfd('queue-pages', host.pageSize);
  const map = { shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: false };
  const refused = pages.mapShared(map);
  const req = await r.fe.nextBackendRequest();
  t.equal(decodeShmemMap(req!.payload)?.writable, false, 'read-only: flags 0');
  for (const fd of req!.fds) host.close(fd);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 7n);
  await t.rejects(refused, { name: 'ShmemRefusedError', message: 'SHMEM_MAP (9) of region 0 [0x0, +0x1000): the front-end refused it (answer 7)'.replace('0x1000', `0x${PAGE.toString(16)}`).replace('SHMEM_MAP (9)', 'BACKEND_SHMEM_MAP (9)') });
  t.same(shmem.describe(), [], 'nothing reserved');
  t.equal(shmem.counters.refusedByFrontend, 1, 'counted');

  const again = pages.mapShared(map);
  const req2 = await r.fe.nextBackendRequest();
  for (const fd of req2!.fds) host.close(fd);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  await t.resolves(again, 'the same range maps afterwards');
  const unmap = pages.unmapShared(0, 0n, PAGE);
  await r.fe.nextBackendRequest();
  r.fe.answerBackendRequest(BackendRequest.SHMEM_UNMAP, 1n);
  await t.rejects(unmap, /BACKEND_SHMEM_UNMAP \(10\) of region 0 .*refused it \(answer 1\)/);
  t.same(shmem.describe().map((e) => e.state), ['live'], 'a refused unmap leaves the mapping live');
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('the mapper refuses by itself what the front-end would refuse; nothing is sent', async (t) => {
  const { r, pages } = await running();
  const shmem = r.session().hostPages.shmem;
  const memfd = host.memfd('queue-pages', 4 * host.pageSize);
  const good = { shmid: 0, shmOffset: 4n * PAGE, fd: memfd, fdOffset: 0n, length: 2n * PAGE, writable: true };
  const live = pages.mapShared(good);
  const req = await r.fe.nextBackendRequest();
  for (const fd of req!.fds) host.close(fd);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  await live;
  const size0 = REGIONS.get(0)!;
  const cases: [string, Parameters<HostPageMapper['mapShared']>[0], RegExp][] = [
    ['unknown shmid', { ...good, shmid: 1 }, /region 1 does not exist \(the model declares 0, 3\)/],
    ['past the region', { ...good, shmOffset: size0 - PAGE }, /ends past the region's/],
    ['offset unaligned', { ...good, shmOffset: 100n }, /offset 0x64 is not a multiple of the page size/],
    ['length unaligned', { ...good, shmOffset: 16n * PAGE, length: 100n }, /length 0x64 is not a multiple of the page size/],
    ['length 0', { ...good, shmOffset: 16n * PAGE, length: 0n }, /length 0 is not positive/],
    ['fd offset unaligned', { ...good, shmOffset: 16n * PAGE, fdOffset: 8n }, /fd offset 0x8 is not a multiple/],
    ['overlapping a live mapping', { ...good, shmOffset: 5n * PAGE }, /overlaps \[0x4000, \+0x2000\) \(live\)|overlaps .*\(live\)/],
    ['containing a live mapping', { ...good, shmOffset: 0n, length: 16n * PAGE }, /overlaps .*\(live\)/],
  ];
  for (const [what, m, reason] of cases) await t.rejects(pages.mapShared(m), { name: 'ShmemRefusedError', message: reason }, what);
  await t.rejects(pages.unmapShared(0, 4n * PAGE, PAGE), /names no mapping/, 'an unmap naming part of a mapping');
  await t.rejects(pages.unmapShared(0, 32n * PAGE, PAGE), /names no mapping/, 'an unmap naming nothing');
  await t.rejects(pages.unmapShared(9, 0n, PAGE), /region 9 does not exist/, 'an unmap of an unknown region');
  t.equal(await r.fe.nextBackendRequest(100), undefined, 'nothing reached the front-end');
  t.equal(shmem.counters.refusedLocally, cases.length + 3, 'each refusal counted');
  t.equal(shmem.describe().length, 1, 'the live mapping is untouched');
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('overlapping maps in flight: the second is refused while the first waits', async (t) => {
  const { r, pages } = await running();
  const memfd = host.memfd('queue-pages', host.pageSize);
  const first = pages.mapShared({ shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true });
  await t.rejects(pages.mapShared({ shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true }), /overlaps .*\(mapping\)/);
  await t.rejects(pages.unmapShared(0, 0n, PAGE), /still being mapped/);
  const req = await r.fe.nextBackendRequest();
  for (const fd of req!.fds) host.close(fd);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  await t.resolves(first);
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test(`at most ${MAX_OUTSTANDING_SHMEM_REQUESTS} requests wait for the front-end`, async (t) => {
  const { r, pages } = await running();
  const memfd = host.memfd('queue-pages', host.pageSize);
  const waiting: Promise<void>[] = [];
  for (let i = 0; i < MAX_OUTSTANDING_SHMEM_REQUESTS; i++) {
    waiting.push(pages.mapShared({ shmid: 0, shmOffset: BigInt(i) * PAGE, fd: memfd, fdOffset: 0n, length: PAGE, writable: true }));
  }
  await t.rejects(
    pages.mapShared({ shmid: 3, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true }),
    new RegExp(`${MAX_OUTSTANDING_SHMEM_REQUESTS} requests already wait for the front-end`),
  );
  for (let i = 0; i < MAX_OUTSTANDING_SHMEM_REQUESTS; i++) {
    const req = await r.fe.nextBackendRequest();
    t.equal(decodeShmemMap(req!.payload)?.shmOffset, BigInt(i) * PAGE, `request ${i} in order`);
    for (const fd of req!.fds) host.close(fd);
    r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  }
  await Promise.all(waiting);
  t.equal(r.session().hostPages.shmem.describe().length, MAX_OUTSTANDING_SHMEM_REQUESTS, 'all mapped');
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a disconnect drops every mapping; requests in flight reject and nothing throws', async (t) => {
  const { r, pages } = await running();
  const session = r.session();
  const shmem = session.hostPages.shmem;
  const memfd = host.memfd('queue-pages', host.pageSize);
  const live = pages.mapShared({ shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true });
  const req = await r.fe.nextBackendRequest();
  for (const fd of req!.fds) host.close(fd);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  await live;
  const inFlight = pages.mapShared({ shmid: 3, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true });
  const req2 = await r.fe.nextBackendRequest();
  for (const fd of req2!.fds) host.close(fd);
  const queued = pages.unmapShared(0, 0n, PAGE);
  const closed = new Promise<string>((resolve) => (r.server.onClose = resolve));
  // The front-end closes its end of the back-end channel first, then the connection (as QEMU does).
  r.fe.close();
  await t.rejects(inFlight, /front-end closed the back-end channel; the VMM's state of this range is unknown/, 'the map in flight: no answer');
  await t.rejects(queued, /back-end channel is closed/, 'the unmap queued behind it');
  t.match(await closed, /front-end closed the connection/);
  t.same(shmem.describe(), [], 'the mapper forgot them with the connection');
  t.equal(shmem.counters.dropped, 2, 'counted: the live one and the one in flight');
  t.equal(shmem.counters.failed, 2, 'both requests failed without an answer');
  await t.rejects(pages.mapShared({ shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true }), ShmemRefusedError, 'no channel any more');
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a connection closed by the back-end while a request waits: it rejects saying the VMM dropped every mapping', async (t) => {
  const { r, pages } = await running();
  const shmem = r.session().hostPages.shmem;
  const memfd = host.memfd('queue-pages', host.pageSize);
  const inFlight = pages.mapShared({ shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true });
  const req = await r.fe.nextBackendRequest();
  for (const fd of req!.fds) host.close(fd);
  r.server.close(); // the session is released first, then its channel closes
  await t.rejects(inFlight, /the connection closed and the VMM dropped every mapping/);
  t.same(shmem.describe(), []);
  t.equal(shmem.counters.dropped, 1);
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a map the front-end never answers: rejects after the channel\'s timeout, the range stays reserved until unmapped', async (t) => {
  const { r, pages } = await running();
  const shmem = r.session().hostPages.shmem;
  const memfd = host.memfd('queue-pages', host.pageSize);
  const map = { shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true };
  const silent = pages.mapShared(map);
  const req = await r.fe.nextBackendRequest();
  for (const fd of req!.fds) host.close(fd);
  // No answer (a real front-end that hangs): the channel gives up after BACKEND_REPLY_TIMEOUT_MS.
  await t.rejects(silent, /no answer within \d+ ms; the VMM's state of this range is unknown: it stays reserved until unmapShared/);
  t.same(shmem.describe().map((e) => e.state), ['uncertain']);
  t.equal(shmem.counters.failed, 1, 'counted');
  await t.rejects(pages.mapShared(map), /overlaps .*\(uncertain\)/, 'the range is not handed out again');
  const unmap = pages.unmapShared(0, 0n, PAGE);
  const req2 = await r.fe.nextBackendRequest();
  t.equal(req2?.header.request, BackendRequest.SHMEM_UNMAP);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_UNMAP, 1n);
  await t.rejects(unmap, /refused it \(answer 1\)/, 'the front-end never mapped it');
  t.same(shmem.describe(), [], 'so the range is free again');
  const again = pages.mapShared(map);
  const req3 = await r.fe.nextBackendRequest();
  for (const fd of req3!.fds) host.close(fd);
  r.fe.answerBackendRequest(BackendRequest.SHMEM_MAP, 0n);
  await t.resolves(again);
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
