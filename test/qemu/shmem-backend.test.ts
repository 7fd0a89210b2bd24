// Shared memory end to end through the project's QEMU (spec 13.14): this project's vhost-user back-end, whose device
// model declares regions, offers SHMEM; QEMU asks GET_SHMEM_CONFIG and exposes the regions in a BAR; after the
// guest's DRIVER_OK the model maps a memfd page with its HostPageMapper (SHMEM_MAP on the back-end channel, confirmed
// by REPLY_ACK); the qtest driver transport's sharedMemory window reads the back-end's bytes and its stores reach the
// back-end's page; unmap makes the range read 0; a back-end disconnect drops the mapping in QEMU.
import fs from 'node:fs';
import t, { type Test } from 'tap';
import { startRig, until, host, QUEUES, QUEUE_SIZE, type QemuRig } from '../../guest-driver-spec/qtest/rig/vhost-user-rig.ts';
import { QtestTransport } from '../../guest-driver-spec/driver/qtest-transport.ts';
import { STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1 } from '../../guest-driver-spec/qtest/index.ts';
import { ProtocolFeature, bit } from '../../vmm-device/transport/vhost-user/messages.ts';
import type { HostPageMapper } from '../../vmm-device/virtio/device.ts';

const PAGE = BigInt(host.pageSize);
/** Region 0 of 256 pages, region 5 of 16 pages. */
const REGIONS = new Map<number, bigint>([
  [0, 256n * PAGE],
  [5, 16n * PAGE],
]);

/** The mappings of `name` in QEMU's address space (lines of /proc/PID/maps). */
function qemuMappingsOf(pid: number, name: string): number {
  return fs
    .readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => l.includes(name)).length;
}

/** QEMU with the back-end, the qtest driver transport, the device brought up to DRIVER_OK; the model's mapper. */
async function bringUp(t: Test): Promise<{ rig: QemuRig; transport: QtestTransport; pages: HostPageMapper }> {
  const rig = await startRig({ regions: REGIONS });
  const transport = await QtestTransport.open({ qemu: rig.qemu, host });
  t.teardown(async () => {
    await transport.close();
    await rig.finish();
  });
  await transport.reset();
  await transport.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
  await transport.writeDriverFeatures(1n << VIRTIO_F_VERSION_1);
  await transport.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
  for (let i = 0; i < QUEUES; i++) await transport.setupQueue(i, QUEUE_SIZE);
  await transport.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
  await until(() => rig.backend.device.ctx !== undefined, 'the device model to be activated');
  const pages = rig.backend.device.ctx!.hostPages!;
  return { rig, transport, pages };
}

t.test('QEMU negotiates SHMEM with the back-end and exposes the model\'s regions', async (t) => {
  const { rig, transport, pages } = await bringUp(t);
  const session = await rig.backend.session();
  t.ok(session.negotiatedProtocolFeatures & bit(ProtocolFeature.SHMEM), 'SHMEM negotiated');
  t.ok(rig.backend.requests.some((r) => r.name === 'GET_SHMEM_CONFIG'), 'QEMU asked GET_SHMEM_CONFIG');
  t.same(pages.capabilities().sharedMemory, REGIONS, 'the model\'s mapper can map into both');
  t.same(pages.capabilities().missing.filter((m) => m.startsWith('shared memory')), [], 'nothing missing for shared memory');
  t.equal((await transport.sharedMemory(0))?.size, REGIONS.get(0));
  t.equal((await transport.sharedMemory(5))?.size, REGIONS.get(5));
  t.equal(await transport.sharedMemory(1), undefined, 'no region 1');
});

