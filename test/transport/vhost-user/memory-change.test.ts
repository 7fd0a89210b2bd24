// A new guest memory map while the device runs (ADD_MEM_REG, REM_MEM_REG, SET_MEM_TABLE after DRIVER_OK) reaches
// the active device model through the core (memoryChanged) before any dropped region is unmapped: during the call
// the old map still reads, the queues the model reads are already rebuilt over the new map; after the request the
// dropped region is gone (its views are detached). Real socket, memfd RAM, eventfds, the reference front-end.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { EchoDevice } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { host, negotiate, rig, startRing } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import type { GuestMemory } from '../../../vmm-device/memory/guest-memory.ts';
import type { ActivationContext } from '../../../vmm-device/virtio/device.ts';
import { bit } from '../../../vmm-device/transport/vhost-user/messages.ts';

const MARK_GPA = 0x100000;
const MARK = Uint8Array.of(0xde, 0xad, 0xbe, 0xef);

interface Seen {
  /** The marker as read through the previous map during the call (undefined: unreadable). */
  oldRead: number[] | undefined;
  /** The new map holds the marker's address. */
  newHasMark: boolean;
  /** Queue 0 as the model reads it during the call: the activation-time object, a rebuilt one, or none. */
  queue0: 'same' | 'rebuilt' | 'none';
}

/** The echo device, recording each memoryChanged and what it could read then. */
class WatchingEcho extends EchoDevice {
  readonly seen: Seen[] = [];
  private current: GuestMemory | undefined;
  private lastQueue: unknown;
  /** A view into the marker through the map active before the last change (to see it detached after). */
  oldView: Uint8Array | undefined;

  override activate(ctx: ActivationContext): void {
    super.activate(ctx);
    this.current = ctx.memory;
    this.lastQueue = ctx.queues[0];
  }

  memoryChanged(memory: GuestMemory): void {
    const old = this.current!;
    let oldRead: number[] | undefined;
    try {
      const b = new Uint8Array(4);
      old.read(MARK_GPA, b);
      oldRead = [...b];
      this.oldView = old.contiguous(MARK_GPA, 4);
    } catch {
      oldRead = undefined;
    }
    const q = this.ctx!.queues[0];
    this.seen.push({ oldRead, newHasMark: memory.isValidRange(MARK_GPA, 4), queue0: q === undefined ? 'none' : q === this.lastQueue ? 'same' : 'rebuilt' });
    this.current = memory;
    this.lastQueue = q;
  }
}

type T = Pick<typeof t, 'ok' | 'same'>;

async function started(device: WatchingEcho) {
  const r = await rig({ queues: 1, device });
  await negotiate(r);
  await r.fe.setFeatures(bit(32) | bit(30));
  const ram = r.ram([{ gpa: 0, size: 0x20000 }, { gpa: MARK_GPA, size: 0x10000 }]);
  for (const reg of ram.regions) await r.fe.addMemReg(reg);
  const alloc = new GuestAllocator(ram, 0);
  const d = await startRing(r, ram, alloc, 0, 16);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  ram.memory.write(MARK_GPA, MARK);
  return { r, ram, alloc, d };
}

async function echoWorks(t: T, r: Awaited<ReturnType<typeof rig>>, ram: GuestRam, alloc: GuestAllocator, d: Awaited<ReturnType<typeof startRing>>, word: string): Promise<void> {
  const req = new TextEncoder().encode(word);
  const p = d.post(alloc, req, 16);
  r.fe.kick(0);
  t.ok((await r.fe.waitCall(0)) > 0n, `${word}: call eventfd fired`);
  t.same(d.readUsed(), [{ id: p.head, len: req.length }], `${word}: used`);
  const back = new Uint8Array(req.length);
  ram.memory.read(p.responseAddr, back);
  t.same(back, req, `${word}: the answer is in guest RAM`);
}

t.test('REM_MEM_REG after DRIVER_OK: the model is told while the dropped region is still mapped, then it is unmapped', async (t) => {
  const device = new WatchingEcho(1);
  const { r, ram, alloc, d } = await started(device);
  t.ok(r.session().core.isActive);
  await r.fe.remMemReg(ram.regions[1]!);
  await r.fe.sync();
  t.equal(device.seen.length, 1, 'memoryChanged called once');
  t.same(device.seen[0]!.oldRead, [...MARK], 'during the call the old map still reads the dropped region');
  t.equal(device.seen[0]!.newHasMark, false, 'the new map no longer has it');
  t.equal(device.seen[0]!.queue0, 'rebuilt', 'the queue the model reads is already rebuilt over the new map');
  t.equal(device.oldView?.byteLength, 0, 'after the request the dropped region is unmapped (views detached)');
  t.equal(r.session().core.counters.memoryChanges, 1);
  t.equal(r.session().core.deviceStatus & 0x40, 0, 'no NEEDS_RESET: the rings live in the region that stayed');
  await echoWorks(t, r, ram, alloc, d, 'after-removal');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('ADD_MEM_REG after DRIVER_OK: the model is told, the rebuilt queue reaches buffers in the hot-added region', async (t) => {
  const device = new WatchingEcho(1);
  const { r, ram, d } = await started(device);
  const added = ram.add({ gpa: 0x200000, size: 0x10000 });
  await r.fe.addMemReg(added);
  await r.fe.sync();
  t.equal(device.seen.length, 1);
  t.same(device.seen[0]!.oldRead, [...MARK], 'nothing dropped: the old map still reads');
  t.equal(device.seen[0]!.newHasMark, true);
  t.equal(device.seen[0]!.queue0, 'rebuilt');
  // Buffers in the new region: only a queue over the new map can translate them.
  await echoWorks(t, r, ram, new GuestAllocator(ram, 2), d, 'in-hot-added-ram');
  t.equal(r.session().core.deviceStatus & 0x40, 0);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('SET_MEM_TABLE after DRIVER_OK without the ring region: told first, the ring breaks (NEEDS_RESET), no crash', async (t) => {
  const device = new WatchingEcho(1);
  const { r, ram } = await started(device);
  // A table that keeps only the marker region: the ring's region is dropped under the live ring.
  const other = new GuestRam(host, [{ gpa: 0x300000, size: 0x10000 }]);
  try {
    await r.fe.setMemTable([ram.regions[1]!, other.regions[0]!]);
    await r.fe.sync();
    t.equal(device.seen.length, 1, 'memoryChanged called once');
    t.same(device.seen[0]!.oldRead, [...MARK], 'the old map reads during the call');
    t.equal(device.seen[0]!.newHasMark, true);
    t.equal(device.seen[0]!.queue0, 'none', 'queue 0 could not be rebuilt: the model no longer sees it (nothing points into the dropped region)');
    t.equal((await r.fe.getStatus()) & 0x40, 0x40, 'NEEDS_RESET: the ring is outside guest memory now');
    t.equal(r.session().describe().rings[0]!.started, false);
    await r.fe.setStatus(0);
    t.equal(await r.fe.getStatus(), 0, 'the reset works; the back-end goes on');
  } finally {
    r.fe.close();
    other.release();
  }
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
