// The flight recorder: what happened to one device lately, kept in a bounded FIFO (ringbufferjs evicts the oldest
// entry), and dumped as a session fixture (format `vrdma-session/1`, fixtures/README.md) when something goes wrong:
// NEEDS_RESET, a broken queue, SIGUSR1, `vrdma-backend status --dump`. `--record FILE` keeps the whole session
// instead (bounded too) and writes it at shutdown. Producers only see `EventRecorder.record(event)`, so the
// transport and the device need no knowledge of where events go.

import fs from 'node:fs';
import RingBuffer from 'ringbufferjs';
import type { TapeDump, VerbsTape } from './verbs-tape.ts';
import { HEADER_SIZE, decodeHeader, decodeInflight, FrontendRequest as R, requestName } from '../transport/vhost-user/messages.ts';

export const SESSION_FORMAT = 'vrdma-session/1';
/** Events the flight recorder keeps by default (a few seconds of control traffic; enough to see how it broke). */
export const DEFAULT_FLIGHT_EVENTS = 4096;
export const MAX_FLIGHT_EVENTS = 1 << 20;
/** Events a whole-session recording keeps; past it the recording says how many it dropped. */
export const MAX_RECORD_EVENTS = 1 << 21;
/** Bytes of a chain's readable or written part a record carries (a control request is at most a few KiB). */
export const MAX_RECORDED_BYTES = 64 << 10;

/**
 * Bytes and segments are kept as the producer gave them (a Uint8Array copy, the chain's flat segment list) and
 * turned into hex and objects only when a fixture is written: the data path pays a copy, not an encoding.
 */
export type Bytes = string | Uint8Array;
/** Flat [addr0, len0, addr1, len1, ...] with the first `readable` segments device-readable, or the written form. */
export type Segments = { addr: number; len: number; write: boolean }[] | { flat: readonly number[]; readable: number };

export type RecordedEvent =
  /** A vhost-user message as it crossed the socket (header and payload), with the number of fds it carried. */
  | { kind: 'message'; dir: 'in' | 'out'; request: string; hex: Bytes; fdCount: number }
  /** DRIVER_OK: the features and the queues the device was given, and the guest memory map then. */
  | { kind: 'activate'; features: string; queues: ({ index: number; size: number; layout: string } | null)[]; regions: { gpa: number; size: number }[] }
  | { kind: 'memory'; regions: { gpa: number; size: number }[] }
  | { kind: 'kick'; queue: number }
  /** A chain the device popped: its segments, and its readable bytes (cut at MAX_RECORDED_BYTES: `truncated`). */
  | { kind: 'chain'; queue: number; id: number; segments: Segments; readable: Bytes; truncated?: boolean }
  /** pop() returned the error that broke the queue. */
  | { kind: 'pop-error'; queue: number; error: string }
  /** A chain returned to the driver: `len` bytes written, and those bytes. */
  | { kind: 'used'; queue: number; id: number; len: number; written: Bytes; truncated?: boolean }
  | { kind: 'interrupt'; queue: number }
  | { kind: 'broken'; queue: number; error: string }
  | { kind: 'failed'; error: string }
  | { kind: 'reset' }
  | { kind: 'closed'; reason: string };

export type StampedEvent = RecordedEvent & { seq: number; t: number };

type Jsonish<E> = E extends { segments: Segments } ? Omit<E, 'segments' | 'readable'> & { segments: { addr: number; len: number; write: boolean }[]; readable: string } : E extends { written: Bytes } ? Omit<E, 'written'> & { written: string } : E extends { hex: Bytes } ? Omit<E, 'hex'> & { hex: string } : E;
/** An event as a fixture holds it: bytes as hex, segments as objects. */
export type FixtureEvent = Jsonish<StampedEvent>;

