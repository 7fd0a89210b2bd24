// The vhost-user memory table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG): the regions the front-end gave, mapped
// through the host layer (host/fd-region.ts), and the GuestMemory they make. A change builds the whole new map
// first (a bad table changes nothing), hands it to the session (which rebuilds the rings and tells the device
// model), and only then unmaps the regions it dropped: nothing may still point into them after that.

import { GuestMemory, GuestMemoryError } from '../../memory/guest-memory.ts';
import type { Logger } from '../../util/log.ts';
import { FdRegionError, guestMemoryOf, mapFdRegion, unmapFdRegion, type MappedFdRegion } from '../../host/fd-region.ts';
import type { HostOps } from '../../host/host.ts';
import { FrontendRequest, MAX_RAM_SLOTS, VhostUserProtocolError, type RegionSpec } from './messages.ts';

type Region = MappedFdRegion<RegionSpec>;

export class MemoryTable {
  private regions: Region[] = [];
  private current: GuestMemory = GuestMemory.empty();

  constructor(
    private readonly host: HostOps,
    private readonly log: Logger,
    /**
     * Installs a new map. Called after the map is built and before any dropped region is unmapped, so that
     * whatever the callee tells (rings, the device model) can still read the old regions while it lets go of them.
     */
    private readonly install: (memory: GuestMemory) => void,
  ) {}

  get memory(): GuestMemory {
    return this.current;
  }

  get specs(): RegionSpec[] {
    return this.regions.map((r) => r.spec);
  }

  get empty(): boolean {
    return this.regions.length === 0;
  }

  /** SET_MEM_TABLE: the whole table replaced. Takes ownership of `fds` (kept or closed). */
  setTable(specs: RegionSpec[], fds: number[]): void {
    const code = FrontendRequest.SET_MEM_TABLE;
    const mapped: Region[] = [];
    try {
      specs.forEach((s, i) => mapped.push(this.map(s, fds[i]!, code)));
      const memory = this.build(mapped, code);
      this.replace(mapped, memory, this.regions);
    } catch (e) {
      for (const r of mapped) unmapFdRegion(this.host, r, this.log);
      for (const fd of fds.slice(mapped.length)) this.safeClose(fd);
      throw e;
    }
  }

  /** ADD_MEM_REG: one region added. Takes ownership of `fd`. */
  add(spec: RegionSpec, fd: number): void {
    const code = FrontendRequest.ADD_MEM_REG;
    if (this.regions.length >= MAX_RAM_SLOTS) {
      this.safeClose(fd);
      throw new VhostUserProtocolError('BadState', code, `all ${MAX_RAM_SLOTS} memory slots are in use`);
    }
    let r: Region;
    try {
      r = this.map(spec, fd, code);
    } catch (e) {
      this.safeClose(fd);
      throw e;
    }
    try {
      const next = [...this.regions, r];
      this.replace(next, this.build(next, code), []);
    } catch (e) {
      unmapFdRegion(this.host, r, this.log);
      throw e;
    }
  }

  /** REM_MEM_REG: identified by guest address, user address and size; the mmap offset is ignored (vhost-user.rst). */
  remove(spec: RegionSpec): void {
    const code = FrontendRequest.REM_MEM_REG;
    const i = this.regions.findIndex(
      (r) => r.spec.guestPhysAddr === spec.guestPhysAddr && r.spec.userAddr === spec.userAddr && r.spec.size === spec.size,
    );
    if (i < 0) {
      throw new VhostUserProtocolError('BadState', code, `no region at guest 0x${spec.guestPhysAddr.toString(16)} user 0x${spec.userAddr.toString(16)} size ${spec.size}`);
    }
    const next = this.regions.filter((_, j) => j !== i);
    this.replace(next, this.build(next, code), [this.regions[i]!]);
  }

  /** Unmaps everything (the session is going away; nothing is told). */
  release(): void {
    for (const r of this.regions) unmapFdRegion(this.host, r, this.log);
    this.regions = [];
    this.current = GuestMemory.empty();
  }

  private replace(regions: Region[], memory: GuestMemory, dropped: Region[]): void {
    this.regions = regions;
    this.current = memory;
    try {
      this.install(memory);
    } catch (e) {
      // The installer catches what it can; anything else is a bug. The table is `regions` now either way, and
      // what was dropped must not stay mapped.
      this.log.log('error', 'installing the new memory map failed', { error: (e as Error).message });
    }
    for (const d of dropped) unmapFdRegion(this.host, d, this.log);
  }

  private map(spec: RegionSpec, fd: number, code: number): Region {
    try {
      return mapFdRegion(this.host, spec, fd);
    } catch (e) {
      if (e instanceof FdRegionError) throw new VhostUserProtocolError(e.kind === 'PastEndOfFd' ? 'BadPayload' : 'HostError', code, e.message);
      throw e;
    }
  }

  private build(regions: Region[], code: number): GuestMemory {
    try {
      return guestMemoryOf(regions);
    } catch (e) {
      if (e instanceof GuestMemoryError) throw new VhostUserProtocolError('BadPayload', code, e.message);
      throw e;
    }
  }

  private safeClose(fd: number): void {
    try {
      this.host.close(fd);
    } catch (e) {
      this.log.log('error', 'close failed', { fd, error: (e as Error).message });
    }
  }
}
