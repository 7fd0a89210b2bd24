// PCI as a guest without firmware sees it under qtest: configuration space through the legacy 0xcf8/0xcfc ports
// (configuration mechanism #1), enumeration of bus 0, BAR sizing and placement (the driver chooses the addresses,
// since no BIOS ran), the command register, and the capability list.

import type { QtestClient } from './qtest-client.ts';

export const PCI_CONFIG_ADDRESS_PORT = 0xcf8;
export const PCI_CONFIG_DATA_PORT = 0xcfc;
export const PCI_MAX_DEVICES = 32;
export const PCI_MAX_FUNCTIONS = 8;
export const PCI_BAR_COUNT = 6;
/** Capabilities in a 256-byte config space: a longer list is a loop. */
export const PCI_MAX_CAPABILITIES = 48;

// Standard header offsets and bits (PCI Local Bus 3.0, section 6.2).
export const PCI_VENDOR_ID = 0x00;
export const PCI_DEVICE_ID = 0x02;
export const PCI_COMMAND = 0x04;
export const PCI_STATUS = 0x06;
export const PCI_REVISION_ID = 0x08;
export const PCI_CLASS_PROG = 0x09;
export const PCI_HEADER_TYPE = 0x0e;
export const PCI_BAR0 = 0x10;
export const PCI_SUBSYSTEM_VENDOR_ID = 0x2c;
export const PCI_SUBSYSTEM_ID = 0x2e;
export const PCI_CAPABILITY_LIST = 0x34;
export const PCI_INTERRUPT_LINE = 0x3c;
export const PCI_INTERRUPT_PIN = 0x3d;

export const PCI_COMMAND_IO = 0x1;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_COMMAND_INTX_DISABLE = 0x400;
export const PCI_STATUS_CAP_LIST = 0x10;
export const PCI_STATUS_INTERRUPT = 0x8;

export const PCI_BAR_IO = 0x1;
export const PCI_BAR_MEM_TYPE_MASK = 0x6;
export const PCI_BAR_MEM_TYPE_64 = 0x4;
export const PCI_BAR_MEM_PREFETCH = 0x8;

export const PCI_CAP_ID_VNDR = 0x09;
export const PCI_CAP_ID_MSIX = 0x11;

export interface PciAddress {
  bus: number;
  device: number;
  fn: number;
}

export interface PciBar {
  index: number;
  kind: 'io' | 'mem32' | 'mem64';
  prefetchable: boolean;
  size: number;
  /** The address the driver placed it at (undefined until placed). */
  address: number | undefined;
}

export interface PciCapability {
  id: number;
  /** Offset of the capability in configuration space. */
  offset: number;
}

export function formatPciAddress(a: PciAddress): string {
  const h = (v: number, n: number): string => v.toString(16).padStart(n, '0');
  return `${h(a.bus, 2)}:${h(a.device, 2)}.${a.fn}`;
}

/**
 * Configuration space through the 0xcf8/0xcfc ports. Each access is an address write then a data access: the pair
 * is serialized, so concurrent callers never interleave one access's address with another's data.
 */
export class PciConfig {
  private tail: Promise<unknown> = Promise.resolve();

  constructor(readonly qtest: QtestClient) {}

  private serialize<T>(access: () => Promise<T>): Promise<T> {
    const run = this.tail.then(access, access);
    this.tail = run.catch(() => undefined);
    return run;
  }

  private static address(a: PciAddress, offset: number): number {
    if (a.bus < 0 || a.bus > 255 || a.device < 0 || a.device >= PCI_MAX_DEVICES || a.fn < 0 || a.fn >= PCI_MAX_FUNCTIONS) {
      throw new RangeError(`bad PCI address ${JSON.stringify(a)}`);
    }
    if (!Number.isInteger(offset) || offset < 0 || offset > 0xff) throw new RangeError(`config offset ${offset} out of 0..255`);
    return (0x8000_0000 | (a.bus << 16) | (a.device << 11) | (a.fn << 8) | (offset & 0xfc)) >>> 0;
  }

