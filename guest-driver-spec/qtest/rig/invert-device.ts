// The device the QEMU tests attach through vhost-user until the RDMA device exists: every chain is answered
// with its readable bytes inverted (each byte XOR 0xff) in its writable part, so an answer proves the bytes went
// through the device (an echo could be mistaken for the driver's own buffer). Config space: a magic number, the
// queue count, and a 64-bit serial the test picks, all read-only. It keeps the memory maps it is given after
// DRIVER_OK, so a test sees a hot-added region reach the device model.

import type { ActivationContext, VirtioDeviceModel } from '../../../vmm-device/virtio/device.ts';
import type { GuestMemory } from '../../../vmm-device/memory/guest-memory.ts';
import { drainQueue } from '../../../vmm-device/virtio/core.ts';

export const INVERT_DEVICE_ID = 42;
export const INVERT_CONFIG_MAGIC = 0x766e_6921; // "!inv" little-endian
export const INVERT_CONFIG_SIZE = 16;
export const INVERT_MAX_QUEUE_SIZE = 128;
/** A device-specific feature bit, offered so a test sees it travel through QEMU. */
export const INVERT_F_TEST = 1n << 0n;

export class InvertDevice implements VirtioDeviceModel {
  readonly deviceId = INVERT_DEVICE_ID;
  readonly deviceFeatures = INVERT_F_TEST;
  readonly configSize = INVERT_CONFIG_SIZE;
  readonly config = new Uint8Array(INVERT_CONFIG_SIZE);
  ctx: ActivationContext | undefined;
  activations = 0;
  resets = 0;
  served = 0;
  notifies = 0;
  /** Every memory map the core handed over while the device was active (a map changed after DRIVER_OK). */
  readonly memoryMaps: GuestMemory[] = [];

  constructor(
    readonly queueCount: number,
    serial: bigint,
    /** Shared memory regions to declare (spec 13.14: QEMU then asks GET_SHMEM_CONFIG and exposes them in a BAR). */
    readonly sharedMemoryRegions?: ReadonlyMap<number, bigint>,
  ) {
    const view = new DataView(this.config.buffer);
    view.setUint32(0, INVERT_CONFIG_MAGIC, true);
    view.setUint32(4, queueCount, true);
    view.setBigUint64(8, serial, true);
  }

  maxQueueSize(): number {
    return INVERT_MAX_QUEUE_SIZE;
  }

  readConfig(offset: number, dest: Uint8Array): void {
    dest.set(this.config.subarray(offset, offset + dest.length));
  }

  writeConfig(): boolean {
    return false;
  }

  activate(ctx: ActivationContext): void {
    this.ctx = ctx;
    this.activations++;
  }

  queueNotify(index: number): void {
    this.notifies++;
    const ctx = this.ctx;
    const queue = ctx?.queues[index];
    if (ctx === undefined || queue === undefined) return;
    const error = drainQueue(queue, (chain) => {
      const request = chain.reader().read(chain.readableBytes);
      const answer = request.subarray(0, Math.min(request.length, chain.writableBytes)).map((b) => b ^ 0xff);
      chain.writer().write(answer);
      queue.pushUsed(chain, answer.length);
      this.served++;
    });
    if (error !== undefined) ctx.queueBroken(index, error);
    if (queue.needsNotification()) ctx.interrupt(index);
  }

  memoryChanged(memory: GuestMemory): void {
    this.memoryMaps.push(memory);
  }

  reset(): void {
    this.ctx = undefined;
    this.resets++;
  }
}
