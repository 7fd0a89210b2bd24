// Guest RAM as a vhost-user front-end owns it: memfds, mapped shared into this process, each with a guest
// physical address and a "front-end virtual address" (QEMU sends its own process addresses; this front-end makes
// up distinct ones so that the back-end's two translations, GPA for descriptors and front-end VA for rings, are
// really exercised: the two never coincide).

import { GuestMemory } from '../../vmm-device/memory/guest-memory.ts';
import type { MemoryRegionDesc } from '../../vmm-device/transport/vhost-user/messages.ts';
import type { SysHost } from '../../vmm-device/host/sys-host.ts';

/** Where the made-up front-end virtual addresses start (far from any guest physical address used in tests). */
export const FRONTEND_VA_BASE = 0x7f00_0000_0000;

export interface RamRegionPlan {
  gpa: number;
  size: number;
  /** Front-end virtual address; default FRONTEND_VA_BASE + gpa. */
  userAddr?: number;
  /** Offset of the region inside its memfd (page aligned); default 0. The memfd is mmapOffset + size bytes. */
  mmapOffset?: number;
}

export interface RamRegion {
  gpa: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
  fd: number;
  /** The whole memfd mapping ([0, mmapOffset + size)). */
  mapping: ArrayBuffer;
}

export class GuestRam {
  readonly regions: RamRegion[] = [];
  /** The front-end's own view (for the guest driver writing rings and buffers). */
  memory: GuestMemory;

  constructor(
    private readonly host: SysHost,
    plans: readonly RamRegionPlan[],
  ) {
    try {
      for (const p of plans) this.regions.push(this.create(p));
    } catch (e) {
      this.release();
      throw e;
    }
    this.memory = this.buildMemory();
  }

  private create(p: RamRegionPlan): RamRegion {
    const mmapOffset = p.mmapOffset ?? 0;
    const fd = this.host.memfd(`guest-ram@${p.gpa.toString(16)}`, mmapOffset + p.size);
    try {
      const mapping = this.host.mmapShared(fd, mmapOffset + p.size, 0);
      return { gpa: p.gpa, size: p.size, userAddr: p.userAddr ?? FRONTEND_VA_BASE + p.gpa, mmapOffset, fd, mapping };
    } catch (e) {
      this.host.close(fd);
      throw e;
    }
  }

  private buildMemory(): GuestMemory {
    return new GuestMemory(
      this.regions.map((r) => ({ guestPhysAddr: r.gpa, size: r.size, userAddr: r.userAddr, buffer: r.mapping, bufferOffset: r.mmapOffset })),
    );
  }

  /** Adds a region (memory hot-plug: ADD_MEM_REG). */
  add(p: RamRegionPlan): RamRegion {
    const r = this.create(p);
    this.regions.push(r);
    this.memory = this.buildMemory();
    return r;
  }

  /** The region as the wire describes it. */
  static describe(r: RamRegion): MemoryRegionDesc {
    return { guestPhysAddr: BigInt(r.gpa), size: BigInt(r.size), userAddr: BigInt(r.userAddr), mmapOffset: BigInt(r.mmapOffset) };
  }

  /** Front-end virtual address of a guest physical address (ring addresses go on the wire this way). */
  gpaToUser(gpa: number): number {
    const r = this.regions.find((x) => gpa >= x.gpa && gpa < x.gpa + x.size);
    if (r === undefined) throw new RangeError(`gpa 0x${gpa.toString(16)} is not guest RAM`);
    return r.userAddr + (gpa - r.gpa);
  }

  release(): void {
    for (const r of this.regions) {
      this.host.munmap(r.mapping);
      this.host.close(r.fd);
    }
    this.regions.length = 0;
  }
}
