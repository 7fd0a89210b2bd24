// One front-end connection: reads messages off the stream socket (header first, then exactly the payload the
// header announces, so the fds that travel with a message are always read together with its header), hands them
// to the session, writes replies, and closes everything when the session or the peer says so.

import type { Logger } from '../../util/log.ts';
import type { HostOps, Watch } from '../../host/host.ts';
import { HEADER_SIZE, MAX_FDS_PER_MESSAGE, VhostUserProtocolError, checkRequestHeader, decodeHeader, requestName, type MessageHeader } from './messages.ts';
import type { VhostUserSession } from './session.ts';

/** Recorded message exchange (fixtures, debugging): what came in and what went out. */
export interface WireEvent {
  direction: 'in' | 'out';
  bytes: Uint8Array;
  fdCount: number;
}

/** recvmsg calls per readiness callback before the loop yields to others. */
const MAX_RECVS_PER_READINESS = 64;

export class VhostUserConnection {
  private watch: Watch | undefined;
  private header = new Uint8Array(HEADER_SIZE);
  private headerFill = 0;
  private parsed: MessageHeader | undefined;
  private payload = new Uint8Array(0);
  private payloadFill = 0;
  private fds: number[] = [];
  private closedReason: string | undefined;
  /** Optional tap on every message (fixture recording). */
  onWire: ((e: WireEvent) => void) | undefined;

  constructor(
    private readonly host: HostOps,
    readonly fd: number,
    readonly session: VhostUserSession,
    private readonly log: Logger,
    private readonly onClosed: (reason: string) => void,
  ) {
    this.watch = host.watchReadable(fd, () => this.onReadable());
  }

  get closed(): boolean {
    return this.closedReason !== undefined;
  }

  private onReadable(): void {
    // Bounded: a peer that keeps the socket full cannot starve the loop; the watcher fires again while bytes are
    // left. A message is dispatched in the same step as its last byte is read: were it left for a later step, the
    // bound could end the loop with a complete message not dispatched and the socket empty, so no readiness would
    // come again -- the front-end would wait for its reply forever (the Linux guest boot froze so in QEMU's start
    // burst; test/transport/vhost-user/message-burst.test.ts).
    for (let i = 0; i < MAX_RECVS_PER_READINESS && !this.closed; i++) {
      const want = this.parsed === undefined ? HEADER_SIZE - this.headerFill : this.payload.length - this.payloadFill;
      let r;
      try {
        r = this.host.recv(this.fd, want, MAX_FDS_PER_MESSAGE);
      } catch (e) {
        this.close(`recvmsg failed: ${(e as Error).message}`);
        return;
      }
      if (r.kind === 'again') return;
      if (r.kind === 'eof') {
        this.close(this.headerFill > 0 || this.parsed !== undefined ? 'front-end closed the connection in the middle of a message' : 'front-end closed the connection');
        return;
      }
      this.fds.push(...r.fds);
      if (r.fdsTruncated || this.fds.length > MAX_FDS_PER_MESSAGE) {
        // The kernel closed the fds that did not fit, and the bytes that came with them are gone: the stream
        // cannot be resynchronised.
        this.session.counters.badMessages.BadFdCount++;
        const request = this.parsed ? requestName(this.parsed.request) : 'message';
        const reason = `more than ${MAX_FDS_PER_MESSAGE} fds (ancillary data truncated)`;
        this.log.log('error', 'too many fds; closing the connection', { request, kind: 'BadFdCount', reason });
        this.close(`${request}: BadFdCount: ${reason}`);
        return;
      }
      if (this.parsed === undefined) {
        this.header.set(r.bytes, this.headerFill);
        this.headerFill += r.bytes.length;
        if (this.headerFill < HEADER_SIZE) continue;
        const h = decodeHeader(this.header);
        try {
          checkRequestHeader(h);
        } catch (e) {
          const err = e as VhostUserProtocolError;
          this.session.counters.badMessages.BadHeader++;
          this.log.log('error', 'bad header; closing the connection', { request: requestName(h.request), kind: 'BadHeader', reason: err.reason });
          this.close(`${requestName(h.request)}: BadHeader: ${err.reason}`);
          return;
        }
        this.parsed = h;
        this.payload = new Uint8Array(h.size);
        this.payloadFill = 0;
      } else {
        this.payload.set(r.bytes, this.payloadFill);
        this.payloadFill += r.bytes.length;
      }
      if (this.payloadFill === this.payload.length) this.dispatch();
    }
  }

  private dispatch(): void {
    const h = this.parsed!;
    const payload = this.payload;
    const fds = this.fds;
    this.parsed = undefined;
    this.headerFill = 0;
    this.fds = [];
    if (this.onWire) {
      const bytes = new Uint8Array(HEADER_SIZE + payload.length);
      bytes.set(this.header);
      bytes.set(payload, HEADER_SIZE);
      this.onWire({ direction: 'in', bytes, fdCount: fds.length });
    }
    const outcome = this.session.handle(h, payload, fds);
    if (outcome.reply !== undefined) {
      try {
        this.host.sendMessage(this.fd, outcome.reply.bytes, outcome.reply.fds);
        this.onWire?.({ direction: 'out', bytes: outcome.reply.bytes, fdCount: outcome.reply.fds.length });
      } catch (e) {
        this.close(`${requestName(h.request)}: reply not sent: ${(e as Error).message}`);
        return;
      }
    }
    if (outcome.close !== undefined) this.close(outcome.close);
  }

  /** Closes the socket and releases the session (mappings, fds, queues). Idempotent. */
  close(reason: string): void {
    if (this.closedReason !== undefined) return;
    this.closedReason = reason;
    this.watch?.stop();
    this.watch = undefined;
    for (const fd of this.fds) this.safeClose(fd);
    this.fds = [];
    this.session.release();
    this.safeClose(this.fd);
    this.log.log('info', 'connection closed', { reason });
    this.onClosed(reason);
  }

  private safeClose(fd: number): void {
    try {
      this.host.close(fd);
    } catch {
      /* already closed */
    }
  }
}
