// The reference front-end serving shared memory (guest-driver-spec/frontend/shmem.ts, spec 13.14) against this
// project's back-end: SHMEM negotiated, GET_SHMEM_CONFIG asked at init, SHMEM_MAP of a real memfd mapped into this
// process (bytes the back-end writes are seen through the driver's window, and the window's stores reach the
// back-end's pages), SHMEM_UNMAP, every refusal with its own non-zero answer and nothing changed, and a back-end
// disconnect dropping every mapping. The driver transport's sharedMemory(shmid) is the same window.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { host, rig, startRing, type Rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { REGIONS, RegionDevice } from '../../../guest-driver-spec/frontend/conformance/region-device.ts';
import { ShmemAnswer } from '../../../guest-driver-spec/frontend/shmem.ts';
import { VhostUserTransport } from '../../../guest-driver-spec/driver/vhost-user-transport.ts';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import { BackendRequest, ProtocolFeature as P, bit } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { encodeShmemMap, type ShmemMapRequest } from '../../../vmm-device/transport/vhost-user/shmem-messages.ts';
import { VhostUserServer } from '../../../vmm-device/transport/vhost-user/server.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';
import type { HostPageMapper } from '../../../vmm-device/virtio/device.ts';

const PAGE = BigInt(host.pageSize);
const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 13 + seed) & 0xff);

async function running(): Promise<{ r: Rig; pages: HostPageMapper }> {
  const device = new RegionDevice();
  const r = await rig({ device });
  await r.fe.init({ queues: 2 });
  const ram = r.ram();
  await r.fe.setFeatures(bit(32) | bit(30));
  await r.fe.setMemTable(ram.regions);
  await startRing(r, ram, new GuestAllocator(ram), 0, 16);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  return { r, pages: device.ctx!.hostPages! };
}

t.test('the front-end negotiates SHMEM and asks GET_SHMEM_CONFIG at init', async (t) => {
  const { r } = await running();
  t.ok(r.fe.protocolFeatures & bit(P.SHMEM));
  t.same(r.fe.shmem?.regions, REGIONS, 'the back-end model\'s regions');
  t.equal(r.fe.shmem?.window(1), undefined, 'no window on a region that does not exist');
  t.equal(r.fe.shmem?.window(3)?.size, REGIONS.get(3));
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a mapped memfd: the back-end\'s bytes through the window, the window\'s stores in the back-end\'s pages; unmap reads 0', async (t) => {
  const { r, pages } = await running();
  const memfd = host.memfd('queue-pages', 4 * host.pageSize);
  const backend = host.mmapShared(memfd, 4 * host.pageSize, 0);
  const bytes = new Uint8Array(backend);
  bytes.set(pattern(4 * host.pageSize, 1));
  await pages.mapShared({ shmid: 0, shmOffset: 8n * PAGE, fd: memfd, fdOffset: PAGE, length: 2n * PAGE, writable: true });
  const shm = r.fe.shmem!;
  t.same(shm.mappings(0), [{ offset: 8n * PAGE, length: 2n * PAGE, writable: true }], 'the front-end keeps the mapping');
  const w = shm.window(0)!;
  const start = 8n * PAGE;
  t.same([...(await w.read(start, 32))], [...bytes.subarray(host.pageSize, host.pageSize + 32)], 'read: the back-end\'s bytes at fd offset one page');
  t.equal(await w.readU32(start + 8n), new DataView(backend).getUint32(host.pageSize + 8, true), 'readU32');
  const across = await w.read(start - 16n, 48);
  t.same([...across.subarray(0, 16)], new Array(16).fill(0), 'an unmapped range reads as zero');
  t.same([...across.subarray(16)], [...bytes.subarray(host.pageSize, host.pageSize + 32)], 'then the mapping, in one read');

  await w.writeU32(start + 4n, 0xcafef00d);
  t.equal(new DataView(backend).getUint32(host.pageSize + 4, true), 0xcafef00d, 'writeU32 reached the back-end\'s page');
  await w.write(start + PAGE + 100n, Uint8Array.of(9, 8, 7));
  t.same([...bytes.subarray(2 * host.pageSize + 100, 2 * host.pageSize + 103)], [9, 8, 7], 'write, second page');
  await w.write(start - 4n, Uint8Array.of(1, 1, 1, 1, 2, 2));
  t.same([...bytes.subarray(host.pageSize, host.pageSize + 2)], [2, 2], 'a write straddling a hole: the mapped part lands');
  const view = w.view!(start, host.pageSize)!;
  t.ok(view, 'a direct view of the mapping');
  view[16] = 0x5a;
  t.equal(bytes[host.pageSize + 16], 0x5a, 'a store through the view is a store to the back-end\'s page');
  bytes[host.pageSize + 17] = 0xa5;
  t.equal(view[17], 0xa5, 'and the other way');
  t.equal(w.view!(start - PAGE, 8), undefined, 'no view of a hole');
  t.equal(w.view!(start + PAGE, host.pageSize + 8), undefined, 'no view past the mapping');
  await t.rejects(w.read(REGIONS.get(0)! - 4n, 8), /outside its/, 'a read past the region');
  await t.rejects(w.readU32(start + 2n), /not 4-byte aligned/);

  await pages.unmapShared(0, start, 2n * PAGE);
  t.equal(shm.mappingCount, 0);
  t.equal(view.length, 0, 'the old view is empty now (the buffer was detached), not a dangling pointer');
  t.equal(await w.readU32(start + 4n), 0, 'the range reads as zero');
  await w.writeU32(start + 20n, 0x11111111);
  t.not(new DataView(backend).getUint32(host.pageSize + 20, true), 0x11111111, 'a store there is dropped');
  t.match(shm.counters, { mapped: 1, unmapped: 1, dropped: 0 });
  host.munmap(backend);
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 }, 'every mapping released on both sides');
});

