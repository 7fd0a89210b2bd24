// The back-end channel (SET_BACKEND_REQ_FD, protocol feature BACKEND_REQ): a socket the front-end gave us, on which
// the back-end sends requests (CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG) and, with REPLY_ACK, reads the
// front-end's u64 answer. Requests go in batches: those asked for in one turn of the event loop (the SQ's and the
// RQ's SHMEM_MAP of a mapped QP) are sent back to back and their answers awaited in order, which costs the VMM and
// this process one wake-up each for the whole batch instead of one per request; a request asked for while a batch
// waits goes with the next batch. QEMU reads and answers the channel's messages one after the other, in order.

import type { Logger } from '../../util/log.ts';
import type { HostOps, Watch } from '../../host/host.ts';
import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  MAX_FDS_PER_MESSAGE,
  U64_SIZE,
  VHOST_USER_VERSION,
  backendRequestName,
  decodeHeader,
  encodeMessage,
} from './messages.ts';
import { encodeShmemMap, type ShmemMapRequest } from './shmem-messages.ts';

/** How long a front-end may take to answer a back-end request. */
export const BACKEND_REPLY_TIMEOUT_MS = 5000;

/** A request asked for and not sent yet. */
interface Queued {
  code: number;
  payload: Uint8Array;
  fds: readonly number[];
  resolve: (v: bigint | undefined) => void;
  reject: (e: Error) => void;
}

/** A request sent, its answer awaited (answers come in the order the requests went out). */
interface Pending {
  request: number;
  resolve: (v: bigint | undefined) => void;
  reject: (e: Error) => void;
}

/** The front-end did not (or could not be asked to) perform a SHMEM_MAP or SHMEM_UNMAP. */
export class ShmemRefusedError extends Error {
  override name = 'ShmemRefusedError';
}

export class BackendChannel {
  private watch: Watch | undefined;
  /** Asked for, not sent: the next batch. */
  private queued: Queued[] = [];
  /** The batch sent, in order: each answer settles the first. */
  private inFlight: Pending[] = [];
  private timer: NodeJS.Timeout | undefined;
  private flushScheduled = false;
  private buffered = new Uint8Array(0);
  private closed = false;

  constructor(
    private readonly host: HostOps,
    readonly fd: number,
    /** REPLY_ACK negotiated: every request asks for an answer. */
    private readonly replyAck: boolean,
    private readonly log: Logger,
  ) {
    if (replyAck) this.watch = host.watchReadable(fd, () => this.onReadable());
  }

  /** Sends a request; resolves to the front-end's u64 answer with REPLY_ACK, else undefined once sent. */
  request(code: number, payload: Uint8Array, fds: readonly number[]): Promise<bigint | undefined> {
    if (fds.length > MAX_FDS_PER_MESSAGE) return Promise.reject(new RangeError(`${fds.length} fds, at most ${MAX_FDS_PER_MESSAGE}`));
    return new Promise((resolve, reject) => {
      this.queued.push({ code, payload, fds, resolve, reject });
      this.schedule();
    });
  }

  /** Sends the queued requests once this turn's callers have asked for theirs (unless a batch still waits). */
  private schedule(): void {
    if (this.flushScheduled || this.inFlight.length > 0) return;
    this.flushScheduled = true;
    queueMicrotask(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  private flush(): void {
    if (this.inFlight.length > 0 || this.queued.length === 0) return;
    const batch = this.queued.splice(0);
    if (this.closed) {
      for (const q of batch) q.reject(new Error('back-end channel is closed'));
      return;
    }
    const flags = VHOST_USER_VERSION | (this.replyAck ? FLAG_NEED_REPLY : 0);
    for (const q of batch) {
      try {
        this.host.sendMessage(this.fd, encodeMessage(q.code, flags, q.payload), q.fds);
      } catch (e) {
        q.reject(e as Error);
        continue;
      }
      if (this.replyAck) this.inFlight.push({ request: q.code, resolve: q.resolve, reject: q.reject });
      else q.resolve(undefined);
    }
    if (this.inFlight.length > 0) this.armTimer();
    else if (this.queued.length > 0) this.schedule();
  }

  /** The first request of the batch gets BACKEND_REPLY_TIMEOUT_MS for its answer (restarted at each answer). */
  private armTimer(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    const code = this.inFlight[0]!.request;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.fail(new Error(`${backendRequestName(code)}: no answer within ${BACKEND_REPLY_TIMEOUT_MS} ms`));
    }, BACKEND_REPLY_TIMEOUT_MS);
  }

