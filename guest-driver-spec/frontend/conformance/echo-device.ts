// A small device model for the vhost-user conformance tests: every queue answers each chain with the bytes of its
// readable part (as many as fit in the writable part). Config space: 4 read-only bytes (a magic number) and 4
// writable bytes.

import type { ActivationContext, VirtioDeviceModel } from '../../../vmm-device/virtio/device.ts';
import { drainQueue } from '../../../vmm-device/virtio/core.ts';
import type { DescriptorChain } from '../../../vmm-device/virtqueue/index.ts';

export const ECHO_DEVICE_ID = 42;
export const ECHO_CONFIG_MAGIC = 0x6f686365; // "echo"
export const ECHO_MAX_QUEUE_SIZE = 256;
/** A device feature bit, to see it offered and acked. */
export const ECHO_F_TEST = 1n << 0n;
/** Requests starting with this are kept in flight by the restart tests' holding device (backend-process.ts). */
export const HOLD_PREFIX = 'hold:';

/**
 * Copies the chain's readable bytes into its writable part (as many as fit); returns how many. A request and an
 * answer buffer each inside one guest memory region (what every driver here posts) are copied view to view; any
 * other shape goes through the chain's reader and writer.
 */
export function echo(chain: DescriptorChain): number {
  const n = Math.min(chain.readableBytes, chain.writableBytes);
  const seg = chain.segments;
  if (chain.readableCount === 1 && seg.length === 4) {
    const src = chain.memory.contiguous(seg[0]!, n);
    const dst = chain.memory.contiguous(seg[2]!, n);
    if (src !== undefined && dst !== undefined) {
      dst.set(src);
      return n;
    }
  }
  chain.writer().write(chain.reader().read(n));
  return n;
}

export class EchoDevice implements VirtioDeviceModel {
  readonly deviceId = ECHO_DEVICE_ID;
  readonly deviceFeatures = ECHO_F_TEST;
  readonly configSize = 8;
  readonly config = new Uint8Array(8);
  ctx: ActivationContext | undefined;
  activations = 0;
  resets = 0;
  served = 0;
  /** Makes queueNotify throw (a device model bug): the back-end must survive it. */
  throwOnNotify = false;

  constructor(readonly queueCount = 2) {
    new DataView(this.config.buffer).setUint32(0, ECHO_CONFIG_MAGIC, true);
  }

  maxQueueSize(): number {
    return ECHO_MAX_QUEUE_SIZE;
  }

  readConfig(offset: number, dest: Uint8Array): void {
    dest.set(this.config.subarray(offset, offset + dest.length));
  }

  writeConfig(offset: number, src: Uint8Array): boolean {
    if (offset < 4) return false;
    this.config.set(src, offset);
    return true;
  }

  activate(ctx: ActivationContext): void {
    this.ctx = ctx;
    this.activations++;
  }

  queueNotify(index: number): void {
    if (this.throwOnNotify) throw new Error('echo device: injected model failure');
    const ctx = this.ctx!;
    const q = ctx.queues[index];
    if (q === undefined) return;
    const err = drainQueue(q, (chain) => {
      q.pushUsed(chain, echo(chain));
      this.served++;
    });
    if (err !== undefined) ctx.queueBroken(index, err);
    if (q.needsNotification()) ctx.interrupt(index);
  }

  reset(): void {
    this.ctx = undefined;
    this.resets++;
  }
}
