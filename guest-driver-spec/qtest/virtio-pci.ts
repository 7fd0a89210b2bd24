// A virtio-pci modern (virtio 1.x) guest driver over qtest: finds the function on bus 0, places its BARs, walks
// the vendor capabilities (common, notify, ISR, device config), and runs the initialization sequence of virtio
// 1.2 section 3.1.1 step by step, each step a method a test can call (or skip, or do wrongly) on its own.
//
// Interrupts: MSI-X is left disabled, so the device signals through INTx. Under qtest no firmware runs, so the
// driver routes the PIIX3 PIRQ line of the device's slot to an ISA IRQ itself and intercepts the I/O APIC
// inputs: an "IRQ raise N" line is then the real interrupt of the device, and reading the ISR lowers it again.
// (The alternative, MSI-X aimed at guest RAM and polled, tests less of the device: the level-triggered INTx
// with read-to-clear ISR is the path every virtio-pci device must implement.)

import type { QtestClient } from './qtest-client.ts';
import {
  AddressWindow,
  PCI_CAP_ID_VNDR,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_IO,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  PCI_INTERRUPT_LINE,
  PCI_INTERRUPT_PIN,
  PciConfig,
  enumerateBus0,
  type PciFunction,
} from './pci.ts';
import type { GuestRam } from './guest-ram.ts';
import { QtestSplitQueue } from './split-queue.ts';

export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
/**
 * The default window of 64-bit memory BARs, [256 GiB, 512 GiB): QEMU's x86 machines put the whole PCI address
 * space under system memory, so any bus address above RAM and the hot-plug area decodes; a 40-bit guest reaches it.
 */
export const DEFAULT_MEM64_WINDOW_START = 0x40_0000_0000;
export const DEFAULT_MEM64_WINDOW_END = 0x80_0000_0000;
/** Modern virtio-pci device IDs are 0x1040 + virtio device ID. */
export const VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040;

// virtio_pci_cap.cfg_type (virtio 1.2 section 4.1.4)
export const VIRTIO_PCI_CAP_COMMON_CFG = 1;
export const VIRTIO_PCI_CAP_NOTIFY_CFG = 2;
export const VIRTIO_PCI_CAP_ISR_CFG = 3;
export const VIRTIO_PCI_CAP_DEVICE_CFG = 4;
export const VIRTIO_PCI_CAP_PCI_CFG = 5;

// struct virtio_pci_common_cfg field offsets (section 4.1.4.3)
export const COMMON_DEVICE_FEATURE_SELECT = 0x00;
export const COMMON_DEVICE_FEATURE = 0x04;
export const COMMON_DRIVER_FEATURE_SELECT = 0x08;
export const COMMON_DRIVER_FEATURE = 0x0c;
export const COMMON_MSIX_CONFIG = 0x10;
export const COMMON_NUM_QUEUES = 0x12;
export const COMMON_DEVICE_STATUS = 0x14;
export const COMMON_CONFIG_GENERATION = 0x15;
export const COMMON_QUEUE_SELECT = 0x16;
export const COMMON_QUEUE_SIZE = 0x18;
export const COMMON_QUEUE_MSIX_VECTOR = 0x1a;
export const COMMON_QUEUE_ENABLE = 0x1c;
export const COMMON_QUEUE_NOTIFY_OFF = 0x1e;
export const COMMON_QUEUE_DESC = 0x20;
export const COMMON_QUEUE_DRIVER = 0x28;
export const COMMON_QUEUE_DEVICE = 0x30;
/** Smallest common configuration structure a virtio 1.x device may offer. */
export const COMMON_CFG_MIN_LENGTH = 0x38;

// Device status bits (section 2.1)
export const STATUS_ACKNOWLEDGE = 1;
export const STATUS_DRIVER = 2;
export const STATUS_DRIVER_OK = 4;
export const STATUS_FEATURES_OK = 8;
export const STATUS_DEVICE_NEEDS_RESET = 64;
export const STATUS_FAILED = 128;

export const VIRTIO_F_VERSION_1 = 32n;
export const VIRTIO_MSI_NO_VECTOR = 0xffff;
export const ISR_QUEUE = 1;
export const ISR_CONFIG = 2;

/** How long reset() waits for device_status to read back 0. */
export const RESET_TIMEOUT_MS = 5000;

