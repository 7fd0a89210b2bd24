// The backend's Prometheus metrics (prom-client). Every counter is read, at scrape time, from the object that
// already counts it (collect callbacks): the device's counters and handle tables, the vhost-user server's session
// counters, the queues' depths, the VPC engine and its control plane, the flight recorder. The one thing measured
// here is the control requests' latency, observed by the model wrapper (observed-model.ts) when a request is
// answered: a control request is never the data path.

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { RdmaDevice } from '../rdma/rdma-device.ts';
import type { SessionCounters } from '../transport/vhost-user/session.ts';
import type { DeviceQueue } from '../virtqueue/queue.ts';
import type { VpcBackend } from '../vpc/backend.ts';
import type { Counters as VpcCounters } from '../vpc/engine.ts';
import type { ControlAnswer } from './observed-model.ts';

/** Control latency buckets, seconds: from a fake-verbs answer (tens of microseconds) to a slow rxe CREATE_QP. */
export const CONTROL_LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
const QUEUE_NAMES = ['control', 'event', 'doorbell'];
/**
 * Per-QP series exported per VM. QPs are the one label that grows with the guest (tens of thousands per VM are
 * allowed): past this many, the QPs with the highest handles are left out of the per-QP families (counted in
 * vrdma_qp_series_omitted); the device-wide families still count them. Series of destroyed QPs go at the next
 * scrape (the values are read from the live QPs only).
 */
export const MAX_QP_SERIES_PER_VM = 256;

/** One served device, as the metrics see it. */
export interface ObservedDevice {
  device: RdmaDevice;
  vpc: string;
  /** The queues of the current activation (the wrapper's). */
  queues: () => readonly (DeviceQueue | undefined)[];
  server: { counters: SessionCounters; connectionsServed: number };
  recorder?: { recorded: number; dumps: number };
}

export interface MetricsSources {
  devices: () => readonly ObservedDevice[];
  vpc?: VpcBackend;
}

/** A counter whose value is read from `read` at each scrape (it is already counted elsewhere). */
function readCounter<L extends string>(registry: Registry, name: string, help: string, labelNames: readonly L[], read: (set: (labels: Record<L, string>, v: number) => void) => void): void {
  new Counter<L>({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      read((labels, v) => {
        if (v > 0) this.inc(labels, v);
        else this.inc(labels, 0);
      });
    },
  });
}

function readGauge<L extends string>(registry: Registry, name: string, help: string, labelNames: readonly L[], read: (set: (labels: Record<L, string>, v: number) => void) => void): void {
  new Gauge<L>({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      read((labels, v) => this.set(labels, v));
    },
  });
}

export class BackendMetrics {
  readonly registry = new Registry();
  private readonly latency: Histogram<'vm' | 'command' | 'status'>;

