// The rings of one vhost-user session: the SET_VRING_* / GET_VRING_BASE state machine, the kick eventfds on
// Node's loop, the call and error eventfds, the rebuild of started rings over a new memory map, and the queue
// offload (offload.ts) that lends a ring's kick and call fds to a native thread. The session (session.ts) owns the
// negotiation, the memory table and the device lifecycle, and routes ring requests here.

import type { Logger } from '../../util/log.ts';
import type { VirtioDeviceCore } from '../../virtio/core.ts';
import { checkQueueOptions } from '../../virtqueue/index.ts';
import type { QueueOptions } from '../../virtqueue/queue.ts';
import type { HostOps } from '../../host/host.ts';
import { FrontendRequest, VhostUserProtocolError } from './messages.ts';
import { VhostUserQueueOffload } from './offload.ts';
import {
  PACKED_WRAP_BIT,
  hasResubmissions,
  newRing,
  queueOptions,
  rebuildQueue,
  resolveRings,
  ringBase,
  startQueue,
  type Ring,
  type RingEnv,
} from './rings.ts';

/** What the ring set needs from its session. */
export interface RingSetEnv {
  readonly host: HostOps;
  readonly log: Logger;
  readonly core: VirtioDeviceCore;
  readonly counters: { kicks: number; droppedKicks: number; interrupts: number };
  /** Features, memory and inflight area as negotiated now. */
  ringEnv(): RingEnv;
  /** VHOST_USER_F_PROTOCOL_FEATURES acked: rings start disabled until SET_VRING_ENABLE (vhost-user.rst). */
  protocolFeaturesAcked(): boolean;
  /** The first kick of an enabled ring starts a device nobody started (session.ts, the kick fallback). */
  startDevice(): void;
}

type Code = (typeof FrontendRequest)[keyof typeof FrontendRequest];

function badState(code: Code, why: string): never {
  throw new VhostUserProtocolError('BadState', code, why);
}

export class RingSet {
  private readonly rings: Ring[];
  readonly offload: VhostUserQueueOffload;

  constructor(
    count: number,
    private readonly env: RingSetEnv,
  ) {
    this.rings = Array.from({ length: count }, newRing);
    this.offload = new VhostUserQueueOffload({
      host: env.host,
      log: env.log.child('offload'),
      ring: (i) => this.rings[i],
      watchKick: (i, r) => this.watchKick(i, r),
      serveKick: (i) => this.onKick(i),
    });
  }

  get count(): number {
    return this.rings.length;
  }

  get anyStarted(): boolean {
    return this.rings.some((r) => r.queue !== undefined);
  }

  /** Every ring (the session's activation and diagnostics read them). */
  get all(): readonly Ring[] {
    return this.rings;
  }

  /** The ring at `index`, or BadState for request `code`. */
  ring(index: number, code: Code): Ring {
    const r = this.rings[index];
    if (r === undefined) badState(code, `queue index ${index} is not below the queue count ${this.rings.length}`);
    return r;
  }

