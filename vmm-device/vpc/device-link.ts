// Links the engine to a device model that keeps its own table of connected QPs (RdmaDevice.teardownConnections,
// vmm-device/rdma): after every policy change the device's connected QPs are judged against the new policy, and
// each one that became illegal is moved to ERR (work flushed) with QP_POLICY_TEARDOWN and the reason. This works
// with the device as it is today; the engine's own tracking (track/attach) serves devices that report connections.

import { performance } from 'node:perf_hooks';
import type { Logger } from '../util/log.ts';
import type { VpcEngine } from './engine.ts';
import { qpTypeName } from './resolver.ts';

/** What the link needs of the device (RdmaDevice has it). */
export interface TeardownCapableDevice {
  readonly vmId: string;
  teardownConnections(decide: (c: { handle: number; qpType: number; dgid: Uint8Array }) => number | undefined): Promise<number[]>;
}

export interface DeviceLink {
  /** Resolves when the teardowns of every change so far are done (tests, shutdown). */
  settled(): Promise<void>;
  detach(): void;
  /** Milliseconds from the last change reaching the engine to its last QP in ERR with its event queued. */
  readonly lastLatencyMs: number;
}

export function linkDevice(engine: VpcEngine, device: TeardownCapableDevice, log: Logger): DeviceLink {
  let pending: Promise<void> = Promise.resolve();
  let lastLatencyMs = 0;
  const off = engine.onApplied(({ observedAt }) => {
    pending = pending.then(async () => {
      try {
        const handles = await device.teardownConnections((c) => {
          const type = qpTypeName(c.qpType);
          return type === undefined ? undefined : engine.judge(device.vmId, c.dgid, type);
        });
        const latency = performance.now() - observedAt;
        if (handles.length > 0) {
          lastLatencyMs = latency;
          engine.countTeardowns(device.vmId, handles.length, latency);
          log.log('info', 'QPs torn down by policy', { vm: device.vmId, qps: handles.join(','), latencyMs: latency.toFixed(3) });
        }
      } catch (e) {
        log.log('error', 'device teardown failed', { vm: device.vmId, error: (e as Error).message });
      }
    });
  });
  return {
    settled: () => pending,
    detach: off,
    get lastLatencyMs() {
      return lastLatencyMs;
    },
  };
}
