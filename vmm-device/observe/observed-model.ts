// A device model seen from outside: wraps any VirtioDeviceModel (the RDMA device) and its queues so the flight
// recorder gets kicks, chains popped with their bytes, chains returned with what was written, interrupts, broken
// queues and device failures, and the metrics get each control request's command, status and latency, without a
// line of counting code in the device or the transport. The wrapper sits between the vhost-user server and the
// model (the CLI builds it), so the hot path pays one extra call per chain plus a bounded copy when recording.

import type { ActivationContext, VirtioDeviceModel } from '../virtio/device.ts';
import type { GuestMemory } from '../memory/guest-memory.ts';
import type { DeviceQueue, QueueState } from '../virtqueue/queue.ts';
import type { DescriptorChain } from '../virtqueue/chain.ts';
import { VirtqueueError } from '../virtqueue/errors.ts';
import { COMMANDS, CtrlRequestHeader, CtrlResponseHeader, Status } from '../abi/rdma/index.ts';
import { MAX_RECORDED_BYTES, NO_RECORDER, type EventRecorder, type RecordedEvent } from './recorder.ts';

/** The virtio-rdma control queue (spec section 7): requests whose latency is measured. */
export const CONTROL_QUEUE = 0;

const STATUS_NAMES = new Map<number, string>(Object.entries(Status).map(([k, v]) => [v as number, k]));

export interface ControlAnswer {
  command: string;
  status: string;
  seconds: number;
}

export interface ObserverHooks {
  recorder: EventRecorder;
  /** One control request answered. */
  onControlAnswer?: (a: ControlAnswer) => void;
  /** NEEDS_RESET (a broken queue or a device failure): the flight recorder's dump trigger. */
  onNeedsReset?: (why: string) => void;
}

function writtenBytes(chain: DescriptorChain, len: number): Uint8Array {
  const out = new Uint8Array(Math.min(len, MAX_RECORDED_BYTES));
  let done = 0;
  for (let i = chain.readableCount; i < chain.segmentCount && done < out.length; i++) {
    const n = Math.min(chain.segments[2 * i + 1]!, out.length - done);
    chain.memory.read(chain.segments[2 * i]!, out.subarray(done, done + n));
    done += n;
  }
  return out.subarray(0, done);
}

/** A queue that reports what passes through it; behaves exactly as the queue it wraps. */
class ObservedQueue implements DeviceQueue {
  private readonly started = new Map<DescriptorChain, { t: bigint; command: string }>();
  /** Nothing to do per chain on this queue: the recorder is off and it is not the control queue. */
  private readonly idle: boolean;
  private readonly recording: boolean;
  private readonly timing: boolean;

  constructor(
    private readonly q: DeviceQueue,
    private readonly index: number,
    private readonly hooks: ObserverHooks,
  ) {
    this.recording = hooks.recorder !== NO_RECORDER;
    this.timing = index === CONTROL_QUEUE && hooks.onControlAnswer !== undefined;
    this.idle = !this.recording && !this.timing;
  }

  get size(): number {
    return this.q.size;
  }
  get layout(): 'split' | 'packed' {
    return this.q.layout;
  }
  get broken(): VirtqueueError | undefined {
    return this.q.broken;
  }
  get inFlight(): number {
    return this.q.inFlight;
  }

  pop(): DescriptorChain | VirtqueueError | null {
    const c = this.q.pop();
    if (c === null || this.idle) return c;
    try {
      if (c instanceof VirtqueueError) {
        this.hooks.recorder.record({ kind: 'pop-error', queue: this.index, error: c.message });
        return c;
      }
      const readable = c.reader().read(Math.min(c.readableBytes, this.recording ? MAX_RECORDED_BYTES : CtrlRequestHeader.size));
      if (this.recording) {
        const e: RecordedEvent = { kind: 'chain', queue: this.index, id: c.id, segments: { flat: c.segments.slice(), readable: c.readableCount }, readable };
        if (c.readableBytes > MAX_RECORDED_BYTES) e.truncated = true;
        this.hooks.recorder.record(e);
      }
      if (this.timing && readable.length >= CtrlRequestHeader.size) {
        const h = CtrlRequestHeader.decode(readable);
        this.started.set(c, { t: process.hrtime.bigint(), command: COMMANDS.get(h.command)?.name ?? `0x${h.command.toString(16)}` });
      }
    } catch {
      // Observation never changes what the device sees: a chain the recorder cannot read is the device's to judge.
    }
    return c;
  }

