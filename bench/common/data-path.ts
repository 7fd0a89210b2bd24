// The relayed data path's loops that more than one bench runs between two VMs' reference drivers (bench/rdma and
// bench/vfio-user's data-path.ts): opening a VM, a connected RC pair, RDMA WRITE ping-pong latency as ib_write_lat
// and a stream of RDMA WRITEs as ib_write_bw. Each bench passes its own sizes and depths; what a loop times is said at the loop.
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { AccessFlag, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext, type Cq, type GuestBuffer, type Mr, type Pd, type Qp, type SendWr, type WorkCompletion } from '../../guest-driver-spec/driver/index.ts';
import { attachDevice, type AttachOptions } from '../../guest-driver-spec/driver/attach.ts';
import { RdmaDevice, type RdmaDeviceOptions } from '../../vmm-device/rdma/index.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';

export const now = (): bigint => process.hrtime.bigint();
export const usBetween = (a: bigint, b: bigint): number => Number(b - a) / 1000;

const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;

/** One VM of a two-VM testbed: its driver, a PD and a registered data buffer. */
export interface DataVm {
  name: string;
  ctx: RdmaContext;
  pd: Pd;
  buf: GuestBuffer;
  mr: Mr;
}

/** How one VM of a testbed is opened: its device (all but the VM's name and log) and its transport. */
export interface DataVmOptions {
  device: Omit<RdmaDeviceOptions, 'vmId' | 'log'>;
  /** Every step's cleanup goes to attach.cleanups. */
  attach: Omit<AttachOptions, 'model' | 'name'>;
  bufferBytes: number;
}

/** A device instance for VM `name`, the reference driver attached to it, a PD and a buffer registered for all access. */
export async function openDataVm(name: string, o: DataVmOptions): Promise<DataVm> {
  const device = await RdmaDevice.open({ ...o.device, vmId: name, log: new RecordingLogger(name) });
  o.attach.cleanups.add(`${name} device`, () => device.close());
  const transport = await attachDevice({ ...o.attach, model: device, name });
  const ctx = await RdmaContext.open(transport);
  o.attach.cleanups.add(`${name} driver (device reset)`, () => ctx.close());
  const pd = await ctx.allocPd();
  const buf = ctx.allocBuffer(o.bufferBytes);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  return { name, ctx, pd, buf, mr };
}

/** An RC QP on each VM, connected to each other, each with its own CQ. */
export interface RcPair {
  qa: Qp;
  qb: Qp;
  cqa: Cq;
  cqb: Cq;
  release: () => Promise<void>;
}

/** A pair's QP sizes on one VM (maxInlineData undefined: the driver's default). */
export interface RcPairCaps {
  maxSendWr: number;
  maxRecvWr: number;
  maxInlineData?: number | undefined;
}

/** Creates and connects an RC pair between `a` and `b`, CQs of `cqe` entries, QPs sized by `caps` per VM. */
export async function openRcPair(a: DataVm, b: DataVm, cqe: number, caps: (vm: DataVm) => RcPairCaps): Promise<RcPair> {
  const make = async (vm: DataVm): Promise<{ qp: Qp; cq: Cq }> => {
    const cq = await vm.ctx.createCq(cqe);
    const qp = await vm.ctx.createQp(vm.pd, { type: 'RC', sendCq: cq, recvCq: cq, maxSendSge: 1, maxRecvSge: 1, ...caps(vm) });
    return { qp, cq };
  };
  const A = await make(a);
  const B = await make(b);
  await A.qp.connect({ gid: b.ctx.gid, qpn: B.qp.qpNum }, { accessFlags: ALL_ACCESS });
  await B.qp.connect({ gid: a.ctx.gid, qpn: A.qp.qpNum }, { accessFlags: ALL_ACCESS });
  return {
    qa: A.qp,
    qb: B.qp,
    cqa: A.cq,
    cqb: B.cq,
    release: async () => {
      await A.qp.destroy();
      await B.qp.destroy();
      await A.cq.destroy();
      await B.cq.destroy();
    },
  };
}

