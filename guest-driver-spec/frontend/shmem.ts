// VIRTIO shared memory regions in the reference front-end (spec 13.14), playing the VMM's part: the regions the
// back-end announced with GET_SHMEM_CONFIG, the SHMEM_MAP / SHMEM_UNMAP requests it serves from the back-end
// channel (each map is an mmap of the passed fd into this process), and the driver's window on a region
// (DriverTransport.sharedMemory). Like QEMU, a range nothing is mapped at reads as zero and drops stores, and a
// read-only mapping drops stores too.
//
// Every refusal has its own non-zero answer (ShmemAnswer), so a test can tell them apart; the back-end only needs
// "non-zero". A refusal changes nothing. When the back-end disconnects every mapping is dropped: munmap detaches
// the buffers, so a view the driver still holds becomes empty instead of pointing at freed memory.
//
// The mappings of a region sit in a RangeIndex (sorted, binary search): a VM with host queue mapping holds ~2 per
// mapped QP, and a scan of them per map, unmap or window access made a set-up of N QPs cost O(N^2).

import fs from 'node:fs';
import { mmap, munmap } from '../../vmm-device/native/sys.ts';
import { BackendRequest, VHOST_USER_VERSION, FLAG_NEED_REPLY, type MessageHeader } from '../../vmm-device/transport/vhost-user/messages.ts';
import { SHMEM_MAP_F_WRITABLE, SHMEM_MAP_SIZE } from '../../vmm-device/transport/vhost-user/shmem-messages.ts';
import { RangeIndex } from '../../vmm-device/util/range-index.ts';
import type { SharedMemoryWindow } from '../driver/transport.ts';

/** The front-end's answers to SHMEM_MAP / SHMEM_UNMAP: 0 done, anything else refused (and why). */
export const ShmemAnswer = {
  OK: 0n,
  /** The payload is not 40 bytes, its padding is not zero, or the fd count is wrong. */
  MALFORMED: 1n,
  /** Flag bits other than bit 0 (writable). */
  UNKNOWN_FLAGS: 2n,
  /** No region has this shmid. */
  UNKNOWN_SHMID: 3n,
  /** Offsets or length not multiples of the page size, or a length of 0. */
  UNALIGNED: 4n,
  /** The range is not inside the region (or wraps). */
  OUT_OF_RANGE: 5n,
  /** The range overlaps a live mapping. */
  OVERLAP: 6n,
  /** A regular file's range past its end (a touch would raise SIGBUS). */
  PAST_END_OF_FILE: 7n,
  /** mmap refused (wrong access mode, a device that cannot be mapped there...). */
  MMAP_FAILED: 8n,
  /** SHMEM_UNMAP that names no earlier mapping exactly. */
  NO_MAPPING: 9n,
  /** A back-end request the front-end does not serve. */
  UNSUPPORTED: 10n,
  /** MAX_FRONTEND_SHMEM_MAPPINGS live mappings already. */
  TOO_MANY: 11n,
} as const;
export type ShmemAnswerName = keyof typeof ShmemAnswer;

/** Live mappings the front-end keeps per connection (a back-end cannot make it map without bound). */
export const MAX_FRONTEND_SHMEM_MAPPINGS = 65536;

interface Mapping {
  offset: bigint;
  length: bigint;
  buffer: ArrayBuffer;
  writable: boolean;
}

export interface FrontendShmemCounters {
  mapped: number;
  unmapped: number;
  /** Refusals by answer name. */
  refused: Partial<Record<ShmemAnswerName, number>>;
  /** Mappings dropped because the back-end disconnected. */
  dropped: number;
}

const MAX_U64 = 2n ** 64n;

export class FrontendShmem {
  private readonly maps = new Map<number, RangeIndex<Mapping>>();
  /** Live mappings over all regions (MAX_FRONTEND_SHMEM_MAPPINGS bounds it). */
  private live = 0;
  readonly counters: FrontendShmemCounters = { mapped: 0, unmapped: 0, refused: {}, dropped: 0 };

  constructor(
    /** Region id -> bytes, from GET_SHMEM_CONFIG. */
    readonly regions: ReadonlyMap<number, bigint>,
    private readonly pageSize: number,
  ) {}

  /** The live mappings of region `shmid` (tests, diagnostics). */
  mappings(shmid: number): { offset: bigint; length: bigint; writable: boolean }[] {
    return (this.maps.get(shmid)?.toArray() ?? []).map((m) => ({ offset: m.offset, length: m.length, writable: m.writable }));
  }

