// The device side of a modern virtio-pci function (virtio 1.2 section 4.1) over the virtio device core: the common
// configuration registers (features, status, queue set-up), the ISR with its read-to-clear semantics, the device
// configuration window, the queue doorbells, and interrupts as MSI-X vectors or, when the driver leaves MSI-X off,
// INTx with the ISR. Transport-neutral: whoever presents the PCI function (vfio-user today) routes BAR accesses to
// barRead/barWrite, hands over guest memory (setMemory), and delivers interrupts through PciInterrupts.
//
// Register writes are applied field by field: a write is laid over the current image of the structure, and every
// field whose bytes it touched gets its new value, so 8-, 16-, 32- and 64-bit accesses (and the two halves of a
// 64-bit field) all work as the spec's drivers do them. Read-only fields ignore writes (counted).

import type { Logger } from '../../util/log.ts';
import { GuestMemory } from '../../memory/guest-memory.ts';
import { VirtioDeviceCore } from '../../virtio/core.ts';
import type { HostPageMapper, QueueOffload, VirtioDeviceModel } from '../../virtio/device.ts';
import { F_EVENT_IDX, F_INDIRECT_DESC, F_RING_PACKED, STATUS_FEATURES_OK, bit } from '../../abi/virtio.ts';
import { PACKED_EVENT_SIZE, checkQueueOptions, createQueue, descTableSize, splitAvailSize, splitUsedSize } from '../../virtqueue/index.ts';
import type { DeviceQueue, QueueOptions } from '../../virtqueue/queue.ts';
import {
  COMMON,
  COMMON_CFG_LEN,
  COMMON_OFFSET,
  DEVICE_CFG_OFFSET,
  ISR_CONFIG,
  ISR_LEN,
  ISR_OFFSET,
  ISR_QUEUE,
  NOTIFY_OFFSET,
  NOTIFY_OFF_MULTIPLIER,
  NO_VECTOR,
  VIRTIO_BAR,
  virtioPciLayout,
  type PciLayout,
} from './layout.ts';

/** How the function signals the driver; the presenter knows whether MSI-X is on. */
export interface PciInterrupts {
  msixEnabled(): boolean;
  /** Sends MSI-X vector `vector`. */
  msix(vector: number): void;
  /** Asserts INTx (level: the presenter keeps it up until the driver reads the ISR, see intxUnmasked). */
  intx(): void;
}

export interface VirtioPciCounters {
  /** Accesses outside every structure, or to a BAR the function does not have. */
  badAccesses: number;
  /** Writes to read-only fields (num_queues, config_generation, queue_notify_off, device features). */
  readOnlyWrites: number;
  /** Queue register writes while the queue is enabled (virtio 1.2 section 4.1.4.3.2: the driver must not). */
  lateQueueWrites: number;
  /** Queues whose enable was refused (bad size, areas outside guest memory, misaligned). */
  badQueues: number;
  notifies: number;
  interrupts: number;
}

interface QueueConfig {
  size: number;
  vector: number;
  enabled: boolean;
  desc: bigint;
  driver: bigint;
  device: bigint;
  queue: DeviceQueue | undefined;
}

export interface VirtioPciOptions {
  model: VirtioDeviceModel;
  interrupts: PciInterrupts;
  log: Logger;
  hostPages?: HostPageMapper;
  queueOffload?: QueueOffload;
}

export class VirtioPciFunction {
  readonly core: VirtioDeviceCore;
  readonly layout: PciLayout;
  readonly counters: VirtioPciCounters = { badAccesses: 0, readOnlyWrites: 0, lateQueueWrites: 0, badQueues: 0, notifies: 0, interrupts: 0 };
  private readonly log: Logger;
  private readonly irq: PciInterrupts;
  private readonly model: VirtioDeviceModel;
  private readonly queues: QueueConfig[];
  private memory: GuestMemory = GuestMemory.empty();
  private deviceFeatureSelect = 0;
  private driverFeatureSelect = 0;
  private driverFeatures = 0n;
  private msixConfig = NO_VECTOR;
  private queueSelect = 0;
  private isr = 0;

  constructor(opts: VirtioPciOptions) {
    this.model = opts.model;
    this.log = opts.log;
    this.irq = opts.interrupts;
    this.layout = virtioPciLayout(opts.model.deviceId, opts.model.queueCount, opts.model.configSize);
    this.core = new VirtioDeviceCore(
      opts.model,
      {
        interrupt: (i) => this.queueInterrupt(i),
        configInterrupt: () => this.configInterrupt(),
        hostPages: opts.hostPages,
        queueOffload: opts.queueOffload,
      },
      opts.log.child('core'),
    );
    this.queues = Array.from({ length: opts.model.queueCount }, (_, i) => this.freshQueue(i));
  }

