// The inflight area (vhost-user.rst "Inflight I/O tracking", protocol feature INFLIGHT_SHMFD): shared memory the
// back-end allocates (GET_INFLIGHT_FD), the front-end keeps across back-end restarts and hands back
// (SET_INFLIGHT_FD), so that a restarted back-end can resubmit what was in flight. Layout: inflight-layout.ts; the
// per-queue tracking: inflight-split.ts and inflight-packed.ts over the shared queue wrapper of inflight-queue.ts.

import type { HostOps } from '../../host/host.ts';
import { INFLIGHT_VERSION, OFF_DESC_NUM, OFF_VERSION, inflightAreaSize, inflightRegionSize } from './inflight-layout.ts';
import { PackedInflightRegion } from './inflight-packed.ts';
import { SplitInflightRegion } from './inflight-split.ts';
import { FrontendRequest, VhostUserProtocolError } from './messages.ts';

export { inflightAreaSize, inflightRegionSize };

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

  /**
   * The split-ring tracking of queue `queue` for a ring of `ringSize` entries, or a reason it cannot be tracked
   * (the area has fewer queues, or smaller ones, than the ring).
   */
  splitRegion(queue: number, ringSize: number): SplitInflightRegion | string {
    if (queue >= this.numQueues) return `the inflight area covers ${this.numQueues} queues, not queue ${queue}`;
    if (ringSize > this.queueSize) return `ring ${queue} has ${ringSize} entries, the inflight area only ${this.queueSize}`;
    return new SplitInflightRegion(this.regionView(queue), this.queueSize);
  }

  /** The packed-ring tracking of queue `queue` for a ring of `ringSize` entries, or why it cannot be tracked. */
  packedRegion(queue: number, ringSize: number): PackedInflightRegion | string {
    if (queue >= this.numQueues) return `the inflight area covers ${this.numQueues} queues, not queue ${queue}`;
    if (ringSize > this.queueSize) return `ring ${queue} has ${ringSize} entries, the inflight area only ${this.queueSize}`;
    return new PackedInflightRegion(this.regionView(queue), this.queueSize);
  }

  /**
   * Forgets everything in flight on every queue (a device reset: the driver gave every buffer up). The two
   * layouts differ, so the caller says which one the rings use (packed: every ring restarts at slot 0, lap 1).
   */
  clearAll(layout: 'split' | 'packed'): void {
    for (let q = 0; q < this.numQueues; q++) {
      if (layout === 'packed') new PackedInflightRegion(this.regionView(q), this.queueSize).initialise(0, true);
      else new SplitInflightRegion(this.regionView(q), this.queueSize).clear();
    }
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
