// The guest side of the RDMA fuzz targets: one guest RAM (two regions, guard bytes around each) for the life of the
// process, and per input a driver that starts over as a guest does after a reset: RAM zeroed, the allocator back at
// its start and its gap generator reseeded (so every input sees the same queue layout, and a finding replays alone
// with -runs=1 as it ran in the campaign), control/event/doorbell split queues laid out and the device activated.
// stop() resets the device and from then on records what the device does to guest memory: any GuestMemory call
// (harness.ts quiesceGuestMemory), any byte of the zeroed RAM changed, any guard byte changed.
import { SplitDriver, TestGuestMemory } from '../../../guest-driver-spec/testkit/index.ts';
import { SeededRandom } from '../../../guest-driver-spec/testkit/prng.ts';
import type { AllocMark } from '../../../guest-driver-spec/testkit/test-memory.ts';
import { SplitQueue } from '../../../vmm-device/virtqueue/index.ts';
import type { RdmaDevice } from '../../../vmm-device/rdma/index.ts';
import { GuestCq, GuestQp, PAGE, ALL_FEATURES, type TestGuest } from '../../rdma/guest.ts';
import { quietLogger, quiesceGuestMemory } from './harness.ts';

/** Guest physical addresses of the two RAM regions (as test/rdma/guest.ts lays them out). */
export const REGION_GPAS = [0x10_0000, 0x1000_0000] as const;
/** Seed of the allocator's gaps and descriptor order: the same for every input. */
export const LAYOUT_SEED = 42;
/** Descriptors of each of the three queues. */
export const QUEUE_SIZE = 64;
/** Largest random gap the allocator leaves before a buffer. */
export const MAX_GAP = 64;

/** A SeededRandom that can start its sequence over (SeededRandom keeps its state private). */
class RestartableRandom extends SeededRandom {
  private inner: SeededRandom;
  constructor(seed: number) {
    super(seed);
    this.inner = new SeededRandom(seed);
  }
  override nextU32(): number {
    return this.inner.nextU32();
  }
  restart(): void {
    this.inner = new SeededRandom(this.seed);
  }
}

export class FuzzGuest {
  readonly mem: TestGuestMemory;
  private readonly rng = new RestartableRandom(LAYOUT_SEED);
  private readonly start0: AllocMark;
  private readonly zero: Buffer;
  ctrl!: SplitDriver;
  eventq!: SplitDriver;
  doorbell!: SplitDriver;
  /** Queues the device declared broken (DEVICE_NEEDS_RESET) in this input. */
  broken: { queue: number; error: Error }[] = [];
  /** What the device reported through deviceFailed (a failure no driver action caused) in this input. */
  failures: Error[] = [];
  private afterReset: string[] | undefined;

  constructor(
    readonly device: RdmaDevice,
    regionSize: number,
  ) {
    this.mem = new TestGuestMemory({ regions: REGION_GPAS.map((gpa) => ({ gpa, size: regionSize })), rng: this.rng, maxGap: MAX_GAP });
    this.start0 = this.mem.mark();
    this.zero = Buffer.alloc(regionSize);
  }

  /** A new life: fresh driver state over zeroed RAM, queues laid out, DRIVER_OK with every feature. */
  start(): void {
    this.afterReset = undefined;
    quiesceGuestMemory(undefined);
    this.mem.release(this.start0);
    this.rng.restart();
    this.broken = [];
    this.failures = [];
    this.ctrl = new SplitDriver({ mem: this.mem, size: QUEUE_SIZE });
    this.eventq = new SplitDriver({ mem: this.mem, size: QUEUE_SIZE });
    this.doorbell = new SplitDriver({ mem: this.mem, size: QUEUE_SIZE });
    const broken = this.broken;
    const failures = this.failures;
    this.device.activate({
      features: ALL_FEATURES,
      memory: this.mem.memory,
      queues: [this.ctrl, this.eventq, this.doorbell].map((d) => new SplitQueue(d.queueOptions())),
      interrupt: () => undefined,
      queueBroken: (queue, error) => broken.push({ queue, error }),
      deviceFailed: (error) => failures.push(error),
      log: quietLogger,
    });
  }

  /** The device's reset; from here until start() every device access to guest memory is recorded. */
  stop(): void {
    this.device.reset();
    this.afterReset = [];
    quiesceGuestMemory(this.afterReset);
    for (let i = 0; i < REGION_GPAS.length; i++) this.mem.regionBytes(i).fill(0);
  }

  /** What the device did to guest memory since stop(): GuestMemory calls, changed RAM bytes, changed guard bytes. */
  accessesAfterReset(): string[] {
    const out = [...(this.afterReset ?? [])];
    for (let i = 0; i < REGION_GPAS.length; i++) {
      const bytes = this.mem.regionBytes(i);
      if (!this.zero.equals(bytes)) {
        const at = bytes.findIndex((b) => b !== 0);
        out.push(`region ${i}: byte at gpa 0x${(REGION_GPAS[i]! + at).toString(16)} written`);
      }
    }
    out.push(...this.mem.checkGuards());
    return out;
  }

  get config() {
    return this.device.config;
  }

  /** Zeroed guest memory, page aligned (zeroed again: the device may have written there in this input). */
  allocPages(n: number): number {
    const gpa = this.mem.alloc(n * PAGE, { align: PAGE });
    this.mem.view(gpa, n * PAGE).fill(0);
    return gpa;
  }
}

/** GuestCq and GuestQp of the test kit read and write rings through `guest.mem` only. */
export function asKitGuest(g: FuzzGuest): TestGuest {
  return { mem: g.mem } as unknown as TestGuest;
}

export { GuestCq as FuzzCq, GuestQp as FuzzQp };