const toHex = (b: Bytes): string => (typeof b === 'string' ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex'));

/** The fixture form of an event (see FixtureEvent). */
export function toFixtureEvent(e: StampedEvent): FixtureEvent {
  switch (e.kind) {
    case 'message':
      return { ...e, hex: toHex(e.hex) };
    case 'used':
      return { ...e, written: toHex(e.written) };
    case 'chain': {
      const segs = e.segments;
      const segments = Array.isArray(segs)
        ? segs
        : Array.from({ length: segs.flat.length >> 1 }, (_, i) => ({ addr: segs.flat[2 * i]!, len: segs.flat[2 * i + 1]!, write: i >= segs.readable }));
      return { ...e, segments, readable: toHex(e.readable) };
    }
    default:
      return e as FixtureEvent;
  }
}

/** What a producer sees. */
export interface EventRecorder {
  record(e: RecordedEvent): void;
}

export const NO_RECORDER: EventRecorder = { record: () => undefined };

export type FdSpec = { kind: 'memfd'; size: number } | { kind: 'eventfd' } | { kind: 'socket' };

/** The fds a front-end message carries, described by kind (as fixtures/vhost-user/README.md's `fds`). */
export function fdSpecsOf(bytes: Uint8Array, fdCount: number): FdSpec[] {
  if (fdCount === 0 || bytes.length < HEADER_SIZE) return [];
  const h = decodeHeader(bytes);
  const payload = bytes.subarray(HEADER_SIZE);
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  try {
    switch (h.request) {
      case R.SET_MEM_TABLE:
        return Array.from({ length: fdCount }, (_, i) => ({ kind: 'memfd' as const, size: Number(dv.getBigUint64(8 + 32 * i + 8, true) + dv.getBigUint64(8 + 32 * i + 24, true)) }));
      case R.ADD_MEM_REG:
        return [{ kind: 'memfd', size: Number(dv.getBigUint64(16, true) + dv.getBigUint64(32, true)) }];
      case R.SET_INFLIGHT_FD: {
        const d = decodeInflight(payload);
        return d === undefined ? [] : [{ kind: 'memfd', size: Number(d.mmapOffset + d.mmapSize) }];
      }
      case R.SET_BACKEND_REQ_FD:
        return [{ kind: 'socket' }];
      default:
        return Array.from({ length: fdCount }, () => ({ kind: 'eventfd' as const }));
    }
  } catch {
    // A message too short for what it claims (the session refused it): its fds are described as unknown eventfds.
    return Array.from({ length: fdCount }, () => ({ kind: 'eventfd' as const }));
  }
}

export interface SessionFixture {
  format: typeof SESSION_FORMAT;
  name: string;
  description: string;
  /** Why it was written: "SIGUSR1", "NEEDS_RESET: ...", "status --dump", "record". */
  trigger: string;
  device: Record<string, unknown>;
  /** Events the recorder had to drop (the flight recorder's window, or a recording past MAX_RECORD_EVENTS). */
  dropped: number;
  /** The vhost-user messages alone, as a `vrdma-vhost-user-exchange/1` fixture (fixtures/vhost-user/README.md). */
  exchange: { format: 'vrdma-vhost-user-exchange/1'; name: string; description: string; device: Record<string, unknown>; steps: unknown[] };
  /** Every event in order (messages included). */
  events: FixtureEvent[];
  /** The host's answers to the device's verbs (observe/verbs-tape.ts): what makes a replay's host values the recording's. */
  hostVerbs?: TapeDump;
}

export function exchangeSteps(events: readonly FixtureEvent[]): unknown[] {
  const steps: unknown[] = [];
  for (const e of events) {
    if (e.kind !== 'message') continue;
    const bytes = new Uint8Array(Buffer.from(e.hex, 'hex'));
    steps.push(e.dir === 'in' ? { dir: 'frontend->backend', request: e.request, hex: e.hex, fds: fdSpecsOf(bytes, e.fdCount) } : { dir: 'backend->frontend', request: e.request, hex: e.hex, fdCount: e.fdCount });
  }
  return steps;
}

export function buildFixture(name: string, trigger: string, device: Record<string, unknown>, stamped: readonly StampedEvent[], dropped: number, hostVerbs?: TapeDump): SessionFixture {
  const events = stamped.map(toFixtureEvent);
  const description = `${trigger}: ${events.length} events of device ${String(device['vm'] ?? '?')} (${dropped} older events not kept)`;
  return {
    format: SESSION_FORMAT,
    name,
    description,
    trigger,
    device,
    dropped,
    exchange: { format: 'vrdma-vhost-user-exchange/1', name, description: `vhost-user messages of ${name}`, device, steps: exchangeSteps(events) },
    events,
    ...(hostVerbs === undefined ? {} : { hostVerbs }),
  };
}

export interface FlightRecorderOptions {
  /** Events kept (DEFAULT_FLIGHT_EVENTS). */
  capacity?: number;
  /** Keep every event for `--record` (up to MAX_RECORD_EVENTS) besides the window. */
  recordAll?: boolean;
  /** Describes the device in dumps (vm id, host device, features offered). */
  device: Record<string, unknown>;
  now?: () => number;
  /** The host's answers to the device's verbs, written into every fixture (a replay answers with them). */
  tape?: VerbsTape;
}

/** One device's recorder. */
export class FlightRecorder implements EventRecorder {
  private readonly ring: RingBuffer<StampedEvent>;
  private readonly all: StampedEvent[] | undefined;
  private seq = 0;
  private allDropped = 0;
  readonly device: Record<string, unknown>;
  private readonly now: () => number;
  private readonly tape: VerbsTape | undefined;
  /** Dumps written (metrics). */
  dumps = 0;

  constructor(opts: FlightRecorderOptions) {
    const capacity = opts.capacity ?? DEFAULT_FLIGHT_EVENTS;
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > MAX_FLIGHT_EVENTS) throw new RangeError(`flight recorder capacity ${capacity}: 1..${MAX_FLIGHT_EVENTS}`);
    this.ring = new RingBuffer<StampedEvent>(capacity);
    this.all = opts.recordAll === true ? [] : undefined;
    this.device = opts.device;
    this.now = opts.now ?? Date.now;
    this.tape = opts.tape;
  }

  /** Takes `e` over (stamps it in place: no copy on the data path). */
  record(e: RecordedEvent): void {
    const stamped = e as StampedEvent;
    stamped.seq = this.seq++;
    stamped.t = this.now();
    this.ring.enq(stamped);
    if (this.all !== undefined) {
      if (this.all.length < MAX_RECORD_EVENTS) this.all.push(stamped);
      else this.allDropped++;
    }
  }

  /** Events seen so far. */
  get recorded(): number {
    return this.seq;
  }

  /** The last N events as a fixture. */
  window(name: string, trigger: string): SessionFixture {
    const events = this.ring.size() === 0 ? [] : this.ring.peekN(this.ring.size());
    return buildFixture(name, trigger, this.device, events, this.seq - events.length, this.tape?.dump());
  }

  /** The whole session (with --record). */
  session(name: string): SessionFixture | undefined {
    if (this.all === undefined) return undefined;
    return buildFixture(name, 'record', this.device, this.all, this.allDropped, this.tape?.dump());
  }

  /** Writes the window to `path` (atomically: a reader never sees half a file). */
  dumpTo(path: string, trigger: string): string {
    const name = path.replace(/^.*\//, '').replace(/\.json$/, '');
    writeJsonAtomic(path, this.window(name, trigger));
    this.dumps++;
    return path;
  }
}

export function writeJsonAtomic(path: string, value: unknown): void {
  const tmp = `${path}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(value, null, 1) + '\n', { mode: 0o600 });
  fs.renameSync(tmp, path);
}

export function readSessionFixture(path: string): SessionFixture {
  const f = JSON.parse(fs.readFileSync(path, 'utf8')) as SessionFixture;
  if (f === null || typeof f !== 'object' || f.format !== SESSION_FORMAT) throw new Error(`${path}: format ${String((f as { format?: unknown })?.format)}, expected ${SESSION_FORMAT}`);
  if (!Array.isArray(f.events)) throw new Error(`${path}: events: must be a list`);
  return f;
}

export { requestName };