  read32(a: PciAddress, offset: number): Promise<number> {
    if (offset % 4 !== 0) throw new RangeError(`unaligned 32-bit config read at ${offset}`);
    const address = PciConfig.address(a, offset);
    return this.serialize(async () => {
      await this.qtest.outl(PCI_CONFIG_ADDRESS_PORT, address);
      return (await this.qtest.inl(PCI_CONFIG_DATA_PORT)) >>> 0;
    });
  }
  read16(a: PciAddress, offset: number): Promise<number> {
    if (offset % 2 !== 0) throw new RangeError(`unaligned 16-bit config read at ${offset}`);
    const address = PciConfig.address(a, offset);
    return this.serialize(async () => {
      await this.qtest.outl(PCI_CONFIG_ADDRESS_PORT, address);
      return this.qtest.inw(PCI_CONFIG_DATA_PORT + (offset & 2));
    });
  }
  read8(a: PciAddress, offset: number): Promise<number> {
    const address = PciConfig.address(a, offset);
    return this.serialize(async () => {
      await this.qtest.outl(PCI_CONFIG_ADDRESS_PORT, address);
      return this.qtest.inb(PCI_CONFIG_DATA_PORT + (offset & 3));
    });
  }
  write32(a: PciAddress, offset: number, value: number): Promise<void> {
    if (offset % 4 !== 0) throw new RangeError(`unaligned 32-bit config write at ${offset}`);
    const address = PciConfig.address(a, offset);
    return this.serialize(async () => {
      await this.qtest.outl(PCI_CONFIG_ADDRESS_PORT, address);
      await this.qtest.outl(PCI_CONFIG_DATA_PORT, value >>> 0);
    });
  }
  write16(a: PciAddress, offset: number, value: number): Promise<void> {
    if (offset % 2 !== 0) throw new RangeError(`unaligned 16-bit config write at ${offset}`);
    const address = PciConfig.address(a, offset);
    return this.serialize(async () => {
      await this.qtest.outl(PCI_CONFIG_ADDRESS_PORT, address);
      await this.qtest.outw(PCI_CONFIG_DATA_PORT + (offset & 2), value);
    });
  }
  write8(a: PciAddress, offset: number, value: number): Promise<void> {
    const address = PciConfig.address(a, offset);
    return this.serialize(async () => {
      await this.qtest.outl(PCI_CONFIG_ADDRESS_PORT, address);
      await this.qtest.outb(PCI_CONFIG_DATA_PORT + (offset & 3), value);
    });
  }
}

/** One function found on the bus. */
export class PciFunction {
  readonly bars: PciBar[] = [];

  constructor(
    readonly config: PciConfig,
    readonly address: PciAddress,
    readonly vendorId: number,
    readonly deviceId: number,
    readonly classCode: number,
    readonly headerType: number,
  ) {}

  get name(): string {
    return `${formatPciAddress(this.address)} ${this.vendorId.toString(16).padStart(4, '0')}:${this.deviceId
      .toString(16)
      .padStart(4, '0')}`;
  }

  read8(offset: number): Promise<number> {
    return this.config.read8(this.address, offset);
  }
  read16(offset: number): Promise<number> {
    return this.config.read16(this.address, offset);
  }
  read32(offset: number): Promise<number> {
    return this.config.read32(this.address, offset);
  }
  write8(offset: number, value: number): Promise<void> {
    return this.config.write8(this.address, offset, value);
  }
  write16(offset: number, value: number): Promise<void> {
    return this.config.write16(this.address, offset, value);
  }
  write32(offset: number, value: number): Promise<void> {
    return this.config.write32(this.address, offset, value);
  }

  /** Sizes every BAR the standard way (write all ones, read the mask back, restore) with decoding off. */
  async sizeBars(): Promise<PciBar[]> {
    if ((this.headerType & 0x7f) !== 0) throw new Error(`${this.name}: not a type 0 header (bridge?)`);
    const command = await this.read16(PCI_COMMAND);
    await this.write16(PCI_COMMAND, command & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
    this.bars.length = 0;
    for (let index = 0; index < PCI_BAR_COUNT; index++) {
      const offset = PCI_BAR0 + 4 * index;
      const original = await this.read32(offset);
      await this.write32(offset, 0xffff_ffff);
      const mask = await this.read32(offset);
      await this.write32(offset, original);
      if (mask === 0) continue;
      if (original & PCI_BAR_IO) {
        const size = (~(mask & ~0x3) + 1) & 0xffff;
        this.bars.push({ index, kind: 'io', prefetchable: false, size, address: undefined });
        continue;
      }
      const is64 = (original & PCI_BAR_MEM_TYPE_MASK) === PCI_BAR_MEM_TYPE_64;
      let size: bigint;
      if (is64) {
        const highOriginal = await this.read32(offset + 4);
        await this.write32(offset + 4, 0xffff_ffff);
        const highMask = await this.read32(offset + 4);
        await this.write32(offset + 4, highOriginal);
        const full = (BigInt(highMask) << 32n) | BigInt((mask & ~0xf) >>> 0);
        size = ((~full & 0xffff_ffff_ffff_ffffn) + 1n) & 0xffff_ffff_ffff_ffffn;
      } else {
        size = BigInt((~(mask & ~0xf) + 1) >>> 0);
      }
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`${this.name}: BAR${index} of ${size} bytes is too large`);
      this.bars.push({
        index,
        kind: is64 ? 'mem64' : 'mem32',
        prefetchable: (original & PCI_BAR_MEM_PREFETCH) !== 0,
        size: Number(size),
        address: undefined,
      });
      if (is64) index++; // the next register is this BAR's upper half
    }
    await this.write16(PCI_COMMAND, command);
    return this.bars;
  }

