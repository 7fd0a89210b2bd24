// The inflight area (vhost-user.rst "Inflight I/O tracking", protocol feature INFLIGHT_SHMFD): shared memory the
// back-end allocates (GET_INFLIGHT_FD), the front-end keeps across back-end restarts and hands back
// (SET_INFLIGHT_FD), so that a restarted back-end can resubmit what was in flight.
//
// Layout: one region per queue, back to back. Each region is large enough for either ring layout:
//   split : QueueRegionSplit  = features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16 (16 B)
//           + desc_num * DescStateSplit (inflight u8, padding[5], next u16, counter u64: 16 B)
//   packed: QueueRegionPacked = 32 B header + desc_num * DescStatePacked (32 B)
// so a region is 32 + 32 * queue_size bytes, rounded up to INFLIGHT_REGION_ALIGNMENT.

import type { HostOps } from './host.ts';
import { FrontendRequest, VhostUserProtocolError } from './messages.ts';

export const INFLIGHT_VERSION = 1;
export const INFLIGHT_REGION_ALIGNMENT = 64;
const REGION_HEADER = 32;
const DESC_STATE = 32;
/** Offsets inside a queue region. */
const OFF_VERSION = 8;
const OFF_DESC_NUM = 10;

export function inflightRegionSize(queueSize: number): number {
  const raw = REGION_HEADER + DESC_STATE * queueSize;
  return Math.ceil(raw / INFLIGHT_REGION_ALIGNMENT) * INFLIGHT_REGION_ALIGNMENT;
}

export function inflightAreaSize(numQueues: number, queueSize: number): number {
  return numQueues * inflightRegionSize(queueSize);
}

export class InflightArea {
  private released = false;

  private constructor(
    private readonly host: HostOps,
    readonly fd: number,
    private readonly mapping: ArrayBuffer,
    /** Offset of queue 0's region inside the mapping. */
    readonly base: number,
    readonly numQueues: number,
    readonly queueSize: number,
  ) {}

  /** A fresh area over a new memfd of `size` bytes: every queue region gets version 1 and its desc_num. */
  static create(host: HostOps, fd: number, size: number, numQueues: number, queueSize: number): InflightArea {
    const mapping = host.mmapShared(fd, size, 0);
    const area = new InflightArea(host, fd, mapping, 0, numQueues, queueSize);
    for (let q = 0; q < numQueues; q++) {
      const dv = area.regionView(q);
      dv.setUint16(OFF_VERSION, INFLIGHT_VERSION, true);
      dv.setUint16(OFF_DESC_NUM, queueSize, true);
    }
    return area;
  }

  /** The area the front-end handed back (SET_INFLIGHT_FD), checked to hold every queue region. */
  static attach(host: HostOps, fd: number, mmapSize: number, mmapOffset: number, numQueues: number, queueSize: number): InflightArea {
    const need = inflightAreaSize(numQueues, queueSize);
    const bad = (why: string): never => {
      throw new VhostUserProtocolError('BadPayload', FrontendRequest.SET_INFLIGHT_FD, why);
    };
    if (mmapSize < need) bad(`inflight area of ${mmapSize} bytes is smaller than the ${need} bytes ${numQueues} queues of ${queueSize} need`);
    const fileSize = host.fileSize(fd);
    if (mmapOffset + mmapSize > fileSize) bad(`inflight area [${mmapOffset}, +${mmapSize}) ends past the end of its fd (${fileSize} bytes)`);
    const mapping = host.mmapShared(fd, mmapOffset + mmapSize, 0);
    return new InflightArea(host, fd, mapping, mmapOffset, numQueues, queueSize);
  }

  regionView(queue: number): DataView {
    if (queue < 0 || queue >= this.numQueues) throw new RangeError(`inflight queue ${queue} is not below ${this.numQueues}`);
    return new DataView(this.mapping, this.base + queue * inflightRegionSize(this.queueSize), inflightRegionSize(this.queueSize));
  }

  /** Version field of a queue region (0 = the front-end zeroed it: uninitialised). */
  version(queue: number): number {
    return this.regionView(queue).getUint16(OFF_VERSION, true);
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    try {
      this.host.munmap(this.mapping);
    } finally {
      this.host.close(this.fd);
    }
  }
}
