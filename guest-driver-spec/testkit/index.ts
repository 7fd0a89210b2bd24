// The driver-side virtqueue test kit: build split or packed rings in guest memory the way a guest driver does
// (or break them on purpose), hand them to a device-side queue, and check what the device saw and returned.
//
//   const mem = new TestGuestMemory({ regions: randomLayout(rng, { regions: 3, minRegionSize: 0x10000, adjacent: 'some' }), rng });
//   const driver = new SplitDriver({ mem, size: 256, eventIdx: true, indirect: true });
//   const built = driver.add({ buffers: [{ len: 64 }, { len: 128, write: true }] });
//   const queue = new SplitQueue(driver.queueOptions());
//   const chain = queue.pop();   // expect chain.id === built.id, chain.describe() deep-equals built.segments
//   queue.pushUsed(chain, 10);   // expect driver.readUsed() to deep-equal [{ id: built.id, len: 10 }]
//
// Everything random comes from a seeded generator, so a failing case is reproduced from its seed.

export { SeededRandom } from './prng.ts';
export {
  TestGuestMemory,
  randomLayout,
  alignUp,
  GUARD_BYTE,
  DEFAULT_GUARD_BYTES,
  DEFAULT_MAX_GAP,
  CROSSING_RESERVE,
  type RegionPlan,
  type TestMemoryOptions,
  type AllocOptions,
  type AllocMark,
  type RandomLayoutOptions,
} from './test-memory.ts';
export {
  encodeDescriptor,
  decodeDescriptor,
  describeFlags,
  writableBytes,
  type Layout,
  type RawDescriptor,
  type DecodedDescriptor,
  type ExpectedSegment,
  type BufferSpec,
  type ChainSpec,
  type BuiltChain,
} from './descriptors.ts';
export { SplitDriver, type SplitDriverOptions, type UsedElement, type RingPlacement } from './split-driver.ts';
export {
  PackedDriver,
  eventTriggered,
  readEvent,
  type PackedDriverOptions,
  type RingPosition,
  type EventSuppression,
} from './packed-driver.ts';
export {
  MALFORMED_CASES,
  malformedCasesFor,
  overflowBufferLen,
  OVERFLOW_CHAIN_QUEUE_SIZE,
  OVERFLOW_CHAIN_REGION_SIZE,
  OVERFLOWING_ADDR,
  OVERFLOW_LEN,
  type MalformedCase,
  type VirtqDriver,
} from './malformed.ts';