/** Runs `body` on a new RC pair from `open` and releases the pair afterwards, whatever happens. */
export async function withRcPair<T>(open: () => Promise<RcPair>, body: (pair: RcPair) => Promise<T>): Promise<T> {
  const pair = await open();
  try {
    return await body(pair);
  } finally {
    await pair.release();
  }
}

export function checkWcs(wcs: readonly WorkCompletion[], what: string): void {
  for (const wc of wcs) if (wc.status !== WcStatus.SUCCESS) throw new Error(`${what}: completion ${wc.opcodeName} ${wc.statusName}`);
}

/** Yields to the event loop until `done()` holds; throws after `waitMs`. */
export async function waitUntil(done: () => boolean, what: string, waitMs: number): Promise<void> {
  if (done()) return;
  const deadline = Date.now() + waitMs;
  for (;;) {
    await yieldToLoop();
    if (done()) return;
    if (Date.now() > deadline) throw new Error(`${what}: nothing within ${waitMs} ms`);
  }
}

/** Tracks signaled send completions owed to one side and RECVs it got; checks every completion it sees. */
export class CompletionCounter {
  owedSends = 0;
  recvs = 0;
  constructor(readonly cq: Cq, readonly what: string, readonly waitMs: number) {}
  take(): void {
    const wcs = this.cq.poll();
    if (wcs.length === 0) return;
    checkWcs(wcs, this.what);
    for (const wc of wcs) {
      if (wc.opcode === WcOpcode.RECV) this.recvs++;
      else this.owedSends--;
    }
  }
  async drainSends(): Promise<void> {
    await waitUntil(
      () => {
        this.take();
        return this.owedSends <= 0;
      },
      `${this.what}: signaled completions`,
      this.waitMs,
    );
  }
}

export interface WriteLatencyParams {
  /** Bytes per WRITE; the peer watches the last one. */
  size: number;
  /** Kept iterations, after `warmup` ones that are not. */
  iters: number;
  warmup: number;
  /** One WRITE in this many is signaled (as ib_write_lat), so the send queue's slots come back. */
  signalEvery: number;
  /** Offsets in each VM's buffer: where it writes from, and where its peer writes to. */
  sendAt: number;
  recvAt: number;
  waitMs: number;
  /** Sends the payload inline when both QPs take that much (as perftest does); otherwise from the buffer. */
  inline: boolean;
  /**
   * Waits for each signaled WRITE's completion before the next iteration (outside the timed part), for a send queue
   * only a couple of groups deep; otherwise takes what has come after each iteration and the rest at the end.
   */
  awaitEachSignaled: boolean;
}

/** Called around the timed parts of the latency loop (a bench's split of each leg). */
export interface LegObserver {
  /** An iteration starts; `keep`: it is past the warm-up. */
  begin(keep: boolean): void;
  /** One kept leg: the side started posting at `start`, its postSend returned at `posted`, the peer saw it at `seen`. */
  leg(start: bigint, posted: bigint, seen: bigint): void;
  /** The iteration's timed part is over. */
  end(): void;
}

/**
 * RDMA WRITE ping-pong as ib_write_lat: A writes B's slot, B sees the last byte change and writes A's. Returns the
 * one-way latencies (half of each kept round trip), us.
 */
