// What every fuzz target shares: the invariants issue 12 asks for, checked on every input.
//   - no uncaught exception: a target catches only the precise errors its code path is specified to give (a result
//     object, a protocol error, a spec status); anything else escapes to the engine, which records it as a crash.
//   - no access outside guest memory: AuditedMemory records every read or write outside the guest's regions before
//     failing it the usual way (a caller must check ranges first, so a recorded one is a finding even if caught).
//   - bounded memory: the heap after a forced GC may not keep growing (checked every HEAP_CHECK_EVERY inputs once the
//     warm-up is over), and host objects created over FakeVerbs must all be released after a reset.
import v8 from 'node:v8';
import vm from 'node:vm';
import fs from 'node:fs';
import type { Logger } from '../../../vmm-device/util/log.ts';
import { GuestMemory, type MemoryRegionSpec } from '../../../vmm-device/memory/guest-memory.ts';

/** Inputs between two heap checks, and before the first (caches, JIT and the corpus settle), for fast targets. */
export const HEAP_CHECK_EVERY = 20_000;
/** The same for the RDMA targets, which run a few hundred inputs a second at best. */
export const HEAP_CHECK_EVERY_SLOW = 500;
/** Growth of the post-GC heap over the first checked value that counts as unbounded. */
export const HEAP_GROWTH_LIMIT = 64 << 20;

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

let inputs = 0;
let baseline = -1;

/** Called once per input; throws when the heap grew past the limit (a leak the engine reports with the input). */
export function countInput(target: string, every = HEAP_CHECK_EVERY): void {
  inputs++;
  if (inputs < every || inputs % every !== 0) return;
  gc();
  const used = process.memoryUsage().heapUsed;
  if (baseline < 0) baseline = used;
  else if (used - baseline > HEAP_GROWTH_LIMIT) {
    throw new FuzzInvariantError(`${target}: heap grew by ${((used - baseline) / 2 ** 20).toFixed(1)} MiB after ${inputs} inputs`);
  }
}

/** A broken invariant: always escapes to the engine. */
export class FuzzInvariantError extends Error {
  override name = 'FuzzInvariantError';
}

export function invariant(cond: unknown, what: string): asserts cond {
  if (!cond) throw new FuzzInvariantError(what);
}

/** Guest memory that records every read or write the device attempts outside it (before failing it as usual). */
export class AuditedMemory extends GuestMemory {
  outside: string[] = [];

  override read(gpa: number, dest: Uint8Array): void {
    if (!this.isValidRange(gpa, dest.length)) this.outside.push(`read [0x${gpa.toString(16)}, +${dest.length})`);
    super.read(gpa, dest);
  }

  override write(gpa: number, src: Uint8Array): void {
    if (!this.isValidRange(gpa, src.length)) this.outside.push(`write [0x${gpa.toString(16)}, +${src.length})`);
    super.write(gpa, src);
  }

  /** Throws if any access fell outside guest memory since the last call. */
  assertInside(target: string): void {
    if (this.outside.length > 0) {
      const what = this.outside.slice(0, 4).join(', ');
      this.outside = [];
      throw new FuzzInvariantError(`${target}: access outside guest memory: ${what}`);
    }
  }
}

export function auditedMemory(specs: MemoryRegionSpec[]): AuditedMemory {
  return new AuditedMemory(specs);
}

/** Reads the input as a little-endian byte stream; past its end every read answers zero (so any input is valid). */
export class ByteReader {
  private at = 0;
  constructor(readonly data: Uint8Array) {}
  get remaining(): number {
    return Math.max(0, this.data.length - this.at);
  }
  u8(): number {
    return this.at < this.data.length ? this.data[this.at++]! : 0;
  }
  u16(): number {
    return this.u8() | (this.u8() << 8);
  }
  u32(): number {
    return (this.u16() | (this.u16() << 16)) >>> 0;
  }
  u64(): bigint {
    const lo = BigInt(this.u32());
    return lo | (BigInt(this.u32()) << 32n);
  }
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    const take = Math.min(n, this.remaining);
    out.set(this.data.subarray(this.at, this.at + take));
    this.at += take;
    return out;
  }
  rest(): Uint8Array {
    const out = this.data.subarray(this.at);
    this.at = this.data.length;
    return out;
  }
}

/**
 * A logger that keeps nothing but checks what it is given: every line must be a string message with serialisable
 * fields (a log call that throws would be an uncaught exception on the device's error path).
 */
export const quietLogger: Logger = {
  log(_level, message, fields) {
    if (typeof message !== 'string') throw new FuzzInvariantError('log message is not a string');
    if (fields !== undefined) JSON.stringify(fields, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
  },
  child() {
    return quietLogger;
  },
};

/** Open file descriptors of this process (leak check). */
export function openFdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** Every FD_CHECK_EVERY inputs: the number of open fds may not grow past the first value by more than FD_SLACK. */
export const FD_CHECK_EVERY = 5_000;
export const FD_SLACK = 64;
let fdInputs = 0;
let fdBaseline = -1;
export function checkFds(target: string): void {
  if (++fdInputs % FD_CHECK_EVERY !== 0) return;
  const n = openFdCount();
  if (fdBaseline < 0) fdBaseline = n;
  else if (n - fdBaseline > FD_SLACK) throw new FuzzInvariantError(`${target}: ${n - fdBaseline} more open fds than after ${FD_CHECK_EVERY} inputs (leak)`);
}

/** Accesses outside guest memory that any GuestMemory attempted since the last assertNoOutsideAccess(). */
const outsideAccesses: string[] = [];
let audited = false;
/** While set (after a device reset), every GuestMemory access is recorded here: the device must not touch the guest. */
let quiescent: string[] | undefined;

/** Starts (a list) or stops (undefined) recording every GuestMemory access as one made after a reset. */
export function quiesceGuestMemory(into: string[] | undefined): void {
  quiescent = into;
}

/**
 * Makes every GuestMemory of this process record reads and writes outside its regions before failing them as usual
 * (the device must check a range before using it: an attempted access outside is a finding even when the error it
 * raises is caught). One bundle holds one GuestMemory class, so patching its prototype covers every user.
 */
export function auditGuestMemory(): void {
  if (audited) return;
  audited = true;
  const proto = GuestMemory.prototype;
  const read = proto.read;
  const write = proto.write;
  const contiguous = proto.contiguous;
  proto.read = function (this: GuestMemory, gpa: number, dest: Uint8Array): void {
    quiescent?.push(`read [0x${gpa.toString(16)}, +${dest.length})`);
    if (!this.isValidRange(gpa, dest.length)) outsideAccesses.push(`read [0x${gpa.toString(16)}, +${dest.length})`);
    read.call(this, gpa, dest);
  };
  proto.write = function (this: GuestMemory, gpa: number, src: Uint8Array): void {
    quiescent?.push(`write [0x${gpa.toString(16)}, +${src.length})`);
    if (!this.isValidRange(gpa, src.length)) outsideAccesses.push(`write [0x${gpa.toString(16)}, +${src.length})`);
    write.call(this, gpa, src);
  };
  proto.contiguous = function (this: GuestMemory, gpa: number, len: number): Uint8Array | undefined {
    quiescent?.push(`view [0x${gpa.toString(16)}, +${len})`);
    return contiguous.call(this, gpa, len);
  };
}

export function assertNoOutsideAccess(target: string): void {
  if (outsideAccesses.length === 0) return;
  const what = outsideAccesses.slice(0, 4).join(', ');
  outsideAccesses.length = 0;
  throw new FuzzInvariantError(`${target}: access outside guest memory: ${what}`);
}
