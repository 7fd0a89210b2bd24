// The virtqueue layer: split and packed queues behind one DeviceQueue interface.

import { endianness } from 'node:os';
import { PackedQueue, checkPackedOptions } from './packed.ts';
import type { DeviceQueue, QueueOptions } from './queue.ts';
import { SplitQueue, checkSplitOptions } from './split.ts';

// Ring words are read through typed arrays in host byte order; virtio 1.x rings are little-endian.
if (endianness() !== 'LE') throw new Error('vrdma-backend needs a little-endian host (virtio 1.x rings are little-endian)');

export * from '../abi/virtqueue.ts';
export * from './errors.ts';
export { DescriptorChain, ChainReader, ChainWriter } from './chain.ts';
export type { DeviceQueue, QueueOptions, QueueState, RingAreas } from './queue.ts';
export { SplitQueue, PackedQueue, checkSplitOptions, checkPackedOptions };
export { MAX_INDIRECT_TABLE_ENTRIES } from './walker.ts';

export type QueueLayout = 'split' | 'packed';

/** Why `opts` cannot make a queue of this layout, or undefined. */
export function checkQueueOptions(layout: QueueLayout, opts: QueueOptions): string | undefined {
  return layout === 'split' ? checkSplitOptions(opts) : checkPackedOptions(opts);
}

export function createQueue(layout: QueueLayout, opts: QueueOptions): DeviceQueue {
  return layout === 'split' ? new SplitQueue(opts) : new PackedQueue(opts);
}
