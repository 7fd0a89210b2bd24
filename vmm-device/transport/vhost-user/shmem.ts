// VIRTIO shared memory regions over vhost-user, the back-end's side (spec section 13.14; protocol feature SHMEM,
// bit 22): which protocol features the session offers for them, the GET_SHMEM_CONFIG answer, and the mapper that
// sends SHMEM_MAP / SHMEM_UNMAP on the back-end channel for the device model (HostPageMapper.mapShared/unmapShared).
//
// The mapper keeps its own account of the ranges it asked the front-end to map, so that it can refuse, before
// anything is sent, what the front-end would refuse anyway (a range outside the region, unaligned, overlapping a
// live mapping, an unmap that names no mapping): the model then gets a precise error instead of an answer "1".
// A range is reserved from the moment its SHMEM_MAP is sent, so two overlapping maps in flight cannot both go out.
// When the connection goes away the VMM drops every mapping (spec 13.14); the mapper forgets them too, and every
// request still in flight rejects: the model learns it through the promises it holds, never through a throw.
// The account is a RangeIndex per region (binary search): a device with host queue mapping holds ~2 mappings per
// mapped QP, and a scan of them per request made a set-up of N QPs cost O(N^2).

import type { HostPageCapabilities, SharedMapping } from '../../virtio/device.ts';
import type { BackendChannel } from './backend-channel.ts';
import { ShmemRefusedError } from './backend-channel.ts';
import { FrontendRequest, ProtocolFeature, SUPPORTED_PROTOCOL_FEATURES, VhostUserProtocolError, bit, type MessageHeader } from './messages.ts';
import { MAX_SHMEM_REGIONS, checkGetShmemConfig, encodeShmemConfig, type ShmemMapRequest } from './shmem-messages.ts';
import { RangeIndex } from '../../util/range-index.ts';

/** What shared memory needs negotiated: SHMEM itself, the channel, fds on it, and an answer to every request. */
export const SHMEM_FEATURES = ['SHMEM', 'BACKEND_REQ', 'BACKEND_SEND_FD', 'REPLY_ACK'] as const;

/**
 * SHMEM_MAP/UNMAP requests the mapper lets wait for the channel at once. The channel sends one at a time and waits
 * up to BACKEND_REPLY_TIMEOUT_MS for each answer; a model asking for more than this is refused at once rather than
 * queued for minutes.
 */
export const MAX_OUTSTANDING_SHMEM_REQUESTS = 64;

/** Live mappings the mapper keeps per connection (each one is a mapping in the VMM). */
export const MAX_SHMEM_MAPPINGS = 65536;

/**
 * The protocol features a session offers for `regions` (the model's sharedMemoryRegions): SHMEM only when the model
 * declares at least one region, since a front-end that negotiated it would expose an empty BAR otherwise.
 */
export function offeredProtocolFeatures(regions: ReadonlyMap<number, bigint> | undefined): bigint {
  return regions !== undefined && regions.size > 0 ? SUPPORTED_PROTOCOL_FEATURES | bit(ProtocolFeature.SHMEM) : SUPPORTED_PROTOCOL_FEATURES;
}

/**
 * Checks the model's regions once, when the session is built (a model bug is a start-up error, not a protocol
 * error later): ids 0..255, sizes at least one page and page multiples (QEMU refuses other sizes at realize).
 * Returns the GET_SHMEM_CONFIG reply.
 */
export function shmemConfigReply(regions: ReadonlyMap<number, bigint>, pageSize: number): Uint8Array {
  for (const [id, size] of regions) {
    if (!Number.isInteger(id) || id < 0 || id >= MAX_SHMEM_REGIONS) throw new RangeError(`shared memory region id ${id} is outside 0..${MAX_SHMEM_REGIONS - 1}`);
    if (size <= 0n || size % BigInt(pageSize) !== 0n) throw new RangeError(`shared memory region ${id}: size ${size} is not a positive multiple of the page size ${pageSize}`);
  }
  return encodeShmemConfig(regions);
}

/** Answers GET_SHMEM_CONFIG (front-end request 44); throws VhostUserProtocolError when it is malformed or not now. */
export function answerGetShmemConfig(h: MessageHeader, payload: Uint8Array, fdCount: number, shmemNegotiated: boolean, reply: Uint8Array | undefined): Uint8Array {
  checkGetShmemConfig(h, payload, fdCount);
  if (!shmemNegotiated || reply === undefined) {
    throw new VhostUserProtocolError('BadState', FrontendRequest.GET_SHMEM_CONFIG, 'protocol feature SHMEM was not negotiated');
  }
  return reply;
}

/** What the mapper needs from the session. */
export interface ShmemEnv {
  hasProtocol(bit: number): boolean;
  readonly channel: BackendChannel | undefined;
  readonly pageSize: number;
  /** The model's regions (id -> bytes); empty when it declares none. */
  readonly regions: ReadonlyMap<number, bigint>;
}