t.test('two maps sent as one batch: the front-end gives each its own fd (it reads a message at a time, as QEMU)', async (t) => {
  const { r, pages } = await running();
  const fds = [host.memfd('queue-a', host.pageSize), host.memfd('queue-b', host.pageSize)];
  const views = fds.map((fd, i) => {
    const m = host.mmapShared(fd, host.pageSize, 0);
    new Uint8Array(m).fill(0x10 + i);
    return m;
  });
  await Promise.all(fds.map((fd, i) => pages.mapShared({ shmid: 0, shmOffset: BigInt(i) * PAGE, fd, fdOffset: 0n, length: PAGE, writable: true })));
  const w = r.fe.shmem!.window(0)!;
  t.same([...(await w.read(0n, 2))], [0x10, 0x10], 'the first range shows the first fd');
  t.same([...(await w.read(PAGE, 2))], [0x11, 0x11], 'the second range the second');
  await Promise.all([0, 1].map((i) => pages.unmapShared(0, BigInt(i) * PAGE, PAGE)));
  t.equal(r.fe.shmem!.mappingCount, 0, 'both unmapped, also in one batch');
  for (const m of views) host.munmap(m);
  for (const fd of fds) host.close(fd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a read-only mapping: reads reach it, stores are dropped, no view', async (t) => {
  const { r, pages } = await running();
  const memfd = host.memfd('cq-pages', host.pageSize);
  const backend = host.mmapShared(memfd, host.pageSize, 0);
  new Uint8Array(backend).set(pattern(host.pageSize, 4));
  await pages.mapShared({ shmid: 3, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: false });
  const w = r.fe.shmem!.window(3)!;
  t.same([...(await w.read(0n, 8))], [...pattern(8, 4)]);
  await w.writeU32(0n, 0xffffffff);
  await w.write(4n, Uint8Array.of(0, 0));
  t.same([...new Uint8Array(backend, 0, 8)], [...pattern(8, 4)], 'nothing changed');
  t.equal(w.view!(0n, 8), undefined, 'a read-only mapping gives no view (a store through it would fault)');
  await pages.unmapShared(3, 0n, PAGE);
  host.munmap(backend);
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('every bad SHMEM_MAP / SHMEM_UNMAP gets its own non-zero answer and changes nothing', async (t) => {
  const { r, pages } = await running();
  const channel = r.session().channel!;
  const memfd = host.memfd('queue-pages', 4 * host.pageSize);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fe-shmem-'));
  const file = path.join(dir, 'page');
  fs.writeFileSync(file, new Uint8Array(host.pageSize));
  const readOnlyFd = fs.openSync(file, 'r');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  await pages.mapShared({ shmid: 0, shmOffset: 4n * PAGE, fd: memfd, fdOffset: 0n, length: 2n * PAGE, writable: true });
  const shm = r.fe.shmem!;
  const good: ShmemMapRequest = { shmid: 0, fdOffset: 0n, shmOffset: 16n * PAGE, len: PAGE, writable: true };
  const send = (code: number, payload: Uint8Array, fds: number[]): Promise<bigint | undefined> => channel.request(code, payload, fds);
  const map = (m: ShmemMapRequest, fd = memfd): Promise<bigint | undefined> => send(BackendRequest.SHMEM_MAP, encodeShmemMap(m), [fd]);
  const withFlags = (flags: bigint): Uint8Array => {
    const b = encodeShmemMap(good);
    new DataView(b.buffer).setBigUint64(32, flags, true);
    return b;
  };
  const withLen0 = (): Uint8Array => {
    const b = encodeShmemMap(good);
    new DataView(b.buffer).setBigUint64(24, 0n, true);
    return b;
  };
  const badPadding = encodeShmemMap(good);
  badPadding[3] = 1;
  const cases: [string, Promise<bigint | undefined>, bigint][] = [
    ['unknown shmid', map({ ...good, shmid: 1 }), ShmemAnswer.UNKNOWN_SHMID],
    ['shmid 255', map({ ...good, shmid: 255 }), ShmemAnswer.UNKNOWN_SHMID],
    ['offset past the region', map({ ...good, shmOffset: REGIONS.get(0)! }), ShmemAnswer.OUT_OF_RANGE],
    ['range ends past the region', map({ ...good, shmOffset: REGIONS.get(0)! - PAGE, len: 2n * PAGE }), ShmemAnswer.OUT_OF_RANGE],
    ['range wrapping 2^64', map({ ...good, shmOffset: (1n << 64n) - 2n * PAGE, len: PAGE }), ShmemAnswer.OUT_OF_RANGE],
    ['overlapping a live mapping', map({ ...good, shmOffset: 5n * PAGE }), ShmemAnswer.OVERLAP],
    ['containing a live mapping', map({ ...good, shmOffset: 0n, len: 16n * PAGE }), ShmemAnswer.OVERLAP],
    ['shm offset unaligned', map({ ...good, shmOffset: 16n * PAGE + 8n }), ShmemAnswer.UNALIGNED],
    ['length unaligned', map({ ...good, len: 100n }), ShmemAnswer.UNALIGNED],
    ['fd offset unaligned', map({ ...good, fdOffset: 12n }), ShmemAnswer.UNALIGNED],
    ['length 0', send(BackendRequest.SHMEM_MAP, withLen0(), [memfd]), ShmemAnswer.UNALIGNED],
    ['unknown flags', send(BackendRequest.SHMEM_MAP, withFlags(2n), [memfd]), ShmemAnswer.UNKNOWN_FLAGS],
    ['non-zero padding', send(BackendRequest.SHMEM_MAP, badPadding, [memfd]), ShmemAnswer.MALFORMED],
    ['a short payload', send(BackendRequest.SHMEM_MAP, new Uint8Array(32), [memfd]), ShmemAnswer.MALFORMED],
    ['no fd', send(BackendRequest.SHMEM_MAP, encodeShmemMap(good), []), ShmemAnswer.MALFORMED],
    ['a memfd range past its end', map({ ...good, fdOffset: 4n * PAGE }), ShmemAnswer.PAST_END_OF_FILE],
    ['a read-only file mapped writable (mmap fails)', map(good, readOnlyFd), ShmemAnswer.MMAP_FAILED],
    ['unmap naming no mapping', send(BackendRequest.SHMEM_UNMAP, encodeShmemMap(good), []), ShmemAnswer.NO_MAPPING],
    ['unmap naming part of a mapping', send(BackendRequest.SHMEM_UNMAP, encodeShmemMap({ ...good, shmOffset: 4n * PAGE }), []), ShmemAnswer.NO_MAPPING],
    ['unmap with an fd', send(BackendRequest.SHMEM_UNMAP, encodeShmemMap({ ...good, shmOffset: 4n * PAGE, len: 2n * PAGE }), [memfd]), ShmemAnswer.MALFORMED],
    ['unmap of an unknown region', send(BackendRequest.SHMEM_UNMAP, encodeShmemMap({ ...good, shmid: 7 }), []), ShmemAnswer.UNKNOWN_SHMID],
  ];
  for (const [what, answer, expected] of cases) t.equal(await answer, expected, `${what}: answer ${expected}`);
  fs.closeSync(readOnlyFd);
  t.same(shm.mappings(0), [{ offset: 4n * PAGE, length: 2n * PAGE, writable: true }], 'only the good mapping exists');
  const refusedTotal = Object.values(shm.counters.refused).reduce((a, b) => a + (b ?? 0), 0);
  t.equal(refusedTotal, cases.length, 'each refusal counted');
  t.equal(await map(good), 0n, 'a good map after all that is served');
  t.equal(shm.mappingCount, 2);
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 }, 'the fds that came with refused requests were closed');
});

t.test('the back-end disconnecting drops every mapping; the driver\'s window reads zero', async (t) => {
  const { r, pages } = await running();
  const memfd = host.memfd('queue-pages', 2 * host.pageSize);
  await pages.mapShared({ shmid: 0, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true });
  await pages.mapShared({ shmid: 3, shmOffset: 0n, fd: memfd, fdOffset: PAGE, length: PAGE, writable: false });
  const w = r.fe.shmem!.window(0)!;
  await w.writeU32(0n, 0x77);
  const view = w.view!(0n, 16)!;
  t.equal(view[0], 0x77);
  r.server.close();
  t.ok(await r.fe.waitClosed(), 'the front-end saw the back-end go');
  t.equal(r.fe.shmem!.mappingCount, 0, 'no mapping left');
  t.equal(r.fe.shmem!.counters.dropped, 2);
  t.equal(view.length, 0, 'the view the driver held is empty');
  t.equal(await w.readU32(0n), 0, 'the window reads zero');
  host.close(memfd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('the driver transport: sharedMemory(shmid) is the front-end\'s window', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fe-shmem-transport-'));
  const socketPath = path.join(dir, 'vu.sock');
  const device = new RegionDevice();
  const server = new VhostUserServer({ path: socketPath, host, model: device, log: new RecordingLogger('t') });
  server.listen();
  const ram = new GuestRam(host, [{ gpa: 0, size: 0x40000 }]);
  const transport = await VhostUserTransport.open({ host, socketPath, ram, queues: 2 });
  t.teardown(async () => {
    await transport.close();
    server.close();
    ram.release();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  t.equal(await transport.sharedMemory(1), undefined, 'no region 1');
  const w = await transport.sharedMemory(0);
  t.equal(w?.size, REGIONS.get(0));
  t.equal(await w!.readU32(0n), 0, 'nothing mapped yet: zero');
  const session = server.session!;
  const memfd = host.memfd('queue-pages', host.pageSize);
  const backend = host.mmapShared(memfd, host.pageSize, 0);
  new DataView(backend).setUint32(64, 0x600df00d, true);
  // The device model is not active (no DRIVER_OK): the session's mapper is the one the model would get.
  await session.hostPages.mapShared({ shmid: 0, shmOffset: PAGE, fd: memfd, fdOffset: 0n, length: PAGE, writable: true });
  t.equal(await w!.readU32(PAGE + 64n), 0x600df00d, 'the back-end\'s word through the driver\'s window');
  await w!.writeU32(PAGE + 68n, 0x12345678);
  t.equal(new DataView(backend).getUint32(68, true), 0x12345678, 'and the driver\'s store in the back-end\'s page');
  host.munmap(backend);
  host.close(memfd);
});