  private get packed(): boolean {
    return this.env.ringEnv().packed;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Requests

  setNum(index: number, num: number): void {
    const code = FrontendRequest.SET_VRING_NUM;
    const r = this.ring(index, code);
    if (r.queue !== undefined) badState(code, `ring ${index} is started; stop it (GET_VRING_BASE) first`);
    const max = this.env.core.maxQueueSize(index);
    if (num < 1 || num > max) badState(code, `ring ${index} size ${num} is not in 1..${max}`);
    if (!this.packed && (num & (num - 1)) !== 0) badState(code, `split ring ${index} size ${num} is not a power of two`);
    r.num = num;
  }

  setAddr(index: number, addr: { desc: number; avail: number; used: number; flags: number }): void {
    const code = FrontendRequest.SET_VRING_ADDR;
    const r = this.ring(index, code);
    if (r.num === undefined) badState(code, `ring ${index} has no size yet (SET_VRING_NUM first)`);
    if (this.packed && (addr.avail % 4 !== 0 || addr.used % 4 !== 0)) badState(code, 'packed ring event suppression areas must be 4-byte aligned');
    resolveRings(this.env.ringEnv(), index, r.num, addr); // throws BadState when an area is not inside one region
    r.addr = { ...addr };
    if (r.queue !== undefined) this.restartQueue(index, r);
  }

  setBase(index: number, num: number): void {
    const code = FrontendRequest.SET_VRING_BASE;
    const r = this.ring(index, code);
    if (r.queue !== undefined) badState(code, `ring ${index} is started; stop it (GET_VRING_BASE) first`);
    if (this.packed) {
      if ((num & ~(PACKED_WRAP_BIT | 0x7fff)) !== 0) badState(code, `packed ring base 0x${num.toString(16)} has bits above 15`);
      if (r.num !== undefined && (num & 0x7fff) >= r.num) badState(code, `packed ring base index ${num & 0x7fff} is not below the size ${r.num}`);
    } else if (num > 0xffff) {
      badState(code, `split ring base ${num} does not fit 16 bits`);
    }
    r.base = num;
  }

  /** GET_VRING_BASE: stops the ring and returns where the front-end resumes. */
  stop(index: number): number {
    const r = this.ring(index, FrontendRequest.GET_VRING_BASE);
    this.offload.revoke(index, r, 'the front-end stopped the ring (GET_VRING_BASE)');
    this.stopKickWatch(r);
    if (r.queue !== undefined) {
      r.base = ringBase(r.queue, this.packed);
      r.queue = undefined;
    }
    return r.base;
  }

  /** SET_VRING_KICK with an fd (owned from here: kept, or closed on refusal). The caller checked the index. */
  setKick(index: number, fd: number): void {
    const code = FrontendRequest.SET_VRING_KICK;
    const refuse = (why: string): never => {
      this.safeClose(fd);
      badState(code, why);
    };
    const r = this.ring(index, code);
    if (r.num === undefined || r.addr === undefined) refuse(`ring ${index} is not configured (SET_VRING_NUM and SET_VRING_ADDR first)`);
    const env = this.env.ringEnv();
    let opts: QueueOptions;
    try {
      opts = queueOptions(env, index, r);
    } catch (e) {
      return refuse((e as Error).message);
    }
    const why = checkQueueOptions(env.packed ? 'packed' : 'split', opts);
    if (why !== undefined) refuse(`ring ${index}: ${why}`);
    // A new kick fd for a started ring replaces the old one; the queue keeps its position.
    this.stopKickWatch(r);
    r.kickFd = fd;
    r.queue = startQueue(env, index, opts, r.queue);
    this.env.core.setQueue(index, r.queue);
    this.watchKick(index, r);
    // A lent queue's kick fd is no longer the one the taker holds: the transport serves the new one itself.
    this.offload.revoke(index, r, 'the front-end replaced the kick eventfd (SET_VRING_KICK)');
    if (this.env.core.isActive && hasResubmissions(r.queue)) this.notifyCore(index);
  }

  /** SET_VRING_CALL: `fd` undefined means none (NOFD). The caller checked the index (ring()) before taking the fd. */
  setCall(index: number, fd: number | undefined): void {
    const r = this.ring(index, FrontendRequest.SET_VRING_CALL);
    if (r.callFd !== undefined) this.safeClose(r.callFd);
    r.callFd = fd;
    if (r.taken !== undefined) {
      // The taker signals on a call fd the front-end no longer listens to: take the ring back, serve it here.
      this.offload.revoke(index, r, 'the front-end replaced the call eventfd (SET_VRING_CALL)');
      if (r.kickFd !== undefined) this.watchKick(index, r);
      this.onKick(index);
    }
  }

  /** SET_VRING_ERR, as SET_VRING_CALL. */
  setErr(index: number, fd: number | undefined): void {
    const r = this.ring(index, FrontendRequest.SET_VRING_ERR);
    if (r.errFd !== undefined) this.safeClose(r.errFd);
    r.errFd = fd;
  }

  setEnable(index: number, enable: boolean): void {
    const r = this.ring(index, FrontendRequest.SET_VRING_ENABLE);
    r.enabled = enable;
    // Buffers posted while the ring was disabled are served now.
    if (enable && r.queue !== undefined && this.env.core.isActive) this.notifyCore(index);
  }

  /** RESET_OWNER: deprecated; vhost-user.rst recommends ignoring it or disabling all rings. Rings are disabled. */
  disableAll(): void {
    for (const r of this.rings) r.enabled = false;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Memory map changes

  /** Rebuilds every started ring over the current memory (their views pointed into the old mappings). */
  rebuildAll(): void {
    this.rings.forEach((r, i) => {
      if (r.queue !== undefined) this.restartQueue(i, r);
    });
  }

  /** Rebuilds a started ring's queue (new memory map or new addresses), keeping its position. */
  private restartQueue(index: number, r: Ring): void {
    try {
      r.queue = rebuildQueue(this.env.ringEnv(), index, r);
      this.env.core.setQueue(index, r.queue);
    } catch (e) {
      this.env.log.log('error', 'ring no longer inside guest memory after a memory map change', { queue: index, error: (e as Error).message });
      // The old queue's views point into a region about to be unmapped: the model must not reach it any more.
      r.queue = undefined;
      this.env.core.setQueue(index, undefined);
      this.env.core.queueBroken(index, e as Error);
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Kicks and interrupts

  private watchKick(index: number, r: Ring): void {
    r.kickWatch = this.env.host.watchReadable(r.kickFd!, () => this.onKick(index));
  }

  private stopKickWatch(r: Ring): void {
    r.kickWatch?.stop();
    r.kickWatch = undefined;
    if (r.kickFd !== undefined) this.safeClose(r.kickFd);
    r.kickFd = undefined;
  }

  private onKick(index: number): void {
    const r = this.rings[index];
    if (r === undefined || r.kickFd === undefined || r.taken !== undefined) return;
    const core = this.env.core;
    const enabled = r.enabled || !this.env.protocolFeaturesAcked();
    if (r.queue !== undefined && core.isActive && !core.isQueueStopped(index) && enabled) {
      // A running ring is served before its kick eventfd is read, so that the read syscall is not on the request's
      // path. The read may consume a kick for a buffer the driver published after the drain ended (the driver
      // publishes before it kicks, so that buffer is visible now): hence the second look.
      this.notifyCore(index);
      const value = this.readKick(index, r);
      if (value === undefined) return;
      this.env.counters.kicks++;
      if (r.queue?.hasAvailable() === true && !core.isQueueStopped(index)) this.notifyCore(index);
      return;
    }
    const value = this.readKick(index, r);
    if (value === undefined) return;
    this.env.counters.kicks++;
    if (r.queue === undefined || !enabled) {
      this.env.counters.droppedKicks++;
      return;
    }
    if (!core.isActive) this.env.startDevice();
    this.notifyCore(index);
  }

  /** Reads (resets) a ring's kick eventfd: its count, undefined when nothing was pending or the read failed. */
  private readKick(index: number, r: Ring): bigint | undefined {
    try {
      return this.env.host.eventfdRead(r.kickFd!);
    } catch (e) {
      this.env.log.log('error', 'kick eventfd read failed', { queue: index, error: (e as Error).message });
      this.stopKickWatch(r);
      return undefined;
    }
  }

  /** Rings restarted with chains in flight get them served without waiting for a kick that may never come. */
  serveResubmissions(): void {
    this.rings.forEach((r, i) => {
      if (hasResubmissions(r.queue)) this.notifyCore(i);
    });
  }

  /** The model is called for a ring's buffers unless the ring is lent to a native thread. */
  private notifyCore(index: number): void {
    if (this.rings[index]?.taken !== undefined) return;
    try {
      this.env.core.notify(index);
    } catch (e) {
      // The core catches what the model throws; this is a bug in the core itself: the device needs a reset, the
      // process goes on.
      this.env.core.queueBroken(index, e as Error);
    }
  }

  interrupt(index: number): void {
    const fd = this.rings[index]?.callFd;
    if (fd === undefined) return;
    this.env.counters.interrupts++;
    try {
      this.env.host.eventfdWrite(fd, 1n);
    } catch (e) {
      this.env.log.log('error', 'call eventfd write failed', { queue: index, error: (e as Error).message });
    }
  }

  /** A broken queue: tell the front-end on that ring's error fd (QEMU reports "vhost vring error"). */
  signalBroken(): void {
    this.rings.forEach((r, i) => {
      if (r.errFd !== undefined && r.queue !== undefined && this.env.core.isQueueStopped(i)) {
        try {
          this.env.host.eventfdWrite(r.errFd, 1n);
        } catch {
          /* the front-end closed it; nothing to tell */
        }
      }
    });
  }

  // -------------------------------------------------------------------------------------------------------------
  // Resets and teardown

  /** Lends the model did not give back by a device reset: revoked, and the kicks watched by the transport again. */
  reclaimTakes(reason: string): void {
    this.rings.forEach((r, i) => {
      if (r.taken === undefined) return;
      this.offload.revoke(i, r, reason);
      if (r.kickFd !== undefined && r.kickWatch === undefined) this.watchKick(i, r);
    });
  }

  /** Forgets every ring (RESET_DEVICE, the connection closing): fds closed, watchers stopped, lends revoked. */
  clearAll(reason: string): void {
    this.rings.forEach((r, i) => {
      this.offload.revoke(i, r, reason);
      this.stopKickWatch(r);
      if (r.callFd !== undefined) this.safeClose(r.callFd);
      if (r.errFd !== undefined) this.safeClose(r.errFd);
      Object.assign(r, newRing());
    });
  }

  describe(): { num?: number; base: number; started: boolean; enabled: boolean; kick: boolean; call: boolean; err: boolean; taken: boolean }[] {
    return this.rings.map((r) => ({
      ...(r.num === undefined ? {} : { num: r.num }),
      base: r.base,
      started: r.queue !== undefined,
      enabled: r.enabled,
      kick: r.kickFd !== undefined,
      call: r.callFd !== undefined,
      err: r.errFd !== undefined,
      taken: r.taken !== undefined,
    }));
  }

  private safeClose(fd: number): void {
    try {
      this.env.host.close(fd);
    } catch (e) {
      this.env.log.log('error', 'close failed', { fd, error: (e as Error).message });
    }
  }
}
