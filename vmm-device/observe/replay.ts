// Replays a recorded session (`vrdma-session/1`, from --record or a flight-recorder dump) against a fresh device
// model over the verbs test double, offline: the guest memory map of the recording, the queues it activated, and
// every chain the device popped, made available again with the bytes it carried. Each answer the device writes is
// compared with the recorded one (length and bytes), per queue and in order; every difference is reported.
//
// What a recording holds and what it cannot: the chains' readable bytes and the answers, not the rest of guest
// memory (CQ and QP rings, MR contents). Control requests and events replay exactly; the data path reads work
// requests from QP rings the recording does not have, so doorbell answers are compared but expected to differ
// unless the recording had none. Host values (QPNs, keys, attributes) come from the recording's tape of host
// answers (verbs-tape.ts) when it has one; without it they come from the test double, and a recording over real
// verbs differs there (the differences say where, by byte offset).

import { FakeVerbs, FakeAliasMapper } from '../verbs/fake-verbs.ts';
import { hostAttrOf } from '../verbs/host-verbs.ts';
import { ReplayingVerbs, type TapeDump } from './verbs-tape.ts';
import type { HostPageMapper } from '../virtio/device.ts';
import { RdmaDevice } from '../rdma/rdma-device.ts';
import { StaticAddressResolver, type GidTableEntry } from '../rdma/address-resolver.ts';
import type { DeviceQuotas } from '../rdma/limits.ts';
import { GuestMemory } from '../memory/guest-memory.ts';
import { SplitQueue } from '../virtqueue/split.ts';
import { RecordingLogger } from '../util/log.ts';
import type { FixtureEvent, SessionFixture } from './recorder.ts';

/** Longest wait for one control answer (FakeVerbs answers in microseconds; generous for a loaded machine). */
export const REPLAY_ANSWER_TIMEOUT_MS = 5000;
/** Where the replay's rings go: above every recorded region, aligned. */
const RING_ALIGN = 1 << 20;
const F_INDIRECT = 28n;
const F_EVENT_IDX = 29n;
const VIRTQ_DESC_F_NEXT = 1;
const VIRTQ_DESC_F_WRITE = 2;

export interface ReplayDifference {
  queue: number;
  /** The answer's position among the queue's answers (0-based). */
  answer: number;
  what: string;
  expected: string;
  actual: string;
}

export interface ReplayReport {
  chains: number;
  answersCompared: number;
  differences: ReplayDifference[];
  /** Recorded events the replay could not use, with why. */
  skipped: string[];
}

type Activate = Extract<FixtureEvent, { kind: 'activate' }>;
type Chain = Extract<FixtureEvent, { kind: 'chain' }>;
type Used = Extract<FixtureEvent, { kind: 'used' }>;

/** The driver side of one split ring in the replay's memory. */
class DriverRing {
  private readonly free: number[];
  private availIdx = 0;
  private usedSeen = 0;
  /** desc head -> the chain's writable segments (to read the answer back). */
  private readonly pending = new Map<number, { ids: number[]; writable: { addr: number; len: number }[] }>();

  constructor(
    readonly size: number,
    private readonly mem: GuestMemory,
    readonly descGpa: number,
    readonly availGpa: number,
    readonly usedGpa: number,
  ) {
    this.free = Array.from({ length: size }, (_, i) => i);
  }

  /** Makes `chain` available with its recorded bytes; false when the ring has no room for it. */
  add(chain: Chain): boolean {
    const segs = chain.segments;
    if (segs.length === 0 || segs.length > this.free.length) return false;
    const readable = Buffer.from(chain.readable, 'hex');
    let at = 0;
    const ids = segs.map(() => this.free.shift()!);
    const dv = new DataView(new ArrayBuffer(16));
    segs.forEach((s, i) => {
      if (!s.write) {
        const n = Math.min(s.len, readable.length - at);
        if (n > 0) this.mem.write(s.addr, readable.subarray(at, at + n));
        at += s.len;
      } else this.mem.write(s.addr, new Uint8Array(s.len));
      dv.setBigUint64(0, BigInt(s.addr), true);
      dv.setUint32(8, s.len, true);
      dv.setUint16(12, (i + 1 < segs.length ? VIRTQ_DESC_F_NEXT : 0) | (s.write ? VIRTQ_DESC_F_WRITE : 0), true);
      dv.setUint16(14, i + 1 < segs.length ? ids[i + 1]! : 0, true);
      this.mem.write(this.descGpa + 16 * ids[i]!, new Uint8Array(dv.buffer));
    });
    this.pending.set(ids[0]!, { ids, writable: segs.filter((s) => s.write) });
    const slot = new Uint8Array(2);
    new DataView(slot.buffer).setUint16(0, ids[0]!, true);
    this.mem.write(this.availGpa + 4 + 2 * (this.availIdx % this.size), slot);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    const idx = new Uint8Array(2);
    new DataView(idx.buffer).setUint16(0, this.availIdx, true);
    this.mem.write(this.availGpa + 2, idx);
    return true;
  }