  get mappingCount(): number {
    return this.live;
  }

  private refuse(name: ShmemAnswerName): bigint {
    this.counters.refused[name] = (this.counters.refused[name] ?? 0) + 1;
    return ShmemAnswer[name];
  }

  /**
   * Serves one back-end request; returns the REPLY_ACK value. Takes ownership of `fds` (closed before it returns:
   * a mapping keeps the file alive by itself).
   */
  serve(request: number, payload: Uint8Array, fds: readonly number[]): bigint {
    try {
      if (request === BackendRequest.SHMEM_MAP) return this.map(payload, fds);
      if (request === BackendRequest.SHMEM_UNMAP) return fds.length !== 0 ? this.refuse('MALFORMED') : this.unmap(payload);
      return this.refuse('UNSUPPORTED');
    } finally {
      for (const fd of fds) {
        try {
          fs.closeSync(fd);
        } catch {
          /* already closed */
        }
      }
    }
  }

  /** Reads the 40 bytes once into locals (the back-end may not change them under us, but read once, check, use). */
  private decode(payload: Uint8Array): { shmid: number; fdOffset: bigint; shmOffset: bigint; len: bigint; flags: bigint } | undefined {
    if (payload.length !== SHMEM_MAP_SIZE || payload.subarray(1, 8).some((b) => b !== 0)) return undefined;
    const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
    return { shmid: dv.getUint8(0), fdOffset: dv.getBigUint64(8, true), shmOffset: dv.getBigUint64(16, true), len: dv.getBigUint64(24, true), flags: dv.getBigUint64(32, true) };
  }

  /** The checks both requests share; undefined when the range is acceptable. */
  private checkRange(shmid: number, offset: bigint, len: bigint): ShmemAnswerName | undefined {
    const size = this.regions.get(shmid);
    if (size === undefined) return 'UNKNOWN_SHMID';
    const page = BigInt(this.pageSize);
    if (len === 0n || offset % page !== 0n || len % page !== 0n) return 'UNALIGNED';
    if (offset >= size || len > size - offset) return 'OUT_OF_RANGE';
    return undefined;
  }

  private map(payload: Uint8Array, fds: readonly number[]): bigint {
    const m = this.decode(payload);
    if (m === undefined || fds.length !== 1) return this.refuse('MALFORMED');
    if ((m.flags & ~SHMEM_MAP_F_WRITABLE) !== 0n) return this.refuse('UNKNOWN_FLAGS');
    const bad = this.checkRange(m.shmid, m.shmOffset, m.len);
    if (bad !== undefined) return this.refuse(bad);
    if (m.fdOffset % BigInt(this.pageSize) !== 0n) return this.refuse('UNALIGNED');
    if (m.fdOffset + m.len > MAX_U64 || m.fdOffset + m.len > BigInt(Number.MAX_SAFE_INTEGER)) return this.refuse('OUT_OF_RANGE');
    let list = this.maps.get(m.shmid);
    if (list?.overlapping(m.shmOffset, m.len) !== undefined) return this.refuse('OVERLAP');
    if (this.live >= MAX_FRONTEND_SHMEM_MAPPINGS) return this.refuse('TOO_MANY');
    const fd = fds[0]!;
    let stat: fs.Stats;
    try {
      stat = fs.fstatSync(fd);
    } catch {
      return this.refuse('MMAP_FAILED');
    }
    if (stat.isFile() && m.fdOffset + m.len > BigInt(stat.size)) return this.refuse('PAST_END_OF_FILE');
    const writable = m.flags === SHMEM_MAP_F_WRITABLE;
    let buffer: ArrayBuffer;
    try {
      buffer = mmap(fd, Number(m.fdOffset), Number(m.len), writable);
    } catch {
      return this.refuse('MMAP_FAILED');
    }
    if (list === undefined) this.maps.set(m.shmid, (list = new RangeIndex()));
    list.insert({ offset: m.shmOffset, length: m.len, buffer, writable });
    this.live++;
    this.counters.mapped++;
    return ShmemAnswer.OK;
  }

  private unmap(payload: Uint8Array): bigint {
    const m = this.decode(payload);
    if (m === undefined) return this.refuse('MALFORMED');
    if ((m.flags & ~SHMEM_MAP_F_WRITABLE) !== 0n) return this.refuse('UNKNOWN_FLAGS');
    const bad = this.checkRange(m.shmid, m.shmOffset, m.len);
    if (bad !== undefined) return this.refuse(bad);
    const list = this.maps.get(m.shmid);
    const gone = list?.exact(m.shmOffset, m.len);
    if (list === undefined || gone === undefined) return this.refuse('NO_MAPPING');
    list.remove(gone);
    this.live--;
    munmap(gone.buffer);
    this.counters.unmapped++;
    return ShmemAnswer.OK;
  }

