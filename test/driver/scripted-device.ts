// A device model whose control answers are given by the test: it records every control request (the exact bytes
// the driver put in guest RAM and how the chain was cut into descriptors), every doorbell buffer, and holds event
// buffers until the test writes an event into one. It runs behind the real vhost-user server and the lead's virtio
// device core, so the driver's rings, kicks and interrupts are real; only the RDMA semantics are the test's script.
// The driver's encoding is checked against the spec's byte examples with it (the RDMA device itself is tested by
// the end-to-end tests).

import type { ActivationContext, VirtioDeviceModel } from '../../vmm-device/virtio/device.ts';
import { drainQueue } from '../../vmm-device/virtio/core.ts';
import type { DescriptorChain } from '../../vmm-device/virtqueue/chain.ts';
import { DeviceConfig, FeatureBit, Limits, AtomicCap, LinkLayer, Mtu, PortState } from '../../vmm-device/abi/rdma/index.ts';

export const SCRIPTED_FEATURES =
  (1n << BigInt(FeatureBit.RC)) |
  (1n << BigInt(FeatureBit.UD)) |
  (1n << BigInt(FeatureBit.ATOMIC)) |
  (1n << BigInt(FeatureBit.IMMEDIATE)) |
  (1n << BigInt(FeatureBit.INLINE));

/** A configuration a conforming device could report (section 5.2 rules hold). */
export function scriptedConfig(overrides: Partial<ReturnType<typeof DeviceConfig.decode>> = {}): Uint8Array {
  const gid = new Uint8Array(16);
  gid.set([0xff, 0xff, 10, 0, 0, 1], 10);
  return DeviceConfig.encode({
    max_pd: 64,
    max_cq: 1024,
    max_qp: 1024,
    max_mr: 256,
    max_ah: 64,
    max_qp_wr: 256,
    max_cqe: 1024,
    max_send_sge: 4,
    max_recv_sge: 3,
    max_inline_data: 64,
    max_mr_size: 1n << 32n,
    page_size_mask: 1n << 12n,
    max_mr_pages: 1 << 20,
    max_pages_per_command: 16,
    max_qp_rd_atom: 16,
    max_qp_init_rd_atom: 16,
    max_msg_size: 1 << 30,
    num_doorbell_queues: 1,
    gid_tbl_len: 1,
    node_guid: 0x0200_0aff_fe00_0001n,
    port_state: PortState.ACTIVE,
    active_mtu: Mtu.MTU_1024,
    max_mtu: Mtu.MTU_4096,
    link_layer: LinkLayer.ETHERNET,
    active_width: 1,
    active_speed: 1,
    atomic_cap: AtomicCap.HCA,
    gid,
    mac: new Uint8Array([0x52, 0x54, 0, 0, 0, 1]),
    ...overrides,
  });
}

export interface RecordedChain {
  readable: Uint8Array;
  writableBytes: number;
  segments: { addr: number; len: number; write: boolean }[];
}

export class ScriptedDevice implements VirtioDeviceModel {
  readonly deviceId = 42;
  readonly queueCount = 3;
  readonly configSize = DeviceConfig.size;
  deviceFeatures = SCRIPTED_FEATURES;
  config: Uint8Array = scriptedConfig();
  ctx: ActivationContext | undefined;
  /** Answers for the next control requests, in order: the bytes to write into the writable part. */
  readonly answers: Uint8Array[] = [];
  readonly requests: RecordedChain[] = [];
  readonly doorbells: RecordedChain[] = [];
  private readonly eventChains: DescriptorChain[] = [];
  activations = 0;
  resets = 0;

  maxQueueSize(): number {
    return 1024;
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

  private record(chain: DescriptorChain): RecordedChain {
    return { readable: chain.reader().read(chain.readableBytes), writableBytes: chain.writableBytes, segments: chain.describe() };
  }

  queueNotify(index: number): void {
    const ctx = this.ctx!;
    const q = ctx.queues[index];
    if (q === undefined) return;
    const err = drainQueue(q, (chain) => {
      if (index === 0) {
        this.requests.push(this.record(chain));
        const answer = this.answers.shift();
        if (answer === undefined) throw new Error('scripted device: a control request with no answer scripted');
        chain.writer().write(answer);
        q.pushUsed(chain, answer.byteLength);
      } else if (index === 1) {
        this.eventChains.push(chain);
      } else {
        this.doorbells.push(this.record(chain));
        q.pushUsed(chain, 0);
      }
    });
    if (err !== undefined) ctx.queueBroken(index, err);
    if (q.needsNotification()) ctx.interrupt(index);
  }

  /** Event buffers the driver has posted and the device holds. */
  get eventBuffers(): number {
    return this.eventChains.length;
  }

  /** Writes `bytes` (an Event) into the oldest posted event buffer and returns it with used length `len`. */
  emitEvent(bytes: Uint8Array, len: number = Limits.EVENT_SIZE): void {
    const ctx = this.ctx!;
    const q = ctx.queues[1]!;
    const chain = this.eventChains.shift();
    if (chain === undefined) throw new Error('scripted device: no event buffer posted');
    chain.writer().write(bytes);
    q.pushUsed(chain, len);
    if (q.needsNotification()) ctx.interrupt(1);
  }

  reset(): void {
    this.ctx = undefined;
    this.eventChains.length = 0;
    this.resets++;
  }
}