export async function writeLatency(pair: RcPair, a: DataVm, b: DataVm, p: WriteLatencyParams, observer?: LegObserver): Promise<number[]> {
  const inline = p.inline && pair.qa.caps.maxInlineData >= p.size && pair.qb.caps.maxInlineData >= p.size;
  const last = p.size - 1;
  const sides = [
    { vm: a, qp: pair.qa, peer: b, counter: new CompletionCounter(pair.cqa, 'WRITE latency A', p.waitMs) },
    { vm: b, qp: pair.qb, peer: a, counter: new CompletionCounter(pair.cqb, 'WRITE latency B', p.waitMs) },
  ] as const;
  const wr = (s: (typeof sides)[number], value: number, signaled: boolean): SendWr => {
    const payload = new Uint8Array(p.size);
    payload[last] = value;
    s.vm.buf.write(p.sendAt, payload);
    return {
      wrId: BigInt(value),
      opcode: 'RDMA_WRITE',
      signaled,
      remoteAddr: s.peer.mr.iova + BigInt(p.recvAt),
      rkey: s.peer.mr.rkey,
      ...(inline ? { inline: payload } : { sgList: [s.vm.mr.sge(p.sendAt, p.size)] }),
    };
  };
  for (const s of sides) s.vm.buf.fill(0, p.recvAt, p.size);
  const samples: number[] = [];
  for (let i = 0; i < p.iters + p.warmup; i++) {
    const value = (i % 255) + 1; // never 0, and different from the previous iteration's
    const signaled = i % p.signalEvery === p.signalEvery - 1;
    const keep = i >= p.warmup;
    observer?.begin(keep);
    const start = now();
    let legStart = start;
    for (const s of sides) {
      await s.qp.postSend([wr(s, value, signaled)]);
      const posted = now();
      if (signaled) s.counter.owedSends++;
      await waitUntil(() => s.peer.buf.read(p.recvAt + last, 1)[0] === value, `WRITE ${i} from ${s.vm.name}`, p.waitMs);
      const seen = now();
      if (keep) observer?.leg(legStart, posted, seen);
      legStart = seen;
    }
    if (keep) samples.push(usBetween(start, legStart) / 2);
    observer?.end();
    for (const s of sides) {
      if (p.awaitEachSignaled) await s.counter.drainSends();
      else s.counter.take();
    }
  }
  if (!p.awaitEachSignaled) for (const s of sides) await s.counter.drainSends(); // what the iterations left
  return samples;
}

export interface WriteBandwidthParams {
  /** Bytes per WRITE, from offset 0 of A's buffer to offset `size` of B's. */
  size: number;
  /** WRITEs in the stream (rounded up to whole signaled groups). */
  iters: number;
  /** WRITEs in flight at most. */
  txDepth: number;
  /** One WRITE in this many is signaled. */
  signalEvery: number;
  waitMs: number;
}

/**
 * A streams `iters` WRITEs into B, one work request per post (as ib_write_bw posts them), at most `txDepth` in
 * flight, every `signalEvery`-th signaled. When the window is full the guest sleeps on the CQ's completion
 * interrupt (arm, poll, wait) instead of spinning: a spinning guest would take the CPU rxe's kernel work needs.
 * Returns MiB/s.
 */
export async function writeBandwidth(pair: RcPair, a: DataVm, b: DataVm, p: WriteBandwidthParams): Promise<number> {
  const total = Math.ceil(p.iters / p.signalEvery) * p.signalEvery;
  const wr = (i: number): SendWr => ({
    wrId: BigInt(i),
    opcode: 'RDMA_WRITE',
    signaled: i % p.signalEvery === p.signalEvery - 1,
    sgList: [a.mr.sge(0, p.size)],
    remoteAddr: b.mr.iova + BigInt(p.size),
    rkey: b.mr.rkey,
  });
  let posted = 0;
  let completed = 0;
  const start = now();
  while (completed < total) {
    while (posted < total && posted - completed < p.txDepth) await pair.qa.postSend([wr(posted++)]);
    let wcs = pair.cqa.poll();
    if (wcs.length === 0) wcs = await pair.cqa.waitPoll(1, p.waitMs);
    if (wcs.length === 0) throw new Error(`bandwidth run stalled at ${completed}/${total} WRITEs`);
    checkWcs(wcs, 'WRITE bandwidth');
    completed += wcs.length * p.signalEvery;
  }
  const seconds = Number(now() - start) / 1e9;
  return (total * p.size) / seconds / 2 ** 20;
}