  pushUsed(chain: DescriptorChain, len: number): void {
    this.q.pushUsed(chain, len);
    if (this.idle) return;
    try {
      const written = writtenBytes(chain, this.recording ? len : CtrlResponseHeader.size);
      if (this.recording) {
        const e: RecordedEvent = { kind: 'used', queue: this.index, id: chain.id, len, written };
        if (len > MAX_RECORDED_BYTES) e.truncated = true;
        this.hooks.recorder.record(e);
      }
      const s = this.timing ? this.started.get(chain) : undefined;
      if (s !== undefined) {
        this.started.delete(chain);
        const status = written.length >= CtrlResponseHeader.size ? CtrlResponseHeader.decode(written).status : -1;
        this.hooks.onControlAnswer!({ command: s.command, status: STATUS_NAMES.get(status) ?? String(status), seconds: Number(process.hrtime.bigint() - s.t) / 1e9 });
      }
    } catch {
      // as in pop()
    }
  }

  needsNotification(): boolean {
    return this.q.needsNotification();
  }
  disableNotifications(): void {
    this.q.disableNotifications();
  }
  enableNotifications(): boolean {
    return this.q.enableNotifications();
  }
  hasAvailable(): boolean {
    return this.q.hasAvailable();
  }
  getState(): QueueState {
    return this.q.getState();
  }
}

export function regionsOf(memory: GuestMemory): { gpa: number; size: number }[] {
  return memory.regionList.map((r) => ({ gpa: r.guestPhysAddr, size: r.size }));
}

/** Wraps `model`; the wrapper is what the transport serves. */
export function observeModel(model: VirtioDeviceModel, hooks: ObserverHooks): VirtioDeviceModel & { readonly queues: readonly (DeviceQueue | undefined)[] } {
  let queues: (DeviceQueue | undefined)[] = [];
  const safe = (f: () => void) => {
    try {
      f();
    } catch {
      // never let observation fail the device
    }
  };
  const wrapped: VirtioDeviceModel & { queues: readonly (DeviceQueue | undefined)[] } = {
    get deviceId() {
      return model.deviceId;
    },
    get queueCount() {
      return model.queueCount;
    },
    get deviceFeatures() {
      return model.deviceFeatures;
    },
    get configSize() {
      return model.configSize;
    },
    get queues() {
      return queues;
    },
    maxQueueSize: (i) => model.maxQueueSize(i),
    readConfig: (offset, dest) => model.readConfig(offset, dest),
    writeConfig: (offset, src) => model.writeConfig(offset, src),
    activate(ctx: ActivationContext): void {
      queues = ctx.queues.map((q, i) => (q === undefined ? undefined : new ObservedQueue(q, i, hooks)));
      safe(() =>
        hooks.recorder.record({
          kind: 'activate',
          features: `0x${ctx.features.toString(16)}`,
          queues: ctx.queues.map((q, index) => (q === undefined ? null : { index, size: q.size, layout: q.layout })),
          regions: regionsOf(ctx.memory),
        }),
      );
      model.activate({
        ...ctx,
        queues,
        interrupt: (i) => {
          safe(() => hooks.recorder.record({ kind: 'interrupt', queue: i }));
          ctx.interrupt(i);
        },
        queueBroken: (i, error) => {
          safe(() => hooks.recorder.record({ kind: 'broken', queue: i, error: error.message }));
          ctx.queueBroken(i, error);
          safe(() => hooks.onNeedsReset?.(`queue ${i} broken: ${error.message}`));
        },
        deviceFailed: (error) => {
          safe(() => hooks.recorder.record({ kind: 'failed', error: error.message }));
          ctx.deviceFailed(error);
          safe(() => hooks.onNeedsReset?.(`device failed: ${error.message}`));
        },
      });
    },
    queueNotify(index: number): void {
      safe(() => hooks.recorder.record({ kind: 'kick', queue: index }));
      model.queueNotify(index);
    },
    reset(): void {
      safe(() => hooks.recorder.record({ kind: 'reset' }));
      queues = [];
      model.reset();
    },
  };
  if (model.acceptFeatures !== undefined) wrapped.acceptFeatures = (f, transport) => model.acceptFeatures!(f, transport);
  if (model.sharedMemoryRegions !== undefined) Object.assign(wrapped, { sharedMemoryRegions: model.sharedMemoryRegions });
  if (model.memoryChanged !== undefined) {
    wrapped.memoryChanged = (memory) => {
      safe(() => hooks.recorder.record({ kind: 'memory', regions: regionsOf(memory) }));
      model.memoryChanged!(memory);
    };
  }
  return wrapped;
}
