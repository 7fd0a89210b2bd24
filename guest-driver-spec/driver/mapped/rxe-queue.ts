// One mapped rxe queue as the guest sees it (spec sections 13.3 and 13.4): a QueueMapping from CREATE_CQ / CREATE_QP
// checked once against the region and the header the host wrote, then slot addresses and the two indexes. The
// window's readU32/writeU32 are the load-acquire and store-release section 13.4 asks for.

import { HostQueueFormat, MappingLimits, QueueMapping } from '../../../vmm-device/abi/rdma/index.ts';
import { ProtocolError, UsageError } from '../errors.ts';
import type { DriverTransport, SharedMemoryWindow } from '../transport.ts';
import { RxeHeader } from './rxe-abi.ts';

export type QueueMappingValue = ReturnType<typeof QueueMapping.decode>;

/** Largest slot count the driver believes (the spec's MAX_QUEUE_DEPTH rounded up, plus the empty slot). */
const MAX_SLOTS = 1 << 23;
/** Largest slot the driver believes: an rxe send WQE with the most SGEs a host allows stays far below it. */
const MAX_SLOT_SIZE = 1 << 16;

const windows = new WeakMap<DriverTransport, Map<number, Promise<SharedMemoryWindow | undefined>>>();

/** The transport's window on region `shmid`, asked once per transport and region. */
export function sharedWindow(transport: DriverTransport, shmid: number): Promise<SharedMemoryWindow> {
  let perTransport = windows.get(transport);
  if (perTransport === undefined) windows.set(transport, (perTransport = new Map()));
  let w = perTransport.get(shmid);
  if (w === undefined) {
    if (transport.sharedMemory === undefined) throw new UsageError(`${transport.kind} exposes no shared memory regions`);
    w = transport.sharedMemory(shmid);
    perTransport.set(shmid, w);
  }
  return w.then((win) => {
    if (win === undefined) throw new ProtocolError(`the device names shared memory region ${shmid}, which ${transport.kind} does not expose`);
    return win;
  });
}

export class RxeQueue {
  readonly mask: number;
  readonly numSlots: number;
  readonly slotSize: number;
  readonly base: bigint;
  private constructor(
    readonly window: SharedMemoryWindow,
    readonly mapping: QueueMappingValue,
    readonly what: string,
  ) {
    this.numSlots = mapping.num_slots;
    this.slotSize = mapping.slot_size;
    this.mask = mapping.num_slots - 1;
    this.base = mapping.offset;
  }

  /** Checks a QueueMapping (section 13.3) and the header behind it (13.4); throws ProtocolError on any mismatch. */
  static async open(transport: DriverTransport, m: QueueMappingValue, minSlots: number, minSlotSize: number, what: string): Promise<RxeQueue> {
    const bad = (why: string): never => {
      throw new ProtocolError(`${what}: ${why}`);
    };
    const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
    if (m.format !== HostQueueFormat.RXE) bad(`format ${m.format}, not RXE`);
    if (m.offset % BigInt(MappingLimits.MAPPING_ALIGN) !== 0n || m.size % BigInt(MappingLimits.MAPPING_ALIGN) !== 0n) bad(`offset ${m.offset} / size ${m.size} not page multiples`);
    if (!pow2(m.num_slots) || m.num_slots > MAX_SLOTS || m.num_slots < minSlots) bad(`num_slots ${m.num_slots} (at least ${minSlots}, a power of two)`);
    if (!pow2(m.slot_size) || m.slot_size > MAX_SLOT_SIZE || m.slot_size < Math.max(minSlotSize, MappingLimits.RXE_MIN_SLOT_SIZE)) bad(`slot_size ${m.slot_size} (at least ${minSlotSize})`);
    const bytes = BigInt(RxeHeader.SIZE) + BigInt(m.num_slots) * BigInt(m.slot_size);
    if (bytes > m.size) bad(`${m.num_slots} slots of ${m.slot_size} bytes do not fit in ${m.size} bytes`);
    const window = await sharedWindow(transport, m.shmid);
    if (m.offset + m.size > window.size) bad(`range ${m.offset}+${m.size} outside region ${m.shmid} of ${window.size} bytes`);
    const q = new RxeQueue(window, m, what);
    const log2 = await window.readU32(m.offset + BigInt(RxeHeader.LOG2_ELEM_SIZE));
    const mask = await window.readU32(m.offset + BigInt(RxeHeader.INDEX_MASK));
    if (1 << log2 !== m.slot_size || log2 > 30) bad(`header log2_elem_size ${log2} disagrees with slot_size ${m.slot_size}`);
    if (mask !== q.mask) bad(`header index_mask ${mask} disagrees with num_slots ${m.num_slots}`);
    return q;
  }

  slotOffset(n: number): bigint {
    return this.base + BigInt(RxeHeader.SIZE + (n & this.mask) * this.slotSize);
  }

  /** A direct view of slot `n` when the transport maps the region into this process. */
  slotView(n: number, length: number): Uint8Array | undefined {
    return this.window.view?.(this.slotOffset(n), length);
  }

  async loadProducer(): Promise<number> {
    return (await this.window.readU32(this.base + BigInt(RxeHeader.PRODUCER_INDEX))) & this.mask;
  }
  async loadConsumer(): Promise<number> {
    return (await this.window.readU32(this.base + BigInt(RxeHeader.CONSUMER_INDEX))) & this.mask;
  }
  storeProducer(value: number): Promise<void> {
    return this.window.writeU32(this.base + BigInt(RxeHeader.PRODUCER_INDEX), value & this.mask);
  }
  storeConsumer(value: number): Promise<void> {
    return this.window.writeU32(this.base + BigInt(RxeHeader.CONSUMER_INDEX), value & this.mask);
  }

  /** Entries between two masked indexes. */
  used(producer: number, consumer: number): number {
    return (producer - consumer) & this.mask;
  }
}