// PIIX3 (function 00:01.0 on the `pc` machine): PIRQA..D route control registers. Value = ISA IRQ; bit 7 = off.
const PIIX3_PIRQ_ROUTE = 0x60;
/** ISA IRQ the driver routes its device's PIRQ line to (free on `pc`: no ISA device uses it without firmware). */
export const DEFAULT_INTX_IRQ = 11;

export interface VirtioCapability {
  cfgType: number;
  bar: number;
  /** Offset of the structure inside the BAR. */
  offset: number;
  length: number;
  /** Offset of the capability in PCI configuration space. */
  capOffset: number;
  /** notify_off_multiplier (notify capability only). */
  notifyOffMultiplier?: number;
}

export interface ProbeOptions {
  /** Virtio device ID to look for (the function 0x1af4:0x1040+id). */
  virtioId: number;
  /** Bus addresses for memory BARs; default [0xe000_0000, 0xfe00_0000) inside the `pc` PCI hole. */
  memWindow?: AddressWindow;
  ioWindow?: AddressWindow;
  /** Where 64-bit memory BARs go; by default [256 GiB, 512 GiB), above any RAM or hot-plug area a test gives QEMU. */
  mem64Window?: AddressWindow;
  /** Route INTx to this ISA IRQ and intercept the I/O APIC (default DEFAULT_INTX_IRQ); false: no interrupts. */
  intxIrq?: number | false;
}

/** The address of a field inside a capability's structure. */
function at(cap: VirtioCapability, barAddress: number, field: number): number {
  return barAddress + cap.offset + field;
}

export class VirtioPciDevice {
  readonly caps: VirtioCapability[];
  readonly common: VirtioCapability;
  readonly notifyCap: VirtioCapability;
  readonly isr: VirtioCapability;
  readonly device: VirtioCapability | undefined;
  /** The ISA IRQ (= I/O APIC input) INTx arrives on, or undefined when interrupts were not set up. */
  readonly intxIrq: number | undefined;

  private constructor(
    readonly qtest: QtestClient,
    readonly pci: PciFunction,
    caps: VirtioCapability[],
    intxIrq: number | undefined,
  ) {
    this.caps = caps;
    const find = (type: number): VirtioCapability | undefined => caps.find((c) => c.cfgType === type);
    const need = (type: number, what: string): VirtioCapability => {
      const cap = find(type);
      if (cap === undefined) throw new Error(`${pci.name}: no ${what} capability`);
      return cap;
    };
    this.common = need(VIRTIO_PCI_CAP_COMMON_CFG, 'common configuration');
    this.notifyCap = need(VIRTIO_PCI_CAP_NOTIFY_CFG, 'notification');
    this.isr = need(VIRTIO_PCI_CAP_ISR_CFG, 'ISR');
    this.device = find(VIRTIO_PCI_CAP_DEVICE_CFG);
    if (this.common.length < COMMON_CFG_MIN_LENGTH) {
      throw new Error(`${pci.name}: common configuration of ${this.common.length} bytes, at least ${COMMON_CFG_MIN_LENGTH}`);
    }
    this.intxIrq = intxIrq;
  }