  /** Used elements written since the last call, with the bytes of their writable part. */
  takeUsed(): { id: number; len: number; written: Uint8Array }[] {
    const hdr = new Uint8Array(4);
    this.mem.read(this.usedGpa, hdr);
    const idx = new DataView(hdr.buffer).getUint16(2, true);
    const out = [];
    while (this.usedSeen !== idx) {
      const e = new Uint8Array(8);
      this.mem.read(this.usedGpa + 4 + 8 * (this.usedSeen % this.size), e);
      const dv = new DataView(e.buffer);
      const id = dv.getUint32(0, true);
      const len = dv.getUint32(4, true);
      const p = this.pending.get(id);
      const segs = p?.writable ?? [];
      this.pending.delete(id);
      // A used id the replay never made available is the device's error: reported by the comparison, not freed.
      if (p !== undefined) this.free.push(...p.ids);
      const written = new Uint8Array(len);
      let done = 0;
      for (const s of segs) {
        if (done >= len) break;
        const n = Math.min(s.len, len - done);
        const part = new Uint8Array(n);
        this.mem.read(s.addr, part);
        written.set(part, done);
        done += n;
      }
      out.push({ id, len, written });
      this.usedSeen = (this.usedSeen + 1) & 0xffff;
    }
    return out;
  }
}

function acceptingMapper(regions: ReadonlyMap<number, bigint>): HostPageMapper {
  return {
    capabilities: () => ({ queueNotifier: false, sharedMemory: regions, missing: [] }),
    mapQueueNotifier: () => Promise.resolve(),
    unmapQueueNotifier: () => Promise.resolve(),
    mapShared: () => Promise.resolve(),
    unmapShared: () => Promise.resolve(),
  };
}

/** The inline capacity the recording's host reported (its first queryDevice answer on the tape), else 0. */
function recordedInlineCapacity(tape: TapeDump | undefined): number {
  const answer = tape?.entries.find((e) => e.call === 'queryDevice' && e.ok !== undefined)?.ok;
  const v = answer !== null && typeof answer === 'object' ? (answer as Record<string, unknown>)['maxInlineData'] : undefined;
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 ? v : 0;
}