  private freshQueue(index: number): QueueConfig {
    return { size: this.maxSize(index), vector: NO_VECTOR, enabled: false, desc: 0n, driver: 0n, device: 0n, queue: undefined };
  }

  private maxSize(index: number): number {
    return Math.min(this.core.maxQueueSize(index), 0xffff);
  }

  // -------------------------------------------------------------------------------------------------------------
  // BAR accesses

  /** Fills `out` from BAR `bar` at `offset`; false (counted, zeros) when nothing is there. */
  barRead(bar: number, offset: number, out: Uint8Array): boolean {
    out.fill(0);
    const s = this.structureAt(bar, offset, out.length);
    switch (s?.kind) {
      case 'common':
        out.set(this.commonImage().subarray(s.at, s.at + out.length));
        return true;
      case 'isr': {
        // Reading the ISR clears it (section 4.1.4.5): the INTx line's reason is consumed.
        out[0] = s.at === 0 ? this.isr : 0;
        if (s.at === 0) this.isr = 0;
        return true;
      }
      case 'device': {
        const data = this.core.readConfig(s.at, out.length);
        if (data === undefined) return false;
        out.set(data);
        return true;
      }
      case 'notify':
        return true; // write-only doorbells read as 0
      default:
        this.counters.badAccesses++;
        return false;
    }
  }

  /** Applies a driver write to BAR `bar` at `offset`; false (counted, dropped) when nothing is there. */
  barWrite(bar: number, offset: number, data: Uint8Array): boolean {
    const s = this.structureAt(bar, offset, data.length);
    switch (s?.kind) {
      case 'common':
        this.commonWrite(s.at, data);
        return true;
      case 'isr':
        this.counters.readOnlyWrites++;
        return true;
      case 'device':
        return this.core.writeConfig(s.at, data);
      case 'notify': {
        // queue_notify_off is the queue index: the doorbell's address says which queue (the value is ignored, as
        // without VIRTIO_F_NOTIFICATION_DATA it is just the index again).
        const index = Math.floor(s.at / NOTIFY_OFF_MULTIPLIER);
        this.counters.notifies++;
        this.core.notify(index);
        return true;
      }
      default:
        this.counters.badAccesses++;
        return false;
    }
  }

