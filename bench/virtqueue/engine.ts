// Our side of `npm run bench:virtqueue`: the same workload as native-peer.c (batches of 3-descriptor chains,
// EVENT_IDX on), device side timed: pop (walk, check, translate) + pushUsed. Split and packed. Time is the
// process's CPU time (all its threads, the garbage collector's included), as native-peer.c measures its own.

import { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import {
  PackedQueue,
  SplitQueue,
  VirtqueueError,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  type DeviceQueue,
} from '../../vmm-device/virtqueue/index.ts';

const MEM_SIZE = 64 << 20;
const DESC_GPA = 0x0;
const DRIVER_GPA = 0x100000;
const DEVICE_GPA = 0x200000;
const BUF_GPA = 0x400000;

export interface EngineResult {
  chains: number;
  deviceNs: number;
  chainsPerSec: number;
}

function chainBuffers(k: number): [number, number, number] {
  const base = BUF_GPA + k * 4096;
  return [base, base + 256, base + 1024];
}

/** Runs the split workload for about `seconds`; the queue's own pop/pushUsed are the timed part. */
export function benchSplit(qsize: number, batch: number, seconds: number): EngineResult {
  const buf = new ArrayBuffer(MEM_SIZE);
  const bytes = new Uint8Array(buf);
  const dv = new DataView(buf);
  const memory = new GuestMemory([{ guestPhysAddr: 0, size: MEM_SIZE, buffer: buf }]);
  for (let k = 0; k < batch; k++) {
    const [a, b, c] = chainBuffers(k);
    const d = DESC_GPA + 3 * k * 16;
    const put = (off: number, addr: number, len: number, flags: number, next: number) => {
      dv.setBigUint64(off, BigInt(addr), true);
      dv.setUint32(off + 8, len, true);
      dv.setUint16(off + 12, flags, true);
      dv.setUint16(off + 14, next, true);
    };
    put(d, a, 16, VIRTQ_DESC_F_NEXT, 3 * k + 1);
    put(d + 16, b, 64, VIRTQ_DESC_F_NEXT, 3 * k + 2);
    put(d + 32, c, 64, VIRTQ_DESC_F_WRITE, 0);
  }
  const q = new SplitQueue({
    size: qsize,
    rings: {
      desc: bytes.subarray(DESC_GPA, DESC_GPA + 16 * qsize),
      driver: bytes.subarray(DRIVER_GPA, DRIVER_GPA + 6 + 2 * qsize),
      device: bytes.subarray(DEVICE_GPA, DEVICE_GPA + 6 + 8 * qsize),
    },
    memory,
    eventIdx: true,
    indirect: true,
  });
  const avail = new Uint16Array(buf, DRIVER_GPA, 3 + qsize);
  const used = new Uint16Array(buf, DEVICE_GPA, 2);
  let availIdx = 0;
  let usedSeen = 0;
  return run(seconds, q, () => {
    for (let k = 0; k < batch; k++) avail[2 + ((availIdx + k) % qsize)] = 3 * k;
    availIdx = (availIdx + batch) & 0xffff;
    Atomics.store(avail, 1, availIdx);
  }, () => {
    const u = Atomics.load(used, 1);
    if (((u - usedSeen) & 0xffff) !== batch) throw new Error(`lost chains: used moved ${(u - usedSeen) & 0xffff}`);
    usedSeen = u;
  });
}

/** The same workload on a packed ring (no native peer exists for packed: libvhost-user has split rings only). */
export function benchPacked(qsize: number, batch: number, seconds: number): EngineResult {
  const buf = new ArrayBuffer(MEM_SIZE);
  const bytes = new Uint8Array(buf);
  const memory = new GuestMemory([{ guestPhysAddr: 0, size: MEM_SIZE, buffer: buf }]);
  const u32 = new Uint32Array(buf, DESC_GPA, qsize * 4);
  const u16 = new Uint16Array(buf, DESC_GPA, qsize * 8);
  const q = new PackedQueue({
    size: qsize,
    rings: {
      desc: bytes.subarray(DESC_GPA, DESC_GPA + 16 * qsize),
      driver: bytes.subarray(DRIVER_GPA, DRIVER_GPA + 4),
      device: bytes.subarray(DEVICE_GPA, DEVICE_GPA + 4),
    },
    memory,
    eventIdx: true,
    indirect: true,
  });
  let pos = 0;
  let wrap = true;
  let usedPos = 0;
  let usedWrap = true;
  const lens = [16, 64, 64];
  return run(seconds, q, () => {
    // The driver writes each chain's head flags last, so the device never sees a half-written chain.
    for (let k = 0; k < batch; k++) {
      const addrs = chainBuffers(k);
      const head = pos;
      let headFlags = 0;
      for (let j = 0; j < 3; j++) {
        const flags =
          (j < 2 ? VIRTQ_DESC_F_NEXT : VIRTQ_DESC_F_WRITE) | (wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
        u32[pos * 4] = addrs[j]!;
        u32[pos * 4 + 1] = 0;
        u32[pos * 4 + 2] = lens[j]!;
        u16[pos * 8 + 6] = k;
        if (j === 0) headFlags = flags;
        else u16[pos * 8 + 7] = flags;
        if (++pos === qsize) {
          pos = 0;
          wrap = !wrap;
        }
      }
      Atomics.store(u16, head * 8 + 7, headFlags);
    }
  }, () => {
    for (let k = 0; k < batch; k++) {
      const f = Atomics.load(u16, usedPos * 8 + 7);
      const isUsed = ((f & VIRTQ_DESC_F_USED) !== 0) === usedWrap && ((f & VIRTQ_DESC_F_AVAIL) !== 0) === usedWrap;
      if (!isUsed) throw new Error(`chain ${k} of the batch not used`);
      usedPos += 3;
      if (usedPos >= qsize) {
        usedPos -= qsize;
        usedWrap = !usedWrap;
      }
    }
  });
}

function run(seconds: number, q: DeviceQueue, offer: () => void, reclaim: () => void): EngineResult {
  let chains = 0;
  let deviceNs = 0;
  const start = process.hrtime.bigint();
  const limit = BigInt(Math.round(seconds * 1e9));
  for (let rounds = 1; ; rounds++) {
    offer();
    const t0 = process.cpuUsage();
    for (;;) {
      const c = q.pop();
      if (c === null) break;
      if (c instanceof VirtqueueError) throw c;
      q.pushUsed(c, 64);
      chains++;
    }
    const spent = process.cpuUsage(t0);
    deviceNs += (spent.user + spent.system) * 1000;
    reclaim();
    if ((rounds & 63) === 0 && process.hrtime.bigint() - start > limit) break;
  }
  return { chains, deviceNs, chainsPerSec: chains / (deviceNs / 1e9) };
}