  constructor(private readonly sources: MetricsSources) {
    const r = this.registry;
    collectDefaultMetrics({ register: r, prefix: 'vrdma_' });
    this.latency = new Histogram({
      name: 'vrdma_control_request_duration_seconds',
      help: 'Control requests from pop to answer, by command and status',
      labelNames: ['vm', 'command', 'status'],
      buckets: CONTROL_LATENCY_BUCKETS,
      registers: [r],
    });
    const devs = () => this.sources.devices();
    readCounter(r, 'vrdma_control_requests_total', 'Control requests answered, by command (device counters)', ['vm', 'command'], (set) => {
      for (const d of devs()) for (const [command, n] of Object.entries(d.device.counters.commands)) set({ vm: d.device.vmId, command }, n);
    });
    readCounter(r, 'vrdma_control_errors_total', 'Control requests refused, by command and status (spec 7.8)', ['vm', 'command', 'status'], (set) => {
      for (const d of devs())
        for (const [key, n] of Object.entries(d.device.counters.errors)) {
          const [command = key, status = ''] = key.split(':');
          set({ vm: d.device.vmId, command, status }, n);
        }
    });
    const deviceCounter = (name: string, help: string, pick: (d: RdmaDevice) => number) =>
      readCounter(r, name, help, ['vm'], (set) => {
        for (const d of devs()) set({ vm: d.device.vmId }, pick(d.device));
      });
    deviceCounter('vrdma_completions_written_total', 'Completions written into guest CQ rings (relay data path)', (d) => d.counters.completionsWritten);
    deviceCounter('vrdma_events_written_total', 'Events written to the event queue', (d) => d.counters.eventsWritten);
    deviceCounter('vrdma_doorbell_errors_total', 'Doorbell records refused', (d) => d.counters.doorbellErrors);
    deviceCounter('vrdma_host_errors_total', 'Host verbs errors the device mapped to a status', (d) => d.counters.hostErrors);
    deviceCounter('vrdma_fatal_errors_total', 'Fatal framing errors (NEEDS_RESET)', (d) => d.counters.fatal);
    deviceCounter('vrdma_policy_teardowns_total', 'Connections of the VM torn down by the policy (QPs to ERR, AHs revoked)', (d) => d.counters.policyTeardowns);
    readGauge(r, 'vrdma_resources', 'Host objects the VM holds, by kind', ['vm', 'kind'], (set) => {
      for (const d of devs()) {
        const x = d.device;
        for (const [kind, n] of [['pd', x.pds.size], ['cq', x.cqs.size], ['qp', x.qps.size], ['mr', x.mrs.size], ['ah', x.ahs.size]] as const) set({ vm: x.vmId, kind }, n);
      }
    });
    readGauge(r, 'vrdma_registered_bytes', 'Bytes the VM has registered (MR_BYTES quota use)', ['vm'], (set) => {
      for (const d of devs()) set({ vm: d.device.vmId }, Number(d.device.mrBytes));
    });
    readGauge(r, 'vrdma_queue_in_flight', 'Chains popped and not yet returned, by queue (doorbell and event queue depth)', ['vm', 'queue'], (set) => {
      for (const d of devs()) d.queues().forEach((q, i) => q !== undefined && set({ vm: d.device.vmId, queue: QUEUE_NAMES[i] ?? String(i) }, q.inFlight));
    });
    readGauge(r, 'vrdma_queue_broken', '1 when the queue was broken by a driver error (NEEDS_RESET)', ['vm', 'queue'], (set) => {
      for (const d of devs()) d.queues().forEach((q, i) => q !== undefined && set({ vm: d.device.vmId, queue: QUEUE_NAMES[i] ?? String(i) }, q.broken === undefined ? 0 : 1));
    });
    deviceCounter('vrdma_queue_map_failures_total', 'Host queue mappings (spec 13) the VMM refused', (d) => d.counters.mapFailures);
    deviceCounter('vrdma_queue_unmap_failures_total', 'Host queue unmappings (spec 13) not confirmed by the VMM', (d) => d.counters.unmapFailures);
    deviceCounter('vrdma_queues_mapped_total', 'Host queues (spec 13) mapped into the guest', (d) => d.counters.queuesMapped);
    // The data path per QP (RdmaDevice.qpCounters), bounded: at most MAX_QP_SERIES_PER_VM QPs per VM, lowest handles first.
    const perQp = () =>
      devs().map((d) => {
        const all = d.device.qpCounters().sort((a, b) => a.handle - b.handle);
        return { vm: d.device.vmId, shown: all.slice(0, MAX_QP_SERIES_PER_VM), omitted: Math.max(0, all.length - MAX_QP_SERIES_PER_VM) };
      });
    readCounter(r, 'vrdma_qp_relayed_work_requests_total', 'Work requests the relay handled, per QP (handle)', ['vm', 'qp'], (set) => {
      for (const v of perQp()) for (const q of v.shown) set({ vm: v.vm, qp: String(q.handle) }, q.relayedWorkRequests);
    });
    readCounter(r, 'vrdma_qp_doorbells_total', 'Doorbells of a mapped QP the engine executed or the host refused, per QP (handle)', ['vm', 'qp', 'result'], (set) => {
      for (const v of perQp())
        for (const q of v.shown) {
          set({ vm: v.vm, qp: String(q.handle), result: 'executed' }, Number(q.doorbellsExecuted));
          set({ vm: v.vm, qp: String(q.handle), result: 'refused' }, Number(q.doorbellsRefused));
        }
    });
    readGauge(r, 'vrdma_qp_series_omitted', `Live QPs left out of the per-QP families (more than ${MAX_QP_SERIES_PER_VM} in the VM)`, ['vm'], (set) => {
      for (const v of perQp()) set({ vm: v.vm }, v.omitted);
    });
    const sessionCounter = (name: string, help: string, pick: (c: SessionCounters) => number) =>
      readCounter(r, name, help, ['vm'], (set) => {
        for (const d of devs()) set({ vm: d.device.vmId }, pick(d.server.counters));
      });
    sessionCounter('vrdma_vhost_user_messages_total', 'vhost-user messages handled', (c) => c.messages);
    sessionCounter('vrdma_kicks_total', 'Queue notifications (kicks) received', (c) => c.kicks);
    sessionCounter('vrdma_dropped_kicks_total', 'Kicks for a stopped, disabled or broken ring', (c) => c.droppedKicks);
    sessionCounter('vrdma_interrupts_total', 'Used-buffer notifications sent', (c) => c.interrupts);
    readCounter(r, 'vrdma_vhost_user_bad_messages_total', 'vhost-user messages refused, by kind', ['vm', 'kind'], (set) => {
      for (const d of devs()) for (const [kind, n] of Object.entries(d.server.counters.badMessages)) set({ vm: d.device.vmId, kind }, n);
    });
    readCounter(r, 'vrdma_vhost_user_connections_total', 'Front-end connections served', ['vm'], (set) => {
      for (const d of devs()) set({ vm: d.device.vmId }, d.server.connectionsServed);
    });
    readCounter(r, 'vrdma_flight_recorder_events_total', 'Events the flight recorder saw', ['vm'], (set) => {
      for (const d of devs()) if (d.recorder !== undefined) set({ vm: d.device.vmId }, d.recorder.recorded);
    });
    readCounter(r, 'vrdma_flight_recorder_dumps_total', 'Flight recorder dumps written', ['vm'], (set) => {
      for (const d of devs()) if (d.recorder !== undefined) set({ vm: d.device.vmId }, d.recorder.dumps);
    });
    if (sources.vpc !== undefined) this.vpcMetrics(sources.vpc);
  }

