// The driver's interrupts over the reference front-end (vhost-user-transport.ts): one poll watcher per call eventfd,
// kept until the transport closes, instead of the front-end's waitCall, which starts and stops a watcher for every
// wait. In QEMU a call eventfd is an irqfd the kernel serves; here the front-end is this process, and a watcher made
// per wait (a poll handle, two epoll_ctl calls) was ~7% of the CPU time of a connection set-up through the device
// (bench/setup/fake.ts under --cpu-prof). The transport owns its front-end's call eventfds for the front-end's life
// (it never replaces them), so the watchers stop before the eventfds close.
//
// A count the eventfd delivers while nobody waits is kept and handed to the next wait, as the eventfd itself would
// have kept it. Every waiter of one eventfd wakes on a count (each then looks at its own ring).

import type { Watch } from '../../vmm-device/host/host.ts';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';

interface Waiter {
  resolve: (count: bigint) => void;
  timer: NodeJS.Timeout;
}

interface Entry {
  watch: Watch;
  /** Counted while nobody waited. */
  kept: bigint;
  waiters: Waiter[];
}

export class CallWaiters {
  private readonly entries = new Map<number, Entry>();
  private closed = false;

  constructor(private readonly host: SysHost) {}

  /** Resolves the eventfd's counter once it fires (at once when it fired since the last wait), or 0n on timeout. */
  wait(fd: number, timeoutMs: number): Promise<bigint> {
    if (this.closed) return Promise.resolve(0n);
    const e = this.entries.get(fd) ?? this.watch(fd);
    if (e.kept > 0n) {
      const v = e.kept;
      e.kept = 0n;
      return Promise.resolve(v);
    }
    return new Promise((resolve) => {
      const w: Waiter = {
        resolve,
        timer: setTimeout(() => {
          const i = e.waiters.indexOf(w);
          if (i >= 0) e.waiters.splice(i, 1);
          resolve(0n);
        }, timeoutMs),
      };
      e.waiters.push(w);
    });
  }

  /** Stops every watcher (before the front-end closes the eventfds) and wakes every waiter with 0n. */
  close(): void {
    this.closed = true;
    for (const e of this.entries.values()) {
      e.watch.stop();
      for (const w of e.waiters.splice(0)) {
        clearTimeout(w.timer);
        w.resolve(0n);
      }
    }
    this.entries.clear();
  }

  private watch(fd: number): Entry {
    const e: Entry = { watch: { stop: () => undefined }, kept: 0n, waiters: [] };
    e.watch = this.host.watchReadable(fd, () => {
      const v = this.host.eventfdRead(fd);
      if (v === undefined) return;
      if (e.waiters.length === 0) {
        e.kept += v;
        return;
      }
      for (const w of e.waiters.splice(0)) {
        clearTimeout(w.timer);
        w.resolve(v);
      }
    });
    this.entries.set(fd, e);
    return e;
  }
}
