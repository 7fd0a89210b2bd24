// Shared pieces of the tests that run inside the soft-RoCE test host (scripts/rxe/run.sh): rxe0, two connected
// QPs on it, completion waiting through the completion channel, and the leak check through `rdma resource show`.

import { execFileSync } from 'node:child_process';
import type { Test } from 'tap';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { Access, GidType, Mtu, PortState, QpState, QpType } from '../../vmm-device/verbs/constants.ts';
import type {
  CqHandle,
  DeviceHandle,
  GidEntry,
  HostVerbs,
  MrHandle,
  PdHandle,
  QpHandle,
} from '../../vmm-device/verbs/host-verbs.ts';
import { WcBuffer } from '../../vmm-device/verbs/layout.ts';
import type { WorkCompletion } from '../../vmm-device/verbs/layout.ts';

export const RXE_DEVICE = 'rxe0';
export const RXE_PORT = 1;
/** GID index 1 of rxe0: the RoCE v2 IPv4-mapped address of its netdev. */
export const RXE_GID_INDEX = 1;
/** How long a test waits for completions before failing (TCG is slow, but not this slow). */
export const COMPLETION_TIMEOUT_MS = 10_000;
export const ALL_ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC;

/** Fails the whole file at once when run outside the test host, with the command to use. */
export function requireTestHost(): void {
  if (process.env['VRDMA_IN_TEST_HOST'] !== '1')
    throw new Error(
      'test/rxe runs inside the soft-RoCE test host: `npm run test:rxe` or `bash scripts/rxe/run.sh -- npx tap test/rxe/<file>`',
    );
}

/** A CQ with a completion waiter driven by the completion channel (the fd watched on Node's loop). */
export class WaitableCq {
  private wake: (() => void) | undefined;
  readonly wcs = new WcBuffer(64);
  events = 0;
  cq!: CqHandle;

  constructor(private readonly verbs: HostVerbs) {}

  async create(device: DeviceHandle, cqe: number): Promise<this> {
    this.cq = await this.verbs.createCq(device, cqe, {
      onCompletionEvent: () => {
        this.events++;
        const w = this.wake;
        this.wake = undefined;
        w?.();
      },
    });
    return this;
  }