  private structureAt(bar: number, offset: number, len: number): { kind: 'common' | 'isr' | 'device' | 'notify'; at: number } | undefined {
    if (bar !== VIRTIO_BAR || len < 1 || len > 8) return undefined;
    const inside = (start: number, size: number): boolean => offset >= start && offset + len <= start + size;
    if (inside(COMMON_OFFSET, COMMON_CFG_LEN)) return { kind: 'common', at: offset - COMMON_OFFSET };
    if (inside(ISR_OFFSET, ISR_LEN)) return { kind: 'isr', at: offset - ISR_OFFSET };
    if (this.model.configSize > 0 && inside(DEVICE_CFG_OFFSET, this.model.configSize)) return { kind: 'device', at: offset - DEVICE_CFG_OFFSET };
    if (inside(NOTIFY_OFFSET, this.queues.length * NOTIFY_OFF_MULTIPLIER)) return { kind: 'notify', at: offset - NOTIFY_OFFSET };
    return undefined;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Common configuration

  private selected(): QueueConfig | undefined {
    return this.queues[this.queueSelect];
  }

  /** The common configuration as the driver would read it now (selectors applied). */
  private commonImage(): Uint8Array {
    const bytes = new Uint8Array(COMMON_CFG_LEN);
    const v = new DataView(bytes.buffer);
    const word = (value: bigint, select: number): number => (select < 2 ? Number((value >> BigInt(32 * select)) & 0xffff_ffffn) : 0);
    v.setUint32(COMMON.deviceFeatureSelect, this.deviceFeatureSelect, true);
    v.setUint32(COMMON.deviceFeature, word(this.core.offeredFeatures, this.deviceFeatureSelect), true);
    v.setUint32(COMMON.driverFeatureSelect, this.driverFeatureSelect, true);
    v.setUint32(COMMON.driverFeature, word(this.driverFeatures, this.driverFeatureSelect), true);
    v.setUint16(COMMON.msixConfig, this.msixConfig, true);
    v.setUint16(COMMON.numQueues, this.queues.length, true);
    v.setUint8(COMMON.deviceStatus, this.core.deviceStatus);
    v.setUint8(COMMON.configGeneration, this.core.configGeneration & 0xff);
    v.setUint16(COMMON.queueSelect, this.queueSelect, true);
    const q = this.selected();
    if (q !== undefined) {
      // A queue index beyond num_queues reads queue_size 0: "not available" (section 4.1.4.3.2).
      v.setUint16(COMMON.queueSize, q.size, true);
      v.setUint16(COMMON.queueMsixVector, q.vector, true);
      v.setUint16(COMMON.queueEnable, q.enabled ? 1 : 0, true);
      v.setUint16(COMMON.queueNotifyOff, this.queueSelect, true);
      v.setBigUint64(COMMON.queueDesc, q.desc, true);
      v.setBigUint64(COMMON.queueDriver, q.driver, true);
      v.setBigUint64(COMMON.queueDevice, q.device, true);
    }
    return bytes;
  }

  private commonWrite(at: number, data: Uint8Array): void {
    const before = this.commonImage();
    const after = before.slice();
    after.set(data, at);
    const v = new DataView(after.buffer);
    const touched = (field: number, width: number): boolean => at < field + width && at + data.length > field;
    const fields: [number, number][] = [
      [COMMON.deviceFeatureSelect, 4], [COMMON.deviceFeature, 4], [COMMON.driverFeatureSelect, 4], [COMMON.driverFeature, 4],
      [COMMON.msixConfig, 2], [COMMON.numQueues, 2], [COMMON.deviceStatus, 1], [COMMON.configGeneration, 1],
      [COMMON.queueSelect, 2], [COMMON.queueSize, 2], [COMMON.queueMsixVector, 2], [COMMON.queueEnable, 2],
      [COMMON.queueNotifyOff, 2], [COMMON.queueDesc, 8], [COMMON.queueDriver, 8], [COMMON.queueDevice, 8],
    ];
    for (const [field, width] of fields) {
      if (touched(field, width)) this.applyField(field, v);
    }
  }

  private applyField(field: number, v: DataView): void {
    const q = this.selected();
    const queueField = (apply: (q: QueueConfig) => void): void => {
      if (q === undefined) return; // beyond num_queues: nothing to configure
      if (q.enabled) {
        this.counters.lateQueueWrites++;
        this.log.log('warn', 'queue register written while the queue is enabled; ignored', { queue: this.queueSelect, field });
        return;
      }
      apply(q);
    };
    switch (field) {
      case COMMON.deviceFeatureSelect:
        this.deviceFeatureSelect = v.getUint32(field, true);
        return;
      case COMMON.driverFeatureSelect:
        this.driverFeatureSelect = v.getUint32(field, true);
        return;
      case COMMON.driverFeature: {
        const sel = this.driverFeatureSelect;
        if (sel > 1) return; // no features there
        if ((this.core.deviceStatus & STATUS_FEATURES_OK) !== 0) {
          this.core.setDriverFeatures(this.driverFeatures); // the core counts and logs the late write
          return;
        }
        const shift = BigInt(32 * sel);
        this.driverFeatures = (this.driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(v.getUint32(field, true)) << shift);
        return;
      }
      case COMMON.msixConfig:
        this.msixConfig = this.validVector(v.getUint16(field, true));
        return;
      case COMMON.deviceStatus:
        this.writeStatus(v.getUint8(field));
        return;
      case COMMON.queueSelect:
        this.queueSelect = v.getUint16(field, true);
        return;
      case COMMON.queueSize:
        queueField((q) => (q.size = v.getUint16(field, true)));
        return;
      case COMMON.queueMsixVector:
        // Not bound by the enable rule: a driver may move a queue's vector at any time (Linux does on affinity).
        if (q !== undefined) q.vector = this.validVector(v.getUint16(field, true));
        return;
      case COMMON.queueEnable:
        if (q !== undefined && v.getUint16(field, true) === 1 && !q.enabled) this.enableQueue(this.queueSelect, q);
        return;
      case COMMON.queueDesc:
        queueField((q) => (q.desc = v.getBigUint64(field, true)));
        return;
      case COMMON.queueDriver:
        queueField((q) => (q.driver = v.getBigUint64(field, true)));
        return;
      case COMMON.queueDevice:
        queueField((q) => (q.device = v.getBigUint64(field, true)));
        return;
      default:
        this.counters.readOnlyWrites++;
    }
  }

  /** A vector the table has, else NO_VECTOR (what the driver reads back tells it the vector was refused). */
  private validVector(vector: number): number {
    return vector < this.layout.msixVectors ? vector : NO_VECTOR;
  }

  private writeStatus(value: number): void {
    if (value === 0) {
      this.reset();
      return;
    }
    const added = value & ~this.core.deviceStatus;
    if ((added & STATUS_FEATURES_OK) !== 0) this.core.setDriverFeatures(this.driverFeatures);
    this.core.setStatus(value);
  }

  /** Device reset (status 0, or the presenter's own reset): the core and model reset, every register to default. */
  reset(): void {
    this.core.reset();
    this.queues.forEach((_, i) => (this.queues[i] = this.freshQueue(i)));
    this.deviceFeatureSelect = 0;
    this.driverFeatureSelect = 0;
    this.driverFeatures = 0n;
    this.msixConfig = NO_VECTOR;
    this.queueSelect = 0;
    this.isr = 0;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Queues and memory

  private get packed(): boolean {
    return (this.driverFeatures & bit(F_RING_PACKED)) !== 0n;
  }

  /** Queue options over the current memory, or why the queue cannot be built. */
  private queueOptions(index: number, q: QueueConfig): QueueOptions | string {
    const max = this.maxSize(index);
    if (q.size < 1 || q.size > max) return `size ${q.size} is not in 1..${max}`;
    if (!this.packed && (q.size & (q.size - 1)) !== 0) return `split queue size ${q.size} is not a power of two`;
    const sizes = this.packed
      ? { desc: descTableSize(q.size), driver: PACKED_EVENT_SIZE, device: PACKED_EVENT_SIZE }
      : { desc: descTableSize(q.size), driver: splitAvailSize(q.size), device: splitUsedSize(q.size) };
    const area = (what: string, gpa: bigint, len: number): Uint8Array | string => {
      const view = gpa > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : this.memory.contiguous(Number(gpa), len);
      return view ?? `${what} [0x${gpa.toString(16)}, +${len}) is not inside one region of guest memory`;
    };
    const desc = area('descriptor area', q.desc, sizes.desc);
    const driver = area('driver area', q.driver, sizes.driver);
    const device = area('device area', q.device, sizes.device);
    for (const a of [desc, driver, device]) if (typeof a === 'string') return a;
    const opts: QueueOptions = {
      size: q.size,
      rings: { desc: desc as Uint8Array, driver: driver as Uint8Array, device: device as Uint8Array },
      memory: this.memory,
      eventIdx: (this.driverFeatures & bit(F_EVENT_IDX)) !== 0n,
      indirect: (this.driverFeatures & bit(F_INDIRECT_DESC)) !== 0n,
    };
    const state = q.queue?.getState();
    if (state !== undefined) opts.state = state;
    return checkQueueOptions(this.packed ? 'packed' : 'split', opts) ?? opts;
  }

  private enableQueue(index: number, q: QueueConfig): void {
    const opts = this.queueOptions(index, q);
    if (typeof opts === 'string') {
      this.counters.badQueues++;
      this.log.log('warn', 'queue enable refused', { queue: index, why: opts });
      // The queue stays disabled (the driver reads queue_enable 0) and the device needs a reset.
      this.core.queueBroken(index, new Error(`queue ${index}: ${opts}`));
      return;
    }
    q.enabled = true;
    q.queue = createQueue(this.packed ? 'packed' : 'split', opts);
    this.core.setQueue(index, q.queue);
  }

  /**
   * Guest memory changed (the presenter's DMA map): enabled queues are rebuilt over the new map first (their views
   * pointed into the old one), then the core and the model are told, before the presenter unmaps anything dropped.
   */
  setMemory(memory: GuestMemory): void {
    this.memory = memory;
    this.queues.forEach((q, i) => {
      if (q.queue === undefined) return;
      const opts = this.queueOptions(i, q);
      if (typeof opts === 'string') {
        this.log.log('error', 'queue no longer inside guest memory after a DMA map change', { queue: i, why: opts });
        q.queue = undefined;
        this.core.setQueue(i, undefined);
        this.core.queueBroken(i, new Error(`queue ${i}: ${opts}`));
        return;
      }
      q.queue = createQueue(this.packed ? 'packed' : 'split', opts);
      this.core.setQueue(i, q.queue);
    });
    this.core.setMemory(memory);
  }

  get guestMemory(): GuestMemory {
    return this.memory;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Interrupts

  private queueInterrupt(index: number): void {
    const q = this.queues[index];
    if (q === undefined) return;
    this.signal(ISR_QUEUE, q.vector);
  }

  private configInterrupt(): void {
    this.signal(ISR_CONFIG, this.msixConfig);
  }

  private signal(isrBit: number, vector: number): void {
    this.counters.interrupts++;
    if (this.irq.msixEnabled()) {
      // With MSI-X the ISR is not used; a queue without a vector gets no interrupt (section 4.1.5.1.2).
      if (vector !== NO_VECTOR) this.irq.msix(vector);
      return;
    }
    this.isr |= isrBit;
    this.irq.intx();
  }

  /**
   * The presenter unmasked INTx after the driver's end of interrupt (vfio: any BAR access after an INTx). The line
   * is level-triggered: while the ISR still has a reason, it goes up again.
   */
  intxUnmasked(): void {
    if (this.isr !== 0 && !this.irq.msixEnabled()) this.irq.intx();
  }

  get isrStatus(): number {
    return this.isr;
  }
}