  bar(index: number): PciBar | undefined {
    return this.bars.find((b) => b.index === index);
  }

  /**
   * Places every BAR naturally aligned: I/O BARs in the I/O window, 64-bit memory BARs in the 64-bit window when
   * one is given (as firmware puts large 64-bit BARs above 4 GiB: a shared memory region of many GiB cannot fit
   * below), every other memory BAR in the 32-bit window.
   */
  async placeBars(memWindow: AddressWindow, ioWindow: AddressWindow, mem64Window?: AddressWindow): Promise<void> {
    for (const bar of this.bars) {
      const window = bar.kind === 'io' ? ioWindow : bar.kind === 'mem64' && mem64Window !== undefined ? mem64Window : memWindow;
      const address = window.take(bar.size, bar.size);
      const offset = PCI_BAR0 + 4 * bar.index;
      await this.write32(offset, Number(BigInt(address) & 0xffff_ffffn));
      if (bar.kind === 'mem64') await this.write32(offset + 4, Number(BigInt(address) >> 32n));
      bar.address = address;
    }
  }

  /** Sets bits in the command register (e.g. memory space, bus master) and returns the new value. */
  async enable(bits: number): Promise<number> {
    const command = (await this.read16(PCI_COMMAND)) | bits;
    await this.write16(PCI_COMMAND, command);
    return this.read16(PCI_COMMAND);
  }

  /** The capability list, checked for loops and bad pointers. */
  async capabilities(): Promise<PciCapability[]> {
    const status = await this.read16(PCI_STATUS);
    if ((status & PCI_STATUS_CAP_LIST) === 0) return [];
    const found: PciCapability[] = [];
    let offset = (await this.read8(PCI_CAPABILITY_LIST)) & 0xfc;
    while (offset !== 0) {
      if (offset < 0x40 || offset > 0xfc) throw new Error(`${this.name}: capability pointer ${offset} outside 0x40..0xfc`);
      if (found.length >= PCI_MAX_CAPABILITIES) throw new Error(`${this.name}: capability list loops`);
      const id = await this.read8(offset);
      found.push({ id, offset });
      offset = (await this.read8(offset + 1)) & 0xfc;
    }
    return found;
  }
}

/** A bump allocator of bus addresses for BAR placement. */
export class AddressWindow {
  private next: number;
  constructor(
    readonly start: number,
    readonly end: number,
  ) {
    this.next = start;
  }
  take(size: number, align: number): number {
    const aligned = Math.ceil(this.next / align) * align;
    if (aligned + size > this.end) {
      throw new RangeError(`address window [${this.start.toString(16)}, ${this.end.toString(16)}) cannot hold ${size} bytes more`);
    }
    this.next = aligned + size;
    return aligned;
  }
}

/** Every function on bus 0. */
export async function enumerateBus0(config: PciConfig): Promise<PciFunction[]> {
  const found: PciFunction[] = [];
  for (let device = 0; device < PCI_MAX_DEVICES; device++) {
    for (let fn = 0; fn < PCI_MAX_FUNCTIONS; fn++) {
      const address = { bus: 0, device, fn };
      const ids = await config.read32(address, PCI_VENDOR_ID);
      const vendorId = ids & 0xffff;
      if (vendorId === 0xffff || vendorId === 0) {
        if (fn === 0) break; // no device in this slot
        continue;
      }
      const classWord = await config.read32(address, PCI_REVISION_ID);
      const headerType = await config.read8(address, PCI_HEADER_TYPE);
      found.push(new PciFunction(config, address, vendorId, ids >>> 16, classWord >>> 8, headerType));
      if (fn === 0 && (headerType & 0x80) === 0) break; // single-function device
    }
  }
  return found;
}