  /** The status view's counters, per VM and per VPC, and the control plane. */
  private vpcMetrics(vpc: VpcBackend): void {
    const r = this.registry;
    const emit = (set: (labels: Record<string, string>, v: number) => void, base: Record<string, string>, c: VpcCounters) => {
      for (const outcome of ['allowed', 'unreachable', 'unknownDestination', 'otherVpc', 'refusedByRule', 'tornDown'] as const) set({ ...base, outcome }, c[outcome]);
    };
    readCounter(r, 'vrdma_vm_connections_total', 'Connection checks of the VM by outcome (status view counters)', ['vm', 'vpc', 'outcome'], (set) => {
      for (const v of vpc.status().vms) emit(set as never, { vm: v.vm, vpc: v.vpc }, v.counters);
    });
    readCounter(r, 'vrdma_vm_quota_hits_total', 'Requests refused by a quota of the VM, by quota', ['vm', 'vpc', 'quota'], (set) => {
      for (const v of vpc.status().vms) for (const [quota, n] of Object.entries(v.counters.quotaHits)) set({ vm: v.vm, vpc: v.vpc, quota }, n);
    });
    readCounter(r, 'vrdma_vpc_connections_total', 'Connection checks in the VPC by outcome (status view counters)', ['vpc', 'outcome'], (set) => {
      for (const [name, c] of Object.entries(vpc.status().vpcs)) emit(set as never, { vpc: name }, c);
    });
    readCounter(r, 'vrdma_vpc_quota_hits_total', 'Requests refused by a quota in the VPC, by quota', ['vpc', 'quota'], (set) => {
      for (const [name, c] of Object.entries(vpc.status().vpcs)) for (const [quota, n] of Object.entries(c.quotaHits)) set({ vpc: name, quota }, n);
    });
    readGauge(r, 'vrdma_vm_quota', 'Quota limits and use of the VM', ['vm', 'quota', 'of'], (set) => {
      for (const v of vpc.status().vms)
        for (const [quota, q] of Object.entries(v.quotas)) {
          set({ vm: v.vm, quota, of: 'limit' }, q.limit);
          set({ vm: v.vm, quota, of: 'used' }, q.used);
        }
    });
    readGauge(r, 'vrdma_vm_connections', 'Live connections of the VM', ['vm', 'vpc'], (set) => {
      for (const v of vpc.status().vms) set({ vm: v.vm, vpc: v.vpc }, v.connections.length);
    });
    readGauge(r, 'vrdma_policy_version', 'Version of the policy in force', [], (set) => set({}, vpc.engine.metrics.policyVersion));
    readCounter(r, 'vrdma_policy_reloads_total', 'Policy documents applied', [], (set) => set({}, vpc.engine.metrics.applied));
    readCounter(r, 'vrdma_policy_rejected_total', 'Policy documents refused (the previous one stays in force)', [], (set) =>
      set({}, vpc.etcd?.metrics.rejected ?? vpc.file?.metrics.rejected ?? 0),
    );
    readCounter(r, 'vrdma_policy_teardown_changes_total', 'Policy changes whose teardowns were timed', [], (set) => set({}, vpc.engine.metrics.teardownLatenciesMs.length));
    readGauge(r, 'vrdma_policy_teardown_seconds', 'Teardown latency of policy changes (last and max)', ['of'], (set) => {
      set({ of: 'last' }, vpc.engine.metrics.lastTeardownLatencyMs / 1000);
      set({ of: 'max' }, vpc.engine.metrics.maxTeardownLatencyMs / 1000);
    });
    if (vpc.etcd !== undefined) {
      const e = vpc.etcd;
      readGauge(r, 'vrdma_etcd_connected', '1 while an etcd member answers', [], (set) => set({}, e.metrics.connected ? 1 : 0));
      readGauge(r, 'vrdma_etcd_revision', 'etcd revision of the state last read, and of the state in force', ['of'], (set) => {
        set({ of: 'read' }, e.metrics.revision);
        set({ of: 'applied' }, e.metrics.appliedRevision);
      });
      readCounter(r, 'vrdma_etcd_disconnects_total', 'Times every etcd member became unreachable', [], (set) => set({}, e.metrics.disconnects));
      readCounter(r, 'vrdma_etcd_catch_ups_total', 'Re-reads after etcd came back', [], (set) => set({}, e.metrics.catchUps));
    }
  }

  /** The wrapper's callback for one answered control request. */
  observeControl(vm: string, a: ControlAnswer): void {
    this.latency.observe({ vm, command: a.command, status: a.status }, a.seconds);
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