export interface ShmemCounters {
  /** SHMEM_MAP / SHMEM_UNMAP confirmed by the front-end. */
  mapped: number;
  unmapped: number;
  /** Refused by the mapper's own checks before anything was sent. */
  refusedLocally: number;
  /** Refused by the front-end (a non-zero REPLY_ACK). */
  refusedByFrontend: number;
  /** No answer (timeout, channel closed): the VMM's state for that range is unknown. */
  failed: number;
  /** Mappings forgotten because the connection went away (the VMM dropped them). */
  dropped: number;
}

type State = 'mapping' | 'live' | 'unmapping' | 'uncertain';

interface Entry {
  shmid: number;
  offset: bigint;
  length: bigint;
  fdOffset: bigint;
  writable: boolean;
  state: State;
}

/** The mapper's account of one region's ranges. */
export class VhostUserShmem {
  readonly counters: ShmemCounters = { mapped: 0, unmapped: 0, refusedLocally: 0, refusedByFrontend: 0, failed: 0, dropped: 0 };
  /** Region id -> its ranges (mapped, being mapped or unmapped, uncertain). */
  private readonly entries = new Map<number, RangeIndex<Entry>>();
  /** Ranges held over all regions (MAX_SHMEM_MAPPINGS bounds it). */
  private held = 0;
  private outstanding = 0;
  /** Bumped when the connection goes away: answers to requests sent before it are not believed. */
  private epoch = 0;

  constructor(private readonly env: ShmemEnv) {}

  /** Why shared memory is unavailable now, or undefined when it is available. */
  missing(): string | undefined {
    if (this.env.regions.size === 0) return 'shared memory (SHMEM_MAP/SHMEM_UNMAP): the device model declares no shared memory regions';
    const absent = SHMEM_FEATURES.filter((f) => !this.env.hasProtocol(ProtocolFeature[f]));
    if (absent.length > 0) {
      return `shared memory (SHMEM_MAP/SHMEM_UNMAP): protocol feature${absent.length > 1 ? 's' : ''} ${absent.map((f) => `${f} (${ProtocolFeature[f]})`).join(', ')} not negotiated`;
    }
    if (this.env.channel === undefined) return 'shared memory (SHMEM_MAP/SHMEM_UNMAP): no back-end channel (SET_BACKEND_REQ_FD was not received)';
    return undefined;
  }

  capabilities(): Pick<HostPageCapabilities, 'sharedMemory'> & { missing: string | undefined } {
    const missing = this.missing();
    return { sharedMemory: missing === undefined ? new Map(this.env.regions) : new Map(), missing };
  }

  /** The live (or pending) mappings, for tests and diagnostics. */
  describe(): { shmid: number; offset: bigint; length: bigint; state: State }[] {
    return [...this.entries.values()].flatMap((index) => index.toArray().map((e) => ({ shmid: e.shmid, offset: e.offset, length: e.length, state: e.state })));
  }

  private refuse(why: string): Promise<never> {
    this.counters.refusedLocally++;
    return Promise.reject(new ShmemRefusedError(why));
  }

  /** Checks that apply to both requests; returns the refusal's reason or undefined. */
  private checkRange(what: string, shmid: number, offset: bigint, length: bigint): string | undefined {
    const missing = this.missing();
    if (missing !== undefined) return `${what}: ${missing}`;
    const size = this.env.regions.get(shmid);
    if (size === undefined) return `${what}: region ${shmid} does not exist (the model declares ${[...this.env.regions.keys()].join(', ')})`;
    const page = BigInt(this.env.pageSize);
    if (length <= 0n) return `${what}: length ${length} is not positive`;
    if (offset < 0n || offset % page !== 0n) return `${what}: offset 0x${offset.toString(16)} is not a multiple of the page size ${page}`;
    if (length % page !== 0n) return `${what}: length 0x${length.toString(16)} is not a multiple of the page size ${page}`;
    if (offset + length > size) return `${what}: [0x${offset.toString(16)}, +0x${length.toString(16)}) ends past the region's 0x${size.toString(16)} bytes`;
    if (this.outstanding >= MAX_OUTSTANDING_SHMEM_REQUESTS) return `${what}: ${this.outstanding} requests already wait for the front-end (at most ${MAX_OUTSTANDING_SHMEM_REQUESTS})`;
    return undefined;
  }

