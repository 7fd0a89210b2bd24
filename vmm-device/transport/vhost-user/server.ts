// The vhost-user back-end server: listens on a unix socket and serves one front-end connection at a time (one
// device per socket, as QEMU expects). A connection that goes wrong is closed with everything it held released,
// and the server goes back to listening; the next front-end (a reconnecting QEMU, the next test) is served by a
// fresh session over a fresh device core.

import type { Logger } from '../../util/log.ts';
import type { VirtioDeviceModel } from '../../virtio/device.ts';
import { BackendChannel } from './backend-channel.ts';
import { VhostUserConnection, type WireEvent } from './connection.ts';
import type { HostOps, ListenOps, Watch } from '../../host/host.ts';
import { ProtocolFeature, hasBit } from './messages.ts';
import { VhostUserSession, newCounters, type SessionCounters } from './session.ts';
import { shmemConfigReply } from './shmem.ts';

/** Pending connections the kernel queues while one is being served. */
export const LISTEN_BACKLOG = 4;
/**
 * Pause before watching the listening socket again after accept() failed (EMFILE/ENFILE: no fd left). The socket
 * stays readable while the connection waits, and the watch is level-triggered: retrying at once would spin.
 */
export const ACCEPT_RETRY_MS = 100;

export interface ServerOptions {
  path: string;
  host: HostOps & ListenOps;
  /** The device model; reset (through the core) between connections. */
  model: VirtioDeviceModel;
  log: Logger;
}

export class VhostUserServer {
  private listenFd: number | undefined;
  private listenWatch: Watch | undefined;
  private acceptRetry: NodeJS.Timeout | undefined;
  private current: VhostUserConnection | undefined;
  /** accept() failures (each followed by an ACCEPT_RETRY_MS pause). */
  acceptFailures = 0;
  /** Counters summed over every connection served. */
  readonly counters: SessionCounters = newCounters();
  connectionsServed = 0;
  /** Reasons past connections were closed, newest last (bounded). */
  readonly closeReasons: string[] = [];
  /** Called with each new session (tests, the host-notifier user). */
  onSession: ((s: VhostUserSession) => void) | undefined;
  onClose: ((reason: string) => void) | undefined;
  onWire: ((e: WireEvent) => void) | undefined;

  constructor(private readonly opts: ServerOptions) {
    // A model whose shared memory regions no front-end could expose is a start-up error, not one at each accept.
    const regions = opts.model.sharedMemoryRegions;
    if (regions !== undefined && regions.size > 0) shmemConfigReply(regions, opts.host.pageSize);
  }

  listen(): void {
    if (this.listenFd !== undefined) throw new Error('already listening');
    this.listenFd = this.opts.host.listenUnix(this.opts.path, LISTEN_BACKLOG);
    this.listenWatch = this.opts.host.watchReadable(this.listenFd, () => this.acceptPending());
    this.opts.log.log('info', 'listening', { path: this.opts.path });
  }

  get session(): VhostUserSession | undefined {
    return this.current?.session;
  }

  private acceptPending(): void {
    if (this.current !== undefined || this.listenFd === undefined) return; // one at a time; the rest wait
    let fd: number | undefined;
    try {
      fd = this.opts.host.accept(this.listenFd);
    } catch (e) {
      this.acceptFailures++;
      this.opts.log.log('error', 'accept failed', { error: (e as Error).message, retryInMs: ACCEPT_RETRY_MS, failures: this.acceptFailures });
      this.pauseAccepting();
      return;
    }
    if (fd === undefined) return;
    const log = this.opts.log.child(`conn${this.connectionsServed}`);
    this.connectionsServed++;
    const session = new VhostUserSession({ host: this.opts.host, model: this.opts.model, log, counters: this.counters });
    session.channelFactory = (chFd) =>
      new BackendChannel(this.opts.host, chFd, hasBit(session.negotiatedProtocolFeatures, ProtocolFeature.REPLY_ACK), log.child('backend-channel'));
    const conn = new VhostUserConnection(this.opts.host, fd, session, log, (reason) => {
      this.current = undefined;
      this.closeReasons.push(reason);
      if (this.closeReasons.length > 32) this.closeReasons.shift();
      this.onClose?.(reason);
      // A front-end may already be waiting in the backlog.
      setImmediate(() => this.acceptPending());
    });
    conn.onWire = this.onWire;
    this.current = conn;
    this.onSession?.(session);
  }

  /** Stops watching the listening socket for ACCEPT_RETRY_MS, then watches it (and accepts) again. */
  private pauseAccepting(): void {
    this.listenWatch?.stop();
    this.listenWatch = undefined;
    if (this.acceptRetry !== undefined) return;
    this.acceptRetry = setTimeout(() => {
      this.acceptRetry = undefined;
      if (this.listenFd === undefined) return; // closed meanwhile
      this.listenWatch = this.opts.host.watchReadable(this.listenFd, () => this.acceptPending());
      this.acceptPending();
    }, ACCEPT_RETRY_MS);
  }

  /** Closes the current connection (if any) and stops listening. */
  close(): void {
    if (this.acceptRetry !== undefined) clearTimeout(this.acceptRetry);
    this.acceptRetry = undefined;
    this.current?.close('server shutting down');
    this.listenWatch?.stop();
    this.listenWatch = undefined;
    if (this.listenFd !== undefined) {
      try {
        this.opts.host.close(this.listenFd);
      } catch {
        /* already closed */
      }
      this.listenFd = undefined;
    }
  }
}