  /**
   * Enumerates bus 0, finds the virtio function, sizes and places its BARs, enables memory space and bus
   * mastering, walks its vendor capabilities, and (unless told not to) routes its INTx line.
   */
  static async probe(qtest: QtestClient, options: ProbeOptions): Promise<VirtioPciDevice> {
    const config = new PciConfig(qtest);
    const functions = await enumerateBus0(config);
    const wantedId = VIRTIO_PCI_MODERN_DEVICE_ID_BASE + options.virtioId;
    const pci = functions.find((f) => f.vendorId === VIRTIO_PCI_VENDOR_ID && f.deviceId === wantedId);
    if (pci === undefined) {
      throw new Error(
        `no virtio-pci function ${VIRTIO_PCI_VENDOR_ID.toString(16)}:${wantedId.toString(16)} on bus 0; found ` +
          functions.map((f) => f.name).join(', '),
      );
    }
    await pci.sizeBars();
    await pci.placeBars(
      options.memWindow ?? new AddressWindow(0xe000_0000, 0xfe00_0000),
      options.ioWindow ?? new AddressWindow(0xc000, 0xf000),
      options.mem64Window ?? new AddressWindow(DEFAULT_MEM64_WINDOW_START, DEFAULT_MEM64_WINDOW_END),
    );
    await pci.enable(PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER);

    const caps: VirtioCapability[] = [];
    for (const cap of await pci.capabilities()) {
      if (cap.id !== PCI_CAP_ID_VNDR) continue;
      const capLength = await pci.read8(cap.offset + 2);
      const cfgType = await pci.read8(cap.offset + 3);
      const bar = await pci.read8(cap.offset + 4);
      const offset = await pci.read32(cap.offset + 8);
      const length = await pci.read32(cap.offset + 12);
      const entry: VirtioCapability = { cfgType, bar, offset, length, capOffset: cap.offset };
      if (cfgType === VIRTIO_PCI_CAP_NOTIFY_CFG) {
        if (capLength < 20) throw new Error(`${pci.name}: notify capability of ${capLength} bytes, needs 20`);
        entry.notifyOffMultiplier = await pci.read32(cap.offset + 16);
      }
      if (cfgType !== VIRTIO_PCI_CAP_PCI_CFG) {
        const placed = pci.bar(bar);
        if (placed === undefined || placed.kind === 'io') {
          throw new Error(`${pci.name}: capability type ${cfgType} points at BAR${bar}, which is not a memory BAR`);
        }
        if (offset + length > placed.size) {
          throw new Error(`${pci.name}: capability type ${cfgType} [${offset}, +${length}) overruns BAR${bar} (${placed.size} bytes)`);
        }
      }
      caps.push(entry);
    }

    let intxIrq: number | undefined;
    if (options.intxIrq !== false) {
      intxIrq = options.intxIrq ?? DEFAULT_INTX_IRQ;
      const pin = await pci.read8(PCI_INTERRUPT_PIN);
      if (pin < 1 || pin > 4) throw new Error(`${pci.name}: interrupt pin ${pin}, expected INTA..INTD`);
      // PIIX3 swizzle on `pc`: PIRQ = (slot - 1 + pin - 1) mod 4 (as QEMU's pci_slot_get_pirq for piix does).
      const pirq = (pci.address.device - 1 + (pin - 1)) & 3;
      await config.write8({ bus: 0, device: 1, fn: 0 }, PIIX3_PIRQ_ROUTE + pirq, intxIrq);
      await pci.write8(PCI_INTERRUPT_LINE, intxIrq);
      await pci.write16(0x04, (await pci.read16(0x04)) & ~PCI_COMMAND_INTX_DISABLE);
      await qtest.irqInterceptIn('ioapic');
    }
    return new VirtioPciDevice(qtest, pci, caps, intxIrq);
  }

  private barAddress(cap: VirtioCapability): number {
    const bar = this.pci.bar(cap.bar);
    if (bar?.address === undefined) throw new Error(`${this.pci.name}: BAR${cap.bar} is not placed`);
    return bar.address;
  }

