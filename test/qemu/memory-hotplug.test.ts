// RAM hot-added to a real QEMU (the project's patched build, under qtest) after DRIVER_OK, through QMP as a
// management layer does it: object_add of a shared memfd backend, device_add of a pc-dimm on it. QEMU maps the DIMM
// into the guest's address space at once (no guest OS is needed to online it for that) and its vhost-user
// front-end tells this process's back-end about the new region; the test checks which message carries it, that
// the session's map and the device model see it, that guest stores and back-end stores meet in it, and that a
// virtqueue's buffers placed in it are served. The invert test device stands behind (no RDMA needed here).
import t from 'tap';
import { host, startRig, sysStatsSettled, until, QUEUES, QUEUE_SIZE, type FrontendMessage } from '../../guest-driver-spec/qtest/rig/vhost-user-rig.ts';
import { INVERT_F_TEST } from '../../guest-driver-spec/qtest/rig/invert-device.ts';
import { QtestTransport } from '../../guest-driver-spec/driver/qtest-transport.ts';
import { DriverMemoryError } from '../../guest-driver-spec/driver/memory.ts';
import { TransportError } from '../../guest-driver-spec/driver/transport.ts';
import { GuestRam, QmpError, hotAddMemory, queryDimms, type QtestSplitQueue, type VirtioPciDevice } from '../../guest-driver-spec/qtest/index.ts';

const MIB = 1024 * 1024;
const RAM_MIB = 128;
const DIMM_MIB = 64;
/** On pc, device memory starts at the first GiB boundary at or above the end of RAM above 4 GiB (none here). */
const DEVICE_MEMORY_BASE = 0x1_0000_0000;
/** Room for one DIMM of DIMM_MIB (a second one does not fit: the refusal is tested). */
const HOTPLUG = { slots: 2, maxMiB: RAM_MIB + DIMM_MIB };

const bytes = (text: string): Uint8Array => new TextEncoder().encode(text);
const inverted = (b: Uint8Array): number[] => [...b].map((x) => x ^ 0xff);
const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed * 17 + (i >> 8)) & 0xff);

/** The region an ADD_MEM_REG carries (vhost-user.rst: u64 padding, then guest address, size, user address, offset). */
function addMemRegRegion(m: FrontendMessage): { gpa: number; size: number; userAddr: number; mmapOffset: number } {
  const v = new DataView(m.payload.buffer, m.payload.byteOffset, m.payload.byteLength);
  const u64 = (o: number): number => Number(v.getBigUint64(o, true));
  return { gpa: u64(8), size: u64(16), userAddr: u64(24), mmapOffset: u64(32) };
}

async function bringUp(dev: VirtioPciDevice, ram: GuestRam): Promise<QtestSplitQueue[]> {
  await dev.negotiate(INVERT_F_TEST);
  const queues: QtestSplitQueue[] = [];
  for (let i = 0; i < QUEUES; i++) queues.push(await dev.setupQueue(i, ram, QUEUE_SIZE));
  await dev.driverOk();
  return queues;
}