  configChanged(): Promise<bigint | undefined> {
    return this.request(BackendRequest.CONFIG_CHANGE_MSG, new Uint8Array(0), []);
  }

  /**
   * SHMEM_MAP: asks the front-end to map `m.len` bytes of `fd` at `m.fdOffset` into shared memory region `m.shmid`
   * at `m.shmOffset`. Resolves once the front-end confirmed it; rejects when it refused (its answer is non-zero),
   * when REPLY_ACK was not negotiated (a mapping the guest is told about must be known to exist), or when the
   * channel fails. The caller keeps `fd`: the front-end gets its own copy with the message.
   */
  async shmemMap(m: ShmemMapRequest, fd: number): Promise<void> {
    await this.confirmed(BackendRequest.SHMEM_MAP, encodeShmemMap(m), [fd], m);
  }

  /** SHMEM_UNMAP of exactly one earlier mapping (same shmid, shmOffset and len); resolves once confirmed. */
  async shmemUnmap(m: ShmemMapRequest): Promise<void> {
    await this.confirmed(BackendRequest.SHMEM_UNMAP, encodeShmemMap(m), [], m);
  }

  private async confirmed(code: number, payload: Uint8Array, fds: readonly number[], m: ShmemMapRequest): Promise<void> {
    const what = `${backendRequestName(code)} of region ${m.shmid} [0x${m.shmOffset.toString(16)}, +0x${m.len.toString(16)})`;
    if (!this.replyAck) throw new ShmemRefusedError(`${what}: REPLY_ACK was not negotiated, so no answer would confirm it`);
    const answer = await this.request(code, payload, fds);
    if (answer !== 0n) throw new ShmemRefusedError(`${what}: the front-end refused it (answer ${String(answer)})`);
  }

  private onReadable(): void {
    for (;;) {
      const r = this.host.recv(this.fd, 64, 0);
      if (r.kind === 'again') return;
      if (r.kind === 'eof') {
        this.fail(new Error('front-end closed the back-end channel'));
        this.close();
        return;
      }
      for (const fd of r.fds) this.host.close(fd); // answers carry no fds
      const joined = new Uint8Array(this.buffered.length + r.bytes.length);
      joined.set(this.buffered);
      joined.set(r.bytes, this.buffered.length);
      this.buffered = joined;
      while (this.buffered.length >= HEADER_SIZE) {
        const h = decodeHeader(this.buffered);
        if (h.size > 64) {
          this.fail(new Error(`answer of ${h.size} bytes on the back-end channel`));
          this.close();
          return;
        }
        if (this.buffered.length < HEADER_SIZE + h.size) break;
        const body = this.buffered.slice(HEADER_SIZE, HEADER_SIZE + h.size);
        this.buffered = this.buffered.slice(HEADER_SIZE + h.size);
        this.answer(h.request, h.flags, body);
      }
    }
  }

  private answer(request: number, flags: number, body: Uint8Array): void {
    const p = this.inFlight.shift();
    if (p === undefined) {
      this.log.log('warn', 'unexpected answer on the back-end channel', { request: backendRequestName(request) });
      return;
    }
    if (this.inFlight.length > 0) this.armTimer();
    else this.settleBatch();
    if ((flags & FLAG_REPLY) === 0 || request !== p.request || body.length !== U64_SIZE) {
      p.reject(new Error(`malformed answer to ${backendRequestName(p.request)} (request ${request}, flags 0x${flags.toString(16)}, ${body.length} bytes)`));
      return;
    }
    p.resolve(new DataView(body.buffer, body.byteOffset, 8).getBigUint64(0, true));
  }

  /** The batch is over (answered or failed): the timer stops and the next batch may go. */
  private settleBatch(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.queued.length > 0) this.schedule();
  }

  /** Every request of the batch in flight rejects with `e` (no answer will be believed for them). */
  private fail(e: Error): void {
    const failed = this.inFlight.splice(0);
    this.settleBatch();
    for (const p of failed) p.reject(e);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.fail(new Error('back-end channel closed'));
    for (const q of this.queued.splice(0)) q.reject(new Error('back-end channel is closed'));
    this.watch?.stop();
    this.watch = undefined;
    try {
      this.host.close(this.fd);
    } catch {
      /* already gone */
    }
  }
}