  private commonAddr(field: number): number {
    return at(this.common, this.barAddress(this.common), field);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Status and reset

  async status(): Promise<number> {
    return this.qtest.readb(this.commonAddr(COMMON_DEVICE_STATUS));
  }

  async setStatus(status: number): Promise<void> {
    await this.qtest.writeb(this.commonAddr(COMMON_DEVICE_STATUS), status);
  }

  /** Adds status bits to what the device reports. */
  async addStatus(bits: number): Promise<number> {
    const status = (await this.status()) | bits;
    await this.setStatus(status);
    return status;
  }

  /** Writes 0 to device_status and waits until it reads back 0 (section 4.1.4.3.2). */
  async reset(): Promise<void> {
    await this.setStatus(0);
    const deadline = Date.now() + RESET_TIMEOUT_MS;
    while ((await this.status()) !== 0) {
      if (Date.now() > deadline) throw new Error(`${this.pci.name}: device_status not 0 ${RESET_TIMEOUT_MS} ms after reset`);
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Features

  async deviceFeatures(): Promise<bigint> {
    let features = 0n;
    for (const select of [0, 1]) {
      await this.qtest.writel(this.commonAddr(COMMON_DEVICE_FEATURE_SELECT), select);
      features |= BigInt(await this.qtest.readl(this.commonAddr(COMMON_DEVICE_FEATURE))) << BigInt(32 * select);
    }
    return features;
  }

  async writeDriverFeatures(features: bigint): Promise<void> {
    for (const select of [0, 1]) {
      await this.qtest.writel(this.commonAddr(COMMON_DRIVER_FEATURE_SELECT), select);
      const word = Number((features >> BigInt(32 * select)) & 0xffff_ffffn);
      await this.qtest.writel(this.commonAddr(COMMON_DRIVER_FEATURE), word);
    }
  }

  async driverFeatures(): Promise<bigint> {
    let features = 0n;
    for (const select of [0, 1]) {
      await this.qtest.writel(this.commonAddr(COMMON_DRIVER_FEATURE_SELECT), select);
      features |= BigInt(await this.qtest.readl(this.commonAddr(COMMON_DRIVER_FEATURE))) << BigInt(32 * select);
    }
    return features;
  }

  /**
   * Steps 1-6 of the initialization: reset, ACKNOWLEDGE, DRIVER, read device features, write `wanted & offered`
   * (VERSION_1 is required), FEATURES_OK, and check that FEATURES_OK stuck. Returns the negotiated features.
   */
  async negotiate(wanted: bigint): Promise<bigint> {
    await this.reset();
    await this.addStatus(STATUS_ACKNOWLEDGE);
    await this.addStatus(STATUS_DRIVER);
    const offered = await this.deviceFeatures();
    const version1 = 1n << VIRTIO_F_VERSION_1;
    if ((offered & version1) === 0n) throw new Error(`${this.pci.name}: the device does not offer VIRTIO_F_VERSION_1`);
    const accepted = (wanted | version1) & offered;
    await this.writeDriverFeatures(accepted);
    await this.addStatus(STATUS_FEATURES_OK);
    const status = await this.status();
    if ((status & STATUS_FEATURES_OK) === 0) {
      await this.addStatus(STATUS_FAILED);
      throw new Error(`${this.pci.name}: FEATURES_OK did not stick (status ${status.toString(16)}) for features ${accepted.toString(16)}`);
    }
    return accepted;
  }

  async driverOk(): Promise<void> {
    await this.addStatus(STATUS_DRIVER_OK);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Queues

  async numQueues(): Promise<number> {
    return this.qtest.readw(this.commonAddr(COMMON_NUM_QUEUES));
  }

  async selectQueue(index: number): Promise<void> {
    await this.qtest.writew(this.commonAddr(COMMON_QUEUE_SELECT), index);
  }

  /** The maximum size the device offers for queue `index` (0: the queue does not exist). */
  async queueMaxSize(index: number): Promise<number> {
    await this.selectQueue(index);
    return this.qtest.readw(this.commonAddr(COMMON_QUEUE_SIZE));
  }

  /**
   * Lays out a split queue of `size` entries in guest RAM and tells the device: size, the three ring addresses,
   * no MSI-X vector, enable. `size` defaults to the device's maximum.
   */
  async setupQueue(index: number, ram: GuestRam, size?: number): Promise<QtestSplitQueue> {
    const max = await this.queueMaxSize(index);
    if (max === 0) throw new Error(`${this.pci.name}: queue ${index} does not exist`);
    const queueSize = size ?? max;
    if (queueSize > max) throw new RangeError(`queue ${index}: size ${queueSize} exceeds the device's ${max}`);
    const queue = new QtestSplitQueue(this.qtest, index, queueSize, ram);
    await queue.clear();
    await this.selectQueue(index);
    await this.qtest.writew(this.commonAddr(COMMON_QUEUE_SIZE), queueSize);
    await this.qtest.writew(this.commonAddr(COMMON_QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
    await this.write64(COMMON_QUEUE_DESC, queue.descAddr);
    await this.write64(COMMON_QUEUE_DRIVER, queue.availAddr);
    await this.write64(COMMON_QUEUE_DEVICE, queue.usedAddr);
    queue.notifyAddress = await this.notifyAddress(index);
    await this.qtest.writew(this.commonAddr(COMMON_QUEUE_ENABLE), 1);
    return queue;
  }

  /** The 64-bit common-config fields are written as two 32-bit halves, low first (section 4.1.3.1). */
  private async write64(field: number, value: number): Promise<void> {
    await this.qtest.writel(this.commonAddr(field), value % 2 ** 32);
    await this.qtest.writel(this.commonAddr(field + 4), Math.floor(value / 2 ** 32));
  }

  async readQueueAddresses(index: number): Promise<{ desc: bigint; driver: bigint; device: bigint; enabled: number }> {
    await this.selectQueue(index);
    const read64 = async (field: number): Promise<bigint> =>
      BigInt(await this.qtest.readl(this.commonAddr(field))) |
      (BigInt(await this.qtest.readl(this.commonAddr(field + 4))) << 32n);
    return {
      desc: await read64(COMMON_QUEUE_DESC),
      driver: await read64(COMMON_QUEUE_DRIVER),
      device: await read64(COMMON_QUEUE_DEVICE),
      enabled: await this.qtest.readw(this.commonAddr(COMMON_QUEUE_ENABLE)),
    };
  }

  /** cap.offset + queue_notify_off * notify_off_multiplier, inside the notify capability's BAR (4.1.4.4). */
  async notifyAddress(index: number): Promise<number> {
    await this.selectQueue(index);
    const notifyOff = await this.qtest.readw(this.commonAddr(COMMON_QUEUE_NOTIFY_OFF));
    const offset = notifyOff * (this.notifyCap.notifyOffMultiplier ?? 0);
    if (offset + 2 > this.notifyCap.length) {
      throw new Error(`${this.pci.name}: queue ${index} notify offset ${offset} outside the notify area (${this.notifyCap.length} bytes)`);
    }
    return at(this.notifyCap, this.barAddress(this.notifyCap), offset);
  }

  /** Rings queue `index`'s doorbell: a 16-bit write of the queue index to its notify address. */
  async notify(queue: QtestSplitQueue): Promise<void> {
    if (queue.notifyAddress === undefined) throw new Error(`queue ${queue.index} was not set up`);
    await this.qtest.writew(queue.notifyAddress, queue.index);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Interrupts

  /** Reads (and so clears, lowering INTx) the ISR status: bit 0 queue interrupt, bit 1 configuration change. */
  async readIsr(): Promise<number> {
    return this.qtest.readb(at(this.isr, this.barAddress(this.isr), 0));
  }

  /** Waits for the INTx line to be raised (the device interrupted). */
  async waitInterrupt(timeoutMs?: number): Promise<void> {
    if (this.intxIrq === undefined) throw new Error('interrupts were not set up (probe with intxIrq)');
    await this.qtest.waitIrq(this.intxIrq, true, timeoutMs);
  }

  interruptRaised(): boolean {
    return this.intxIrq !== undefined && this.qtest.irqRaised(this.intxIrq);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Device configuration space

  async configGeneration(): Promise<number> {
    return this.qtest.readb(this.commonAddr(COMMON_CONFIG_GENERATION));
  }

  private configAddr(offset: number, width: number): number {
    if (this.device === undefined) throw new Error(`${this.pci.name}: no device configuration capability`);
    if (offset < 0 || offset + width > this.device.length) {
      throw new RangeError(`device config [${offset}, +${width}) outside its ${this.device.length} bytes`);
    }
    return at(this.device, this.barAddress(this.device), offset);
  }

  get configLength(): number {
    return this.device?.length ?? 0;
  }

  async configRead8(offset: number): Promise<number> {
    return this.qtest.readb(this.configAddr(offset, 1));
  }
  async configRead16(offset: number): Promise<number> {
    return this.qtest.readw(this.configAddr(offset, 2));
  }
  async configRead32(offset: number): Promise<number> {
    return this.qtest.readl(this.configAddr(offset, 4));
  }
  async configWrite8(offset: number, value: number): Promise<void> {
    await this.qtest.writeb(this.configAddr(offset, 1), value);
  }

  /**
   * Reads [offset, offset + length) byte by byte, retrying until config_generation is the same before and after
   * (section 2.5.1), so a torn read of a changing configuration is never returned.
   */
  async configRead(offset: number, length: number): Promise<Uint8Array> {
    for (;;) {
      const before = await this.configGeneration();
      const bytes = new Uint8Array(length);
      for (let i = 0; i < length; i++) bytes[i] = await this.configRead8(offset + i);
      if ((await this.configGeneration()) === before) return bytes;
    }
  }
}