  async mapShared(m: SharedMapping): Promise<void> {
    const what = `SHMEM_MAP of region ${m.shmid} [0x${m.shmOffset.toString(16)}, +0x${m.length.toString(16)})`;
    const bad = this.checkRange(what, m.shmid, m.shmOffset, m.length);
    if (bad !== undefined) return this.refuse(bad);
    if (m.fdOffset < 0n || m.fdOffset % BigInt(this.env.pageSize) !== 0n) return this.refuse(`${what}: fd offset 0x${m.fdOffset.toString(16)} is not a multiple of the page size`);
    if (m.fdOffset + m.length > 2n ** 64n) return this.refuse(`${what}: fd offset + length wraps past 2^64`);
    if (!Number.isInteger(m.fd) || m.fd < 0) return this.refuse(`${what}: fd ${m.fd} is not a file descriptor`);
    let index = this.entries.get(m.shmid);
    const clash = index?.overlapping(m.shmOffset, m.length);
    if (clash !== undefined) return this.refuse(`${what}: overlaps [0x${clash.offset.toString(16)}, +0x${clash.length.toString(16)}) (${clash.state})`);
    if (this.held >= MAX_SHMEM_MAPPINGS) return this.refuse(`${what}: ${this.held} mappings already (at most ${MAX_SHMEM_MAPPINGS})`);

    const entry: Entry = { shmid: m.shmid, offset: m.shmOffset, length: m.length, fdOffset: m.fdOffset, writable: m.writable, state: 'mapping' };
    if (index === undefined) this.entries.set(m.shmid, (index = new RangeIndex()));
    index.insert(entry);
    this.held++;
    const req: ShmemMapRequest = { shmid: m.shmid, fdOffset: m.fdOffset, shmOffset: m.shmOffset, len: m.length, writable: m.writable };
    await this.send(entry, (ch) => ch.shmemMap(req, m.fd), 'live');
  }

  async unmapShared(shmid: number, shmOffset: bigint, length: bigint): Promise<void> {
    const what = `SHMEM_UNMAP of region ${shmid} [0x${shmOffset.toString(16)}, +0x${length.toString(16)})`;
    const bad = this.checkRange(what, shmid, shmOffset, length);
    if (bad !== undefined) return this.refuse(bad);
    const entry = this.entries.get(shmid)?.exact(shmOffset, length);
    if (entry === undefined) return this.refuse(`${what}: names no mapping (an unmap names exactly one earlier mapping)`);
    if (entry.state === 'mapping' || entry.state === 'unmapping') return this.refuse(`${what}: the mapping is still ${entry.state === 'mapping' ? 'being mapped' : 'being unmapped'}`);
    const wasUncertain = entry.state === 'uncertain';
    entry.state = 'unmapping';
    const req: ShmemMapRequest = { shmid, fdOffset: entry.fdOffset, shmOffset, len: length, writable: entry.writable };
    try {
      await this.send(entry, (ch) => ch.shmemUnmap(req), undefined);
    } catch (e) {
      // An uncertain range the front-end refuses to unmap was never mapped: it is free either way.
      if (wasUncertain && e instanceof ShmemRefusedError) this.forget(entry);
      throw e;
    }
  }

  /**
   * Sends one request for `entry` and settles its state: `after` on success (undefined: forget it), forgotten on a
   * refusal of a map, back to live on a refused unmap, 'uncertain' when no answer came (the VMM may or may not
   * have acted: the range stays reserved until the model unmaps it).
   */
  private async send(entry: Entry, request: (ch: BackendChannel) => Promise<void>, after: State | undefined): Promise<void> {
    const ch = this.env.channel;
    const epoch = this.epoch;
    const mapping = entry.state === 'mapping';
    if (ch === undefined) {
      this.forgetOrRestore(entry, mapping);
      return this.refuse('no back-end channel');
    }
    this.outstanding++;
    try {
      await request(ch);
    } catch (e) {
      if (epoch !== this.epoch) throw new Error(`${(e as Error).message}; the connection closed and the VMM dropped every mapping`);
      if (e instanceof ShmemRefusedError) {
        this.counters.refusedByFrontend++;
        this.forgetOrRestore(entry, mapping);
      } else {
        this.counters.failed++;
        entry.state = 'uncertain';
        throw new Error(`${(e as Error).message}; the VMM's state of this range is unknown: it stays reserved until unmapShared or the connection closes`);
      }
      throw e;
    } finally {
      this.outstanding--;
    }
    if (epoch !== this.epoch) throw new Error('the connection closed while the request was answered; the VMM dropped every mapping');
    if (after === undefined) {
      this.counters.unmapped++;
      this.forget(entry);
    } else {
      this.counters.mapped++;
      entry.state = after;
    }
  }

  private forgetOrRestore(entry: Entry, mapping: boolean): void {
    if (mapping) this.forget(entry);
    else entry.state = 'live';
  }

  private forget(entry: Entry): void {
    // Only this very entry: after a dropAll another one may hold its range.
    if (this.entries.get(entry.shmid)?.remove(entry) === true) this.held--;
  }

  /** The connection went away: the VMM dropped every mapping (spec 13.14). Requests in flight reject. */
  dropAll(): number {
    this.epoch++;
    const n = this.held;
    this.counters.dropped += n;
    this.entries.clear();
    this.held = 0;
    return n;
  }
}