function splitSizes(size: number) {
  return { desc: 16 * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/** A readable difference between two answers: the first differing offset and the bytes around it. */
function firstDifference(expected: Buffer, actual: Buffer): string {
  const n = Math.min(expected.length, actual.length);
  for (let i = 0; i < n; i++) if (expected[i] !== actual[i]) return `byte ${i}`;
  return `length ${expected.length} vs ${actual.length}`;
}

export interface ReplayOptions {
  /** Address table when the recording has none (a VPC session records only this VM's entry). */
  addressTable?: GidTableEntry[];
  log?: RecordingLogger;
}

/** Replays `f`; resolves with every difference. Throws only for a recording it cannot replay at all. */
export async function replaySession(f: SessionFixture, opts: ReplayOptions = {}): Promise<ReplayReport> {
  const events = f.events;
  const act = events.find((e): e is Activate => e.kind === 'activate');
  if (act === undefined) {
    throw new Error('the recording has no activation (DRIVER_OK): a flight-recorder window that starts later cannot be replayed; record with --record or a larger --flight-events');
  }
  if (act.queues.some((q) => q !== null && q.layout !== 'split')) throw new Error('replay of packed rings is not implemented (the recording is a packed session)');
  const device = f.device;
  const table = (opts.addressTable ?? (device['addressTable'] as GidTableEntry[] | undefined)) ?? [];
  const vmId = String(device['vm'] ?? 'vm0');
  if (!table.some((e) => e.vmId === vmId)) throw new Error(`the recording's device ${vmId} is not in its address table: give one (--gid-table)`);
  const rawQuotas = (device['quotas'] ?? {}) as Record<string, string | number>;
  const quotas: Partial<DeviceQuotas> = {};
  for (const [k, v] of Object.entries(rawQuotas)) (quotas as Record<string, unknown>)[k] = k === 'maxMrBytes' ? BigInt(v) : Number(v);

  // Guest memory: the recorded regions, plus one region above them for the replay's rings.
  const top = Math.max(0, ...act.regions.map((r) => r.gpa + r.size));
  const ringBase = Math.ceil(top / RING_ALIGN) * RING_ALIGN + RING_ALIGN;
  let ringBytes = 0;
  const layout = act.queues.map((q) => {
    if (q === null) return undefined;
    const s = splitSizes(q.size);
    const at = { desc: ringBase + ringBytes, avail: 0, used: 0 };
    ringBytes += Math.ceil(s.desc / 16) * 16;
    at.avail = ringBase + ringBytes;
    ringBytes += Math.ceil(s.avail / 8) * 8;
    at.used = ringBase + ringBytes;
    ringBytes += Math.ceil(s.used / 8) * 8;
    return at;
  });
  const specs = [...act.regions.map((r) => ({ guestPhysAddr: r.gpa, size: r.size, buffer: new ArrayBuffer(r.size) })), { guestPhysAddr: ringBase, size: Math.max(8, ringBytes), buffer: new ArrayBuffer(Math.max(8, ringBytes)) }];
  const memory = new GuestMemory(specs);
  const features = BigInt(act.features);
  const drivers: (DriverRing | undefined)[] = [];
  const queues = act.queues.map((q, i) => {
    if (q === null) return undefined;
    const at = layout[i]!;
    const s = splitSizes(q.size);
    drivers[i] = new DriverRing(q.size, memory, at.desc, at.avail, at.used);
    return new SplitQueue({
      size: q.size,
      rings: { desc: memory.contiguous(at.desc, s.desc)!, driver: memory.contiguous(at.avail, s.avail)!, device: memory.contiguous(at.used, s.used)! },
      memory,
      eventIdx: (features & (1n << F_EVENT_IDX)) !== 0n,
      indirect: (features & (1n << F_INDIRECT)) !== 0n,
    });
  });

  // The double must accept what the recording's host accepted: its inline capacity (DeviceAttr.maxInlineData) is the
  // one the recorded host reported, so that QPs created with inline data are created here too.
  const verbs = new FakeVerbs({ maxInlineData: recordedInlineCapacity(f.hostVerbs) });
  const log = opts.log ?? new RecordingLogger('replay');
  // The backend reads the host's limits once before its device opens (cli/admission.ts): the same calls here, so
  // that the test double numbers the objects that follow (handles, QPNs, keys) as the recording's backend did.
  await hostAttrOf(verbs, 'fake0');
  // The recording's host answers, when it has them: the replay's QPNs, keys and attributes are the recording's.
  const replaying = f.hostVerbs === undefined ? undefined : new ReplayingVerbs(verbs, f.hostVerbs);
  const mode = device['hostQueueMapping'];
  const maxMapped = device['maxMappedQueues'];
  const model = await RdmaDevice.open({
    verbs: replaying ?? verbs,
    hostDevice: 'fake0',
    vmId,
    resolver: new StaticAddressResolver(table),
    quotas,
    log,
    aliases: new FakeAliasMapper(),
    ...(mode === 'polled' || mode === 'notify' || mode === 'off' ? { hostQueueMapping: mode } : {}),
    ...(typeof maxMapped === 'number' ? { maxMappedQueues: maxMapped } : {}),
  });
  // Mapped queues (spec 13) are mapped by the VMM, which a replay has none of: every mapping is confirmed, as the
  // recording's VMM confirmed it (a refusal there shows in the recorded answer, and then differs here).
  const hostPages = acceptingMapper(model.sharedMemoryRegions ?? new Map());
  const report: ReplayReport = { chains: 0, answersCompared: 0, differences: [], skipped: [] };
  const recordedUsed = new Map<number, Used[]>();
  for (const e of events) if (e.kind === 'used') recordedUsed.set(e.queue, [...(recordedUsed.get(e.queue) ?? []), e]);
  const actualUsed = new Map<number, { len: number; written: Uint8Array }[]>();
  const collect = () => {
    drivers.forEach((d, q) => {
      if (d === undefined) return;
      for (const u of d.takeUsed()) actualUsed.set(q, [...(actualUsed.get(q) ?? []), u]);
    });
  };
  const broken: string[] = [];
  try {
    model.activate({
      features,
      memory,
      queues,
      interrupt: () => undefined,
      queueBroken: (i, e) => broken.push(`queue ${i} broken: ${e.message}`),
      deviceFailed: (e) => broken.push(`device failed: ${e.message}`),
      hostPages,
      log,
    });
    const after = events.indexOf(act);
    for (const e of events.slice(after + 1)) {
      if (e.kind === 'reset' || e.kind === 'activate') {
        const later = events.slice(events.indexOf(e) + 1).filter((x) => x.kind === 'chain').length;
        if (later > 0) report.skipped.push(`${later} chains after the ${e.kind} at event ${e.seq}: the replay covers the first activation only`);
        break;
      }
      if (e.kind !== 'chain') continue;
      const d = drivers[e.queue];
      if (d === undefined) {
        report.skipped.push(`chain on queue ${e.queue} (not activated) at event ${e.seq}`);
        continue;
      }
      if (e.truncated === true) report.skipped.push(`chain at event ${e.seq}: readable bytes cut at the recording limit`);
      if (!d.add(e)) {
        report.skipped.push(`chain at event ${e.seq}: no room in the replay's ring`);
        continue;
      }
      report.chains++;
      model.queueNotify(e.queue);
      if (e.queue === 0) {
        // Control requests are answered one by one: wait for this one before the next, as the recording did.
        const want = (actualUsed.get(0)?.length ?? 0) + 1;
        const deadline = Date.now() + REPLAY_ANSWER_TIMEOUT_MS;
        for (;;) {
          collect();
          if ((actualUsed.get(0)?.length ?? 0) >= want || broken.length > 0 || Date.now() > deadline) break;
          await new Promise((r) => setTimeout(r, 1));
        }
      } else {
        await new Promise((r) => setImmediate(r));
        collect();
      }
    }
    // Late answers (events raised by the last requests).
    for (let i = 0; i < 20; i++) {
      await new Promise((r) => setTimeout(r, 5));
      collect();
    }
  } finally {
    replaying?.stopFollowing();
    model.reset();
    await model.close();
  }
  for (const [q, rec] of recordedUsed) {
    const act2 = actualUsed.get(q) ?? [];
    rec.forEach((r, k) => {
      const a = act2[k];
      report.answersCompared++;
      if (a === undefined) {
        report.differences.push({ queue: q, answer: k, what: 'no answer', expected: `len ${r.len} ${r.written}`, actual: '(none)' });
        return;
      }
      const exp = Buffer.from(r.written, 'hex');
      const got = Buffer.from(a.written.subarray(0, Math.min(a.written.length, exp.length + (a.len > r.len ? a.len - r.len : 0))));
      if (a.len !== r.len || !exp.equals(Buffer.from(a.written.subarray(0, exp.length))) || (r.truncated !== true && a.written.length !== exp.length)) {
        report.differences.push({ queue: q, answer: k, what: `len ${r.len} vs ${a.len}, first difference at ${firstDifference(exp, got)}`, expected: r.written, actual: Buffer.from(a.written).toString('hex') });
      }
    });
    for (let k = rec.length; k < act2.length; k++) {
      report.differences.push({ queue: q, answer: k, what: 'an answer the recording does not have', expected: '(none)', actual: Buffer.from(act2[k]!.written).toString('hex') });
    }
  }
  if (replaying !== undefined) for (const m of replaying.mismatches) report.skipped.push(`host answers: ${m}`);
  // NEEDS_RESET must come (or not) as in the recording.
  const recordedBroken = events.filter((e) => e.kind === 'broken' || e.kind === 'failed').map((e) => (e.kind === 'broken' ? `queue ${e.queue} broken: ${e.error}` : e.kind === 'failed' ? `device failed: ${e.error}` : ''));
  if (recordedBroken.join('\n') !== broken.join('\n')) {
    report.differences.push({ queue: -1, answer: -1, what: 'NEEDS_RESET differs', expected: recordedBroken.join('; ') || '(none)', actual: broken.join('; ') || '(none)' });
  }
  return report;
}