  /** The back-end went away: every mapping is dropped (spec 13.14). Returns how many. */
  dropAll(): number {
    let n = 0;
    for (const list of this.maps.values()) {
      const all = list.clear();
      for (const m of all) munmap(m.buffer);
      n += all.length;
    }
    this.maps.clear();
    this.live = 0;
    this.counters.dropped += n;
    return n;
  }

  /** The mapping holding byte `offset` of region `shmid`, or undefined. */
  private at(shmid: number, offset: bigint): Mapping | undefined {
    return this.maps.get(shmid)?.containing(offset);
  }

  /** The driver's window on region `shmid`, or undefined when there is no such region. */
  window(shmid: number): SharedMemoryWindow | undefined {
    const size = this.regions.get(shmid);
    if (size === undefined) return undefined;
    const check = (what: string, offset: bigint, length: number, align = 1): void => {
      if (!Number.isInteger(length) || length < 0 || offset < 0n || offset + BigInt(length) > size) {
        throw new RangeError(`shared memory region ${shmid}: ${what} [0x${offset.toString(16)}, +${length}) is outside its 0x${size.toString(16)} bytes`);
      }
      if (offset % BigInt(align) !== 0n) throw new RangeError(`shared memory region ${shmid}: ${what} at 0x${offset.toString(16)} is not ${align}-byte aligned`);
    };
    /** Walks [offset, offset+length) piece by piece: each piece inside one mapping, or in a hole. */
    const pieces = (offset: bigint, length: number, visit: (m: Mapping | undefined, inMap: number, at: number, n: number) => void): void => {
      let done = 0;
      while (done < length) {
        const here = offset + BigInt(done);
        const m = this.at(shmid, here);
        let n: number;
        if (m !== undefined) {
          n = Math.min(length - done, Number(m.offset + m.length - here));
        } else {
          const next = this.maps.get(shmid)?.after(here);
          n = next === undefined ? length - done : Math.min(length - done, Number(next.offset - here));
        }
        visit(m, m === undefined ? 0 : Number(here - m.offset), done, n);
        done += n;
      }
    };
    return {
      shmid,
      size,
      read: async (offset, length) => {
        check('read', offset, length);
        const out = new Uint8Array(length);
        pieces(offset, length, (m, inMap, at, n) => {
          if (m !== undefined && m.buffer.byteLength > 0) out.set(new Uint8Array(m.buffer, inMap, n), at);
        });
        return out;
      },
      write: async (offset, bytes) => {
        check('write', offset, bytes.length);
        pieces(offset, bytes.length, (m, inMap, at, n) => {
          if (m !== undefined && m.writable && m.buffer.byteLength > 0) new Uint8Array(m.buffer, inMap, n).set(bytes.subarray(at, at + n));
        });
      },
      readU32: async (offset) => {
        check('readU32', offset, 4, 4);
        const m = this.at(shmid, offset);
        if (m === undefined || m.buffer.byteLength === 0) return 0;
        // An atomic load: sequentially consistent, so at least the acquire section 13.4 asks for.
        return Atomics.load(new Uint32Array(m.buffer), Number(offset - m.offset) / 4);
      },
      writeU32: async (offset, value) => {
        check('writeU32', offset, 4, 4);
        const m = this.at(shmid, offset);
        if (m === undefined || !m.writable || m.buffer.byteLength === 0) return;
        Atomics.store(new Uint32Array(m.buffer), Number(offset - m.offset) / 4, value >>> 0);
      },
      view: (offset, length) => {
        check('view', offset, length);
        const m = this.at(shmid, offset);
        // A read-only mapping gets no view: a store through it would fault the whole process.
        if (m === undefined || !m.writable || length === 0 || offset + BigInt(length) > m.offset + m.length) return undefined;
        return new Uint8Array(m.buffer, Number(offset - m.offset), length);
      },
    };
  }
}

/** The header flags of an answer to a back-end request (QEMU's: REPLY | version). */
export const BACKEND_ANSWER_FLAGS = 0x4 | VHOST_USER_VERSION;

/** Whether the back-end asked for an answer. */
export function wantsAnswer(h: MessageHeader): boolean {
  return (h.flags & FLAG_NEED_REPLY) !== 0;
}
