// The back-end channel (SET_BACKEND_REQ_FD, protocol feature BACKEND_REQ): a socket the front-end gave us, on which
// the back-end sends requests (CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG) and, with REPLY_ACK, reads the
// front-end's u64 answer. Requests go one at a time: the next waits for the previous answer.

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

interface Pending {
  request: number;
  resolve: (v: bigint | undefined) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/** The front-end did not (or could not be asked to) perform a SHMEM_MAP or SHMEM_UNMAP. */
export class ShmemRefusedError extends Error {
  override name = 'ShmemRefusedError';
}

export class BackendChannel {
  private watch: Watch | undefined;
  private pending: Pending | undefined;
  private chain: Promise<unknown> = Promise.resolve();
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
    const run = (): Promise<bigint | undefined> => this.send(code, payload, fds);
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => undefined);
    return p;
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

  private send(code: number, payload: Uint8Array, fds: readonly number[]): Promise<bigint | undefined> {
    if (this.closed) return Promise.reject(new Error('back-end channel is closed'));
    const flags = VHOST_USER_VERSION | (this.replyAck ? FLAG_NEED_REPLY : 0);
    this.host.sendMessage(this.fd, encodeMessage(code, flags, payload), fds);
    if (!this.replyAck) return Promise.resolve(undefined);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending = undefined;
        reject(new Error(`${backendRequestName(code)}: no answer within ${BACKEND_REPLY_TIMEOUT_MS} ms`));
      }, BACKEND_REPLY_TIMEOUT_MS);
      this.pending = { request: code, resolve, reject, timer };
    });
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
    const p = this.pending;
    if (p === undefined) {
      this.log.log('warn', 'unexpected answer on the back-end channel', { request: backendRequestName(request) });
      return;
    }
    clearTimeout(p.timer);
    this.pending = undefined;
    if ((flags & FLAG_REPLY) === 0 || request !== p.request || body.length !== U64_SIZE) {
      p.reject(new Error(`malformed answer to ${backendRequestName(p.request)} (request ${request}, flags 0x${flags.toString(16)}, ${body.length} bytes)`));
      return;
    }
    p.resolve(new DataView(body.buffer, body.byteOffset, 8).getBigUint64(0, true));
  }

  private fail(e: Error): void {
    const p = this.pending;
    if (p === undefined) return;
    clearTimeout(p.timer);
    this.pending = undefined;
    p.reject(e);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.fail(new Error('back-end channel closed'));
    this.watch?.stop();
    this.watch = undefined;
    try {
      this.host.close(this.fd);
    } catch {
      /* already gone */
    }
  }
}