  /** Waits for exactly `n` completions (polling, then arming the CQ and sleeping on its event). */
  async waitFor(n: number, timeoutMs = COMPLETION_TIMEOUT_MS): Promise<WorkCompletion[]> {
    const out: WorkCompletion[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.drainInto(out, n);
      if (out.length >= n) return out;
      const woken = new Promise<void>((resolve) => (this.wake = resolve));
      this.verbs.reqNotifyCq(this.cq, false);
      // A completion that arrived between the poll and the arming raises no event: poll once more.
      this.drainInto(out, n);
      if (out.length >= n) {
        this.wake = undefined;
        return out;
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} completions (got ${out.length})`);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([woken, new Promise<void>((resolve) => (timer = setTimeout(resolve, left)))]);
      clearTimeout(timer);
    }
  }

  /** Completions available right now, without waiting. */
  pollNow(): WorkCompletion[] {
    const out: WorkCompletion[] = [];
    this.drainInto(out, Infinity);
    return out;
  }

  private drainInto(out: WorkCompletion[], n: number): void {
    while (out.length < n) {
      const got = this.verbs.pollCq(this.cq, this.wcs, Math.min(this.wcs.capacity, n - out.length));
      for (let i = 0; i < got; i++) out.push(this.wcs.get(i));
      if (got === 0) return;
    }
  }
}

/** rxe0 opened, with its IPv4-mapped RoCE v2 GID, and a list of what to release at the end. */
export class RxeFixture {
  readonly verbs = new NativeVerbs();
  device!: DeviceHandle;
  gid!: GidEntry;
  pd!: PdHandle;
  private readonly cleanups: { key: object | undefined; release: () => Promise<void> }[] = [];

  static async open(): Promise<RxeFixture> {
    requireTestHost();
    const f = new RxeFixture();
    f.device = await f.verbs.openDevice(RXE_DEVICE);
    f.defer(() => f.verbs.closeDevice(f.device));
    const port = await f.verbs.queryPort(f.device, RXE_PORT);
    if (port.state !== PortState.ACTIVE) throw new Error(`rxe0 port 1 is not ACTIVE (state ${port.state})`);
    const gids = await f.verbs.queryGidTable(f.device);
    const gid = gids.find((g) => g.index === RXE_GID_INDEX && g.port === RXE_PORT);
    if (gid === undefined || gid.type !== GidType.ROCE_V2)
      throw new Error(`rxe0 has no RoCE v2 GID at index ${RXE_GID_INDEX}: ${JSON.stringify(gids)}`);
    f.gid = gid;
    f.pd = await f.verbs.allocPd(f.device);
    f.defer(() => f.verbs.deallocPd(f.pd));
    return f;
  }

  /** Registers a release to run at close(), in reverse order of registration; `key` lets release() run it early. */
  defer(release: () => Promise<void>, key?: object): void {
    this.cleanups.push({ key, release });
  }

  /** Runs the deferred release registered for `key` now (a test destroying an object itself). */
  async release(key: object): Promise<void> {
    const i = this.cleanups.findIndex((c) => c.key === key);
    if (i < 0) throw new Error('nothing deferred for this object');
    const [c] = this.cleanups.splice(i, 1);
    await c!.release();
  }

  async close(): Promise<void> {
    const errors: unknown[] = [];
    while (this.cleanups.length > 0) {
      try {
        await this.cleanups.pop()!.release();
      } catch (e) {
        errors.push(e);
      }
    }
    if (errors.length > 0) throw new AggregateError(errors, `cleanup failed: ${errors.map(String).join('; ')}`);
  }

  async cq(cqe = 64): Promise<WaitableCq> {
    const w = await new WaitableCq(this.verbs).create(this.device, cqe);
    this.defer(() => this.verbs.destroyCq(w.cq), w.cq);
    return w;
  }

  async mr(memory: ArrayBuffer, access = ALL_ACCESS, iova?: number | bigint): Promise<MrHandle> {
    const mr = await this.verbs.regMr(this.pd, memory, iova === undefined ? { access } : { access, iova });
    this.defer(() => this.verbs.deregMr(mr), mr);
    return mr;
  }

  async qp(qpType: number, sendCq: WaitableCq, recvCq: WaitableCq, depth = 32): Promise<QpHandle> {
    const qp = await this.verbs.createQp(this.pd, {
      qpType,
      sendCq: sendCq.cq,
      recvCq: recvCq.cq,
      maxSendWr: depth,
      maxRecvWr: depth,
      maxSendSge: 4,
      maxRecvSge: 4,
      maxInlineData: 0,
    });
    this.defer(() => this.verbs.destroyQp(qp), qp);
    return qp;
  }

  /** RESET -> INIT -> RTR -> RTS of an RC QP towards `remote` (a QP on the same rxe0). */
  async connectRc(qp: QpHandle, remote: QpHandle, options: { rqPsn?: number; sqPsn?: number } = {}): Promise<void> {
    const v = this.verbs;
    await v.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: RXE_PORT, qpAccessFlags: ALL_ACCESS });
    await v.modifyQp(qp, {
      qpState: QpState.RTR,
      pathMtu: Mtu.MTU_1024,
      destQpNum: remote.qpNum,
      rqPsn: options.rqPsn ?? 0,
      maxDestRdAtomic: 4,
      minRnrTimer: 12,
      ahAttr: {
        portNum: RXE_PORT,
        sl: 0,
        grh: { dgid: this.gid.gid, sgidIndex: RXE_GID_INDEX, hopLimit: 64, trafficClass: 0, flowLabel: 0 },
      },
    });
    await v.modifyQp(qp, {
      qpState: QpState.RTS,
      sqPsn: options.sqPsn ?? 0,
      timeout: 14,
      retryCnt: 7,
      rnrRetry: 7,
      maxRdAtomic: 4,
    });
  }

  /** Two RC QPs on rxe0 connected to each other, each with its own send and receive CQs. */
  async rcPair(depth = 32): Promise<{ a: QpEnd; b: QpEnd }> {
    const ends: QpEnd[] = [];
    for (let i = 0; i < 2; i++) {
      const sendCq = await this.cq();
      const recvCq = await this.cq();
      ends.push({ qp: await this.qp(QpType.RC, sendCq, recvCq, depth), sendCq, recvCq });
    }
    const [a, b] = ends as [QpEnd, QpEnd];
    await this.connectRc(a.qp, b.qp);
    await this.connectRc(b.qp, a.qp);
    return { a, b };
  }
}

export interface QpEnd {
  qp: QpHandle;
  sendCq: WaitableCq;
  recvCq: WaitableCq;
}

export interface RdmaResources {
  qp: number;
  cq: number;
  mr: number;
  pd: number;
}

/** This process's QPs, CQs, MRs and PDs as the kernel lists them (`rdma -j resource show <kind>`). */
export function rdmaResourcesOf(pid: number): RdmaResources {
  const out: RdmaResources = { qp: 0, cq: 0, mr: 0, pd: 0 };
  for (const kind of ['qp', 'cq', 'mr', 'pd'] as const) {
    const json = execFileSync('rdma', ['-j', 'resource', 'show', kind], { encoding: 'utf8' });
    const entries = JSON.parse(json.trim() === '' ? '[]' : json) as { pid?: number }[];
    out[kind] = entries.filter((e) => e.pid === pid).length;
  }
  return out;
}

/** A buffer filled with a pattern that differs for every byte position and seed. */
export function pattern(size: number, seed: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 131 + seed * 17 + (i >> 8)) & 0xff;
  return b;
}

/**
 * Runs `body` with a fresh fixture, releases everything it made (also when it fails), then checks with
 * `rdma resource show` that the process holds no QP, CQ, MR or PD any more.
 */
export async function withRxe(t: Test, body: (f: RxeFixture) => Promise<void>): Promise<void> {
  const f = await RxeFixture.open();
  let failure: unknown;
  try {
    await body(f);
  } catch (e) {
    failure = e;
  }
  try {
    await f.close();
  } catch (e) {
    // Reported on its own, so that it never hides the test's own failure.
    t.fail(`releasing the test's objects failed: ${String(e)}`);
  }
  t.same(rdmaResourcesOf(process.pid), { qp: 0, cq: 0, mr: 0, pd: 0 }, 'no QP, CQ, MR or PD left (rdma resource show)');
  if (failure !== undefined) throw failure;
}