t.test('a memfd page the model maps: the guest reads the back-end\'s bytes, the back-end sees the guest\'s stores; unmap reads 0', async (t) => {
  const { rig, transport, pages } = await bringUp(t);
  const memfd = host.memfd('vrdma-shmem-e2e', 2 * host.pageSize);
  const backend = host.mmapShared(memfd, 2 * host.pageSize, 0);
  t.teardown(() => {
    host.munmap(backend);
    host.close(memfd);
  });
  const bytes = new Uint8Array(backend);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 11 + 5) & 0xff;
  const w = (await transport.sharedMemory(0))!;
  const at = 32n * PAGE;
  t.equal(await w.readU32(at), 0, 'before the map: zero');

  await pages.mapShared({ shmid: 0, shmOffset: at, fd: memfd, fdOffset: PAGE, length: PAGE, writable: true });
  t.equal(qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-e2e'), 1, 'QEMU mapped the memfd');
  t.same([...(await w.read(at, 64))], [...bytes.subarray(host.pageSize, host.pageSize + 64)], 'the guest reads the back-end\'s bytes (fd offset one page)');
  t.equal(await w.readU32(at + 4092n), new DataView(backend).getUint32(host.pageSize + 4092, true), 'the last word of the page');
  await w.writeU32(at + 16n, 0xa1b2c3d4);
  t.equal(new DataView(backend).getUint32(host.pageSize + 16, true), 0xa1b2c3d4, 'the back-end sees the guest\'s 4-byte store');
  await w.write(at + 100n, Uint8Array.of(1, 2, 3));
  t.same([...bytes.subarray(host.pageSize + 100, host.pageSize + 103)], [1, 2, 3], 'and a byte write');
  t.equal(w.view, undefined, 'no direct view through qtest');

  await pages.unmapShared(0, at, PAGE);
  await until(() => qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-e2e') === 0, 'QEMU to munmap the memfd');
  t.equal(await w.readU32(at + 16n), 0, 'after the unmap the range reads 0');
  await w.writeU32(at + 20n, 0xffffffff);
  t.not(new DataView(backend).getUint32(host.pageSize + 20, true), 0xffffffff, 'and a store is dropped');
  t.ok(rig.qemu.running, 'QEMU is running');
});

t.test('two maps sent as one batch (a mapped QP\'s SQ and RQ): QEMU answers both, each range shows its own fd; both unmaps as one batch', async (t) => {
  const { rig, transport, pages } = await bringUp(t);
  const names = ['vrdma-shmem-batch-a', 'vrdma-shmem-batch-b'];
  const fds = names.map((n) => host.memfd(n, host.pageSize));
  const maps = fds.map((fd) => host.mmapShared(fd, host.pageSize, 0));
  t.teardown(() => {
    for (const m of maps) host.munmap(m);
    for (const fd of fds) host.close(fd);
  });
  maps.forEach((m, i) => new Uint8Array(m).fill(0x40 + i));
  const at = [40n * PAGE, 41n * PAGE];
  // Asked for in one turn: the back-end channel sends both before QEMU's first answer.
  await Promise.all(fds.map((fd, i) => pages.mapShared({ shmid: 0, shmOffset: at[i]!, fd, fdOffset: 0n, length: PAGE, writable: true })));
  t.same(names.map((n) => qemuMappingsOf(rig.qemu.pid, n)), [1, 1], 'QEMU mapped both memfds');
  const w = (await transport.sharedMemory(0))!;
  t.same([...(await w.read(at[0]!, 4))], [0x40, 0x40, 0x40, 0x40], 'the first range shows the first fd');
  t.same([...(await w.read(at[1]!, 4))], [0x41, 0x41, 0x41, 0x41], 'the second range the second');
  await Promise.all(at.map((a) => pages.unmapShared(0, a, PAGE)));
  await until(() => names.every((n) => qemuMappingsOf(rig.qemu.pid, n) === 0), 'QEMU to munmap both memfds');
  t.equal(await w.readU32(at[1]!), 0, 'after both unmaps the ranges read 0');
  t.ok(rig.qemu.running, 'QEMU is running');
});

t.test('a map QEMU refuses rejects in the model and maps nothing; a disconnect drops what was mapped', async (t) => {
  const { rig, transport, pages } = await bringUp(t);
  const memfd = host.memfd('vrdma-shmem-e2e-gone', host.pageSize);
  const backend = host.mmapShared(memfd, host.pageSize, 0);
  t.teardown(() => {
    host.munmap(backend);
    host.close(memfd);
  });
  new DataView(backend).setUint32(0, 0x5eed5eed, true);
  // Past the end of the memfd: only QEMU can tell (the mapper does not look at the file), and it refuses.
  await t.rejects(
    pages.mapShared({ shmid: 5, shmOffset: 0n, fd: memfd, fdOffset: 4n * PAGE, length: PAGE, writable: true }),
    { name: 'ShmemRefusedError', message: /BACKEND_SHMEM_MAP \(9\) of region 5 .*the front-end refused it/ },
  );
  const session = await rig.backend.session();
  t.same(session.hostPages.shmem.describe(), [], 'the mapper keeps nothing of it');
  t.equal(qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-e2e-gone'), 0, 'QEMU mapped nothing');

  await pages.mapShared({ shmid: 5, shmOffset: 0n, fd: memfd, fdOffset: 0n, length: PAGE, writable: true });
  const w = (await transport.sharedMemory(5))!;
  t.equal(await w.readU32(0n), 0x5eed5eed);
  rig.backend.server.close(); // the back-end goes away
  await until(() => qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-e2e-gone') === 0, 'QEMU to drop the mapping');
  t.equal(session.hostPages.shmem.describe().length, 0, 'the mapper forgot it too');
  t.equal(session.hostPages.shmem.counters.dropped, 1);
  t.equal(await w.readU32(0n), 0, 'the guest reads 0 there');
  t.ok(rig.qemu.running, 'QEMU is running');
});

t.test('many map/unmap cycles at reused offsets, read-only and writable, the guest reading between them: QEMU stays up', async (t) => {
  // The mapped data path maps and unmaps rxe queues at reused offsets for every QP a guest creates and destroys.
  // QEMU's first SHMEM edit let the device own each mapping's memory region and freed the mapping after an RCU
  // grace period; a FlatView released later still reached the freed region, and QEMU aborted in free() after a few
  // cycles ("munmap_chunk(): invalid pointer"). Each mapping's region now owns itself and goes with its last reference.
  const { rig, transport, pages } = await bringUp(t);
  const memfd = host.memfd('vrdma-shmem-cycles', 4 * host.pageSize);
  const backend = host.mmapShared(memfd, 4 * host.pageSize, 0);
  t.teardown(() => {
    host.munmap(backend);
    host.close(memfd);
  });
  const words = new DataView(backend);
  for (let p = 0; p < 4; p++) words.setUint32(p * host.pageSize, 0x1000 + p, true);
  const w = (await transport.sharedMemory(0))!;
  const CYCLES = 40;
  let seen = 0;
  for (let i = 0; i < CYCLES; i++) {
    const page = BigInt(i % 4);
    const at = (BigInt(i % 3) * 2n) * PAGE; // three offsets, reused
    const length = (i % 2 === 0 ? 1n : 2n) * PAGE;
    const fdOffset = page * PAGE > 4n * PAGE - length ? 0n : page * PAGE;
    await pages.mapShared({ shmid: 0, shmOffset: at, fd: memfd, fdOffset, length, writable: i % 5 !== 0 });
    if ((await w.readU32(at)) === 0x1000 + Number(fdOffset / PAGE)) seen++;
    await pages.unmapShared(0, at, length);
    if (!rig.qemu.running) break;
  }
  t.equal(seen, CYCLES, `the guest read the mapped page in each of ${CYCLES} cycles`);
  await until(() => qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-cycles') === 0, 'QEMU to munmap every mapping');
  t.equal(await w.readU32(0n), 0, 'nothing mapped at the end');
  t.ok(rig.qemu.running, 'QEMU is running');
});