t.test('RAM hot-added after DRIVER_OK: ADD_MEM_REG at the DIMM address, seen by the session and the device, served', async (t) => {
  const rig = await startRig({ qemu: { ramMiB: RAM_MIB, qmp: true, hotplug: HOTPLUG } });
  t.teardown(() => rig.finish());
  const { dev, backend, qemu } = rig;
  const qmp = qemu.qmp!;
  t.ok(qmp !== undefined, 'QEMU was started with a QMP channel');
  const greeting = await qmp.greeting;
  t.equal(greeting.version.qemu.major, 10, `QMP greeting from QEMU ${greeting.version.qemu.major}.${greeting.version.qemu.minor}`);
  t.match(await qmp.execute('query-status'), { status: 'running' }, 'capabilities negotiated: commands run');
  await t.rejects(qmp.execute('no-such-command'), { name: 'QmpError', errorClass: 'CommandNotFound' }, 'an unknown command is a QmpError');
  t.same(await queryDimms(qmp), [], 'no DIMM at start');

  const queues = await bringUp(dev, rig.ram);
  const session = await backend.session();
  await until(() => backend.device.activations === 1, 'the back-end device to activate');
  const mapsAtStart = backend.device.memoryMaps.length;
  const seenBefore = backend.requests.length;
  // With CONFIGURE_MEM_SLOTS negotiated QEMU never sends SET_MEM_TABLE: the boot RAM (split around the legacy VGA
  // hole) arrives as ADD_MEM_REGs too.
  const atStart = backend.requests.filter((m) => /MEM/.test(m.name)).map((m) => m.name);
  t.ok(atStart.includes('ADD_MEM_REG') && !atStart.includes('SET_MEM_TABLE'), `memory messages at start: ${atStart.join(', ')}`);
  const regionsBefore = session.guestMemory.regionList.length;
  const statsBefore = await sysStatsSettled();

  const dimm = await hotAddMemory(qmp, { id: 'dimm0', sizeMiB: DIMM_MIB });
  t.match(dimm, { id: 'dimm0', memdev: '/objects/dimm0-mem', size: DIMM_MIB * MIB, slot: 0, hotplugged: true, hotpluggable: true });
  t.equal(dimm.gpa, DEVICE_MEMORY_BASE, `the DIMM landed at 0x${dimm.gpa.toString(16)} (device memory base on pc)`);
  await until(() => session.guestMemory.findRegion(dimm.gpa) !== undefined, 'the back-end to map the DIMM');

  const sent = backend.requests.slice(seenBefore);
  t.same(sent.map((m) => m.name), ['ADD_MEM_REG'], 'QEMU 10.0 sent exactly one ADD_MEM_REG for the DIMM (CONFIGURE_MEM_SLOTS negotiated), no SET_MEM_TABLE');
  const add = sent[0]!;
  t.equal(add.fdCount, 1, "with the DIMM backend's memfd");
  t.match(addMemRegRegion(add), { gpa: dimm.gpa, size: dimm.size, mmapOffset: 0 }, 'the region is the DIMM: its guest address and size');
  t.equal(session.guestMemory.regionList.length, regionsBefore + 1, 'the session map has one region more');
  const region = session.guestMemory.findRegion(dimm.gpa)!;
  t.same([region.guestPhysAddr, region.size], [dimm.gpa, dimm.size], "the session's new region is the DIMM");
  t.equal(backend.device.memoryMaps.length, mapsAtStart + 1, 'the device model was told of the new map once (memoryChanged)');
  t.ok(backend.device.memoryMaps.at(-1)!.isValidRange(dimm.gpa, dimm.size), "the model's new map covers the DIMM");
  t.equal((await sysStatsSettled()).mappings, statsBefore.mappings + 1, 'the back-end mapped the DIMM once');

  // Guest stores (qtest: through QEMU's address space) and back-end stores (its own mapping) are the same bytes.
  const guestBytes = pattern(8192, 1);
  await qemu.qtest.write(dimm.gpa + 4096, guestBytes);
  const seen = new Uint8Array(guestBytes.length);
  session.guestMemory.read(dimm.gpa + 4096, seen);
  t.same(seen, guestBytes, 'a guest store into the DIMM is in the back-end mapping');
  const tail = pattern(64, 2);
  session.guestMemory.write(dimm.gpa + dimm.size - tail.length, tail);
  t.same(await qemu.qtest.read(dimm.gpa + dimm.size - tail.length, tail.length), tail, "a back-end store at the DIMM's last bytes is what the guest reads");
  t.notOk(session.guestMemory.isValidRange(dimm.gpa + dimm.size, 1), 'the byte after the DIMM is not guest RAM');

  // A chain whose request and answer buffers both live in the DIMM is served (the rings stay in boot RAM).
  const inDimm = GuestRam.range(dimm.gpa + 1 * MIB, 1 * MIB);
  const request = bytes('buffers in hot-added RAM');
  const head = await queues[0]!.add([request], [request.length], inDimm);
  await dev.notify(queues[0]!);
  const [used] = await queues[0]!.waitUsed(1);
  t.equal(used?.id, head);
  t.same([...(used?.written ?? [])], inverted(request), 'the device read and wrote buffers in the DIMM');

  // The reference driver's qtest transport maps the DIMM (QEMU's memfd, found like the boot RAM's) and allocates in
  // it on request: what the driver needs to place a ring or an MR there.
  const transport = await QtestTransport.open({ qemu, host, virtioId: 42 });
  try {
    const range = transport.addRam(dimm.gpa, dimm.size);
    t.same(range, { gpa: dimm.gpa, size: dimm.size });
    const gpa = transport.memory.alloc(3 * 4096, 4096, range);
    t.ok(gpa >= dimm.gpa && gpa + 3 * 4096 <= dimm.gpa + dimm.size, `an allocation confined to the DIMM is in it (0x${gpa.toString(16)})`);
    t.ok(transport.memory.alloc(4096) < dimm.gpa, 'an unconfined one still comes from boot RAM first');
    const driverBytes = pattern(3 * 4096, 4);
    transport.memory.write(gpa, driverBytes);
    t.same(await qemu.qtest.read(gpa, driverBytes.length), driverBytes, 'a driver store into the DIMM is what QEMU reads there');
    const backendView = new Uint8Array(driverBytes.length);
    session.guestMemory.read(gpa, backendView);
    t.same(backendView, driverBytes, 'and what the back-end reads there');
    t.throws(() => transport.addRam(dimm.gpa, dimm.size), TransportError, 'the same DIMM cannot be mapped twice (no other memfd of its size)');
    t.throws(() => transport.memory.alloc(4096, 4096, { gpa: dimm.gpa + dimm.size, size: 4096 }), DriverMemoryError, 'a range that is not RAM is refused');
    t.throws(() => transport.memory.alloc(dimm.size, 4096, range), DriverMemoryError, 'the DIMM has less free than its size now');
  } finally {
    await transport.close();
  }

  // Refusals leave nothing behind and reach nothing to the back-end.
  const seenAfterAdd = backend.requests.length;
  await t.rejects(hotAddMemory(qmp, { id: 'dimm1', sizeMiB: DIMM_MIB }), QmpError, 'a second DIMM beyond maxmem is refused');
  await t.rejects(hotAddMemory(qmp, { id: 'dimm0', sizeMiB: 1 }), QmpError, 'a duplicate device id is refused');
  t.same((await queryDimms(qmp)).map((d) => d.id), ['dimm0'], 'still one DIMM');
  const objects = await qmp.execute<{ name: string }[]>('qom-list', { path: '/objects' });
  t.same(objects.map((o) => o.name).filter((n) => n.startsWith('dimm')).sort(), ['dimm0-mem'], 'the refused attempts left no backend object');
  t.same(backend.requests.slice(seenAfterAdd).map((m) => m.name), [], 'no memory message for a refused DIMM');
  t.equal(session.guestMemory.regionList.length, regionsBefore + 1);
  t.equal(backend.server.closeReasons.length, 0, 'the connection stayed up throughout');
});

t.test('QEMU without memory slots refuses a DIMM; nothing reaches the back-end', async (t) => {
  const rig = await startRig({ qemu: { ramMiB: RAM_MIB, qmp: true } });
  t.teardown(() => rig.finish());
  const { dev, backend, qemu } = rig;
  await bringUp(dev, rig.ram);
  const session = await backend.session();
  await until(() => backend.device.activations === 1, 'the back-end device to activate');
  const seenBefore = backend.requests.length;
  const regions = session.guestMemory.regionList.length;
  const refusal = await hotAddMemory(qemu.qmp!, { id: 'dimm0', sizeMiB: DIMM_MIB }).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.type(refusal, QmpError);
  t.match((refusal as QmpError).desc, /slots/, `QEMU says why: ${(refusal as QmpError).desc}`);
  t.same(await queryDimms(qemu.qmp!), []);
  t.same(backend.requests.slice(seenBefore).map((m) => m.name), [], 'no memory message');
  t.equal(session.guestMemory.regionList.length, regions);
});
