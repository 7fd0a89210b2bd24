// Queue offload over vhost-user (virtio/device.ts QueueOffload): a ring's kick and call eventfds lent to a native
// thread. take() hands out duplicates (the taker owns and closes them) and stops watching the kick, so the model is
// not called for that queue's kicks; giveBack() watches the kick again and serves whatever came meanwhile.
//
// The front-end may replace the fds at any time. A lend ends without a giveBack ("revoked") when the fds it
// handed out stop being the ring's: a new SET_VRING_KICK or SET_VRING_CALL for the ring, GET_VRING_BASE (the ring
// stops), a device reset, or the connection going away. The taker's onRevoked callback is told why, after the
// transport has taken the ring back (it watches the new kick itself, so no kick is lost): the taker closes its
// duplicates and may take the queue again to get the new fds. giveBack() after a revocation is a no-op.

import type { Logger } from '../../util/log.ts';
import type { QueueOffload } from '../../virtio/device.ts';
import type { HostOps } from '../../host/host.ts';
import type { Ring } from './rings.ts';

/** What the offload needs from the session. */
export interface OffloadEnv {
  readonly host: HostOps;
  readonly log: Logger;
  ring(index: number): Ring | undefined;
  /** Watches ring `index`'s kick fd again (the session's own kick handler). */
  watchKick(index: number, r: Ring): void;
  /** Serves ring `index` as for a kick: drains what is available and consumes a pending kick. */
  serveKick(index: number): void;
}

export interface OffloadCounters {
  taken: number;
  givenBack: number;
  revoked: number;
  /** take() refused (queue not started, already taken, dup failed). */
  refused: number;
}

export class VhostUserQueueOffload implements QueueOffload {
  readonly counters: OffloadCounters = { taken: 0, givenBack: 0, revoked: 0, refused: 0 };

  constructor(private readonly env: OffloadEnv) {}

  take(index: number, onRevoked?: (reason: string) => void): { kickFd: number; callFd: number | undefined } | undefined {
    const r = this.env.ring(index);
    const refuse = (why: string): undefined => {
      this.counters.refused++;
      this.env.log.log('warn', 'queue offload refused', { queue: index, why });
      return undefined;
    };
    if (r === undefined) return refuse(`queue ${index} does not exist`);
    if (r.taken !== undefined) return refuse('the queue is already taken');
    if (r.queue === undefined || r.kickFd === undefined) return refuse('the ring is not started (no kick fd yet)');
    let kickFd: number | undefined;
    let callFd: number | undefined;
    try {
      kickFd = this.env.host.dup(r.kickFd);
      if (r.callFd !== undefined) callFd = this.env.host.dup(r.callFd);
    } catch (e) {
      if (kickFd !== undefined) this.env.host.close(kickFd);
      return refuse(`dup failed: ${(e as Error).message}`);
    }
    r.kickWatch?.stop();
    r.kickWatch = undefined;
    r.taken = { onRevoked };
    this.counters.taken++;
    this.env.log.log('info', 'queue lent to a native thread', { queue: index, call: callFd !== undefined });
    return { kickFd, callFd };
  }

  giveBack(index: number): void {
    const r = this.env.ring(index);
    if (r?.taken === undefined) {
      // Revoked meanwhile (the transport took it back already), or never taken.
      this.env.log.log('info', 'giveBack of a queue that is not taken; nothing to do', { queue: index });
      return;
    }
    r.taken = undefined;
    this.counters.givenBack++;
    if (r.kickFd !== undefined && r.kickWatch === undefined) this.env.watchKick(index, r);
    // A kick the driver sent after the taker's last look: the watcher would see it too, but not before the next
    // loop turn; buffers made available without a kick (notifications off) are served only this way.
    this.env.serveKick(index);
  }

  /**
   * Ends the lend of ring `index` because its fds are no longer the ones handed out, or it stops. The caller
   * (the session) restores watching as its situation needs; then the taker is told.
   */
  revoke(index: number, r: Ring, reason: string): void {
    const t = r.taken;
    if (t === undefined) return;
    r.taken = undefined;
    this.counters.revoked++;
    this.env.log.log('info', 'queue offload revoked', { queue: index, reason });
    try {
      t.onRevoked?.(reason);
    } catch (e) {
      this.env.log.log('error', 'the taker failed handling a revocation', { queue: index, error: (e as Error).message });
    }
  }
}
