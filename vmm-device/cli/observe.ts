// The backend's observability flags and their wiring, kept out of main.ts: --log-format, --metrics (Prometheus
// exposition, loopback unless --metrics-allow-remote), the flight recorder (--flight-events, --dump-dir; dumps on
// NEEDS_RESET, SIGUSR1 and `status --dump`) and --record (the whole session, written at shutdown).

import { existsSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import type { Logger } from '../util/log.ts';
import type { RdmaDevice } from '../rdma/rdma-device.ts';
import { ipv4FromGid, type AddressResolver, type GidTableEntry } from '../rdma/address-resolver.ts';
import type { DeviceQuotas } from '../rdma/limits.ts';
import type { VirtioDeviceModel } from '../virtio/device.ts';
import type { VpcBackend } from '../vpc/backend.ts';
import { BackendMetrics } from '../observe/metrics.ts';
import { isLoopback, serveMetrics, type MetricsServer } from '../observe/http.ts';
import { observeModel } from '../observe/observed-model.ts';
import type { VerbsTape } from '../observe/verbs-tape.ts';
import { DEFAULT_FLIGHT_EVENTS, FlightRecorder, MAX_FLIGHT_EVENTS, NO_RECORDER, writeJsonAtomic } from '../observe/recorder.ts';
import type { SessionCounters } from '../transport/vhost-user/session.ts';
import type { WireEvent } from '../transport/vhost-user/connection.ts';
import { requestName, decodeHeader, HEADER_SIZE } from '../transport/vhost-user/messages.ts';

/** Dumps a backend writes on its own (NEEDS_RESET): a guest that breaks its device in a loop cannot fill the disk. */
export const MAX_AUTOMATIC_DUMPS = 16;
/** Shortest interval between two automatic dumps (a burst of broken queues is one incident). */
export const MIN_AUTOMATIC_DUMP_INTERVAL_MS = 1000;

/** parseArgs options of these flags (merged into main.ts's). */
export const OBSERVE_OPTIONS = {
  'log-format': { type: 'string' },
  metrics: { type: 'string' },
  'metrics-allow-remote': { type: 'boolean' },
  record: { type: 'string' },
  'flight-events': { type: 'string' },
  'dump-dir': { type: 'string' },
} as const;

const folderExists = (p: string) => existsSync(path.dirname(path.resolve(p))) && statSync(path.dirname(path.resolve(p))).isDirectory();

/** The zod fields (merged into main.ts's FlagsSchema); every message names its flag. */
export const observeFlagShape = {
  'log-format': z.enum(['json', 'human'], { error: '--log-format must be json or human' }).default('json'),
  metrics: z
    .string()
    .regex(/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, '--metrics must be HOST:PORT (an IPv6 host in brackets: [::1]:9464)')
    .transform((s) => {
      const at = s.lastIndexOf(':');
      return { host: s.slice(0, at), port: Number(s.slice(at + 1)) };
    })
    .refine((m) => m.port <= 65535, '--metrics: the port must be 0 to 65535')
    .optional(),
  'metrics-allow-remote': z.boolean().optional(),
  record: z.string().min(1, '--record must not be empty').refine(folderExists, { message: '--record: its folder does not exist' }).optional(),
  'flight-events': z
    .string()
    .regex(/^\d+$/, '--flight-events must be a whole number')
    .transform(Number)
    .refine((n) => n <= MAX_FLIGHT_EVENTS, `--flight-events: at most ${MAX_FLIGHT_EVENTS} (0 turns the recorder off)`)
    .optional(),
  'dump-dir': z
    .string()
    .refine((p) => existsSync(p) && statSync(p).isDirectory(), { message: '--dump-dir: no such folder' })
    .optional(),
};

type ObserveFlagValues = {
  metrics?: { host: string; port: number } | undefined;
  'metrics-allow-remote'?: boolean | undefined;
  record?: string | undefined;
};

/** Cross-field checks (a superRefine of main.ts's schema). */
export function refineObserveFlags(f: ObserveFlagValues, issue: (message: string, flag: string) => void): void {
  // zod runs this even when --metrics itself failed (its value is then still the string): judged only once parsed.
  if (typeof f.metrics === 'object' && !isLoopback(f.metrics.host) && f['metrics-allow-remote'] !== true) {
    issue(`--metrics ${f.metrics.host}: not a loopback address; the metrics name VMs and tenants (add --metrics-allow-remote to serve them there)`, 'metrics');
  }
  if (f['metrics-allow-remote'] === true && f.metrics === undefined) issue('--metrics-allow-remote needs --metrics', 'metrics-allow-remote');
}

export const OBSERVE_USAGE = `Observability:
  --log-format FORMAT  json (default: one JSON object per line: level, time, pid, component, msg, fields) or human
                       (level component: message key=value ...)
  --metrics HOST:PORT  serve Prometheus metrics on http://HOST:PORT/metrics (loopback only unless
                       --metrics-allow-remote)
  --flight-events N    events the flight recorder keeps (default ${DEFAULT_FLIGHT_EVENTS}; 0: off). Dumped as a session
                       fixture on NEEDS_RESET, on SIGUSR1 and on \`vrdma-backend status --dump\`
  --dump-dir DIR       where dumps go (default: the --socket folder)
  --record FILE        record the whole session; written to FILE at shutdown (replay: npm run fixture -- replay FILE)`;

export interface ObserveFlags {
  'log-format': 'json' | 'human';
  metrics?: { host: string; port: number } | undefined;
  record?: string | undefined;
  'flight-events'?: number | undefined;
  'dump-dir'?: string | undefined;
  socket: string;
  device: string;
}

/**
 * The address table a replay needs (recorded with the session): the --gid-table file's entries, or this VM's own
 * entry as the resolver gives it (with a VPC policy, the peers' entries are the policy's and are not recorded).
 */
export function addressTableOf(gidTable: string | undefined, resolver: AddressResolver, vmId: string): GidTableEntry[] {
  if (gidTable !== undefined) {
    try {
      return (JSON.parse(readFileSync(gidTable, 'utf8')) as { vms: GidTableEntry[] }).vms;
    } catch {
      // already validated when the resolver was built; a file changed since is recorded without a table
    }
  }
  const own = resolver.ownAddress(vmId);
  if (own === undefined) return [];
  // Not resolve(): that is a connection attempt, counted in the VM's and the VPC's counters.
  const hostGid = resolver.ownHostGid?.(vmId);
  const virtualIp = ipv4FromGid(own.gid);
  const hostIp = hostGid === undefined ? undefined : ipv4FromGid(hostGid);
  return virtualIp === undefined || hostIp === undefined ? [] : [{ vmId, vpc: own.vpc, virtualIp, hostIp }];
}

export interface Observability {
  /** What the vhost-user server serves (the device behind the recorder and the latency hooks). */
  model: VirtioDeviceModel;
  /** Give it the server once built: its counters and its wire tap. */
  attachServer(server: { counters: SessionCounters; connectionsServed: number; onWire: ((e: WireEvent) => void) | undefined }): void;
  /** Writes the flight recorder's window; the path, or undefined with the recorder off. */
  dump(trigger: string): string | undefined;
  metricsServer: MetricsServer | undefined;
  close(): Promise<void>;
}

/** Builds the recorder, the metrics and their endpoint around `device`. */
export async function startObservability(
  flags: ObserveFlags,
  device: RdmaDevice,
  vpc: VpcBackend | undefined,
  vpcName: string,
  log: Logger,
  replayContext: { addressTable: GidTableEntry[]; quotas: Partial<DeviceQuotas>; tape?: VerbsTape; hostQueueMapping?: string; maxMappedQueues?: number },
): Promise<Observability> {
  const capacity = flags['flight-events'] ?? DEFAULT_FLIGHT_EVENTS;
  const recorder =
    capacity > 0 || flags.record !== undefined
      ? new FlightRecorder({
          capacity: Math.max(1, capacity),
          recordAll: flags.record !== undefined,
          ...(replayContext.tape === undefined ? {} : { tape: replayContext.tape }),
          device: {
            vm: device.vmId,
            hostDevice: flags.device,
            deviceFeatures: `0x${device.deviceFeatures.toString(16)}`,
            queues: device.queueCount,
            // What a replay builds the same device from (vmm-device/observe/replay.ts).
            addressTable: replayContext.addressTable,
            quotas: Object.fromEntries(Object.entries(replayContext.quotas).map(([k, v]) => [k, typeof v === 'bigint' ? v.toString() : v])),
            ...(replayContext.hostQueueMapping === undefined ? {} : { hostQueueMapping: replayContext.hostQueueMapping }),
            ...(replayContext.maxMappedQueues === undefined ? {} : { maxMappedQueues: replayContext.maxMappedQueues }),
          },
        })
      : undefined;
  const dumpDir = flags['dump-dir'] ?? path.dirname(path.resolve(flags.socket));
  let dumpSeq = 0;
  let automatic = 0;
  let lastAutomatic = 0;
  const dump = (trigger: string): string | undefined => {
    if (recorder === undefined || capacity === 0) return undefined;
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    const file = path.join(dumpDir, `vrdma-${device.vmId}-${stamp}-${process.pid}-${dumpSeq++}.json`);
    try {
      recorder.dumpTo(file, trigger);
      log.log('warn', 'flight recorder dumped', { trigger, file });
      return file;
    } catch (e) {
      log.log('error', 'flight recorder dump failed', { trigger, file, error: (e as Error).message });
      return undefined;
    }
  };
  let metrics: BackendMetrics | undefined;
  let server: { counters: SessionCounters; connectionsServed: number } | undefined;
  const model = observeModel(device, {
    recorder: recorder ?? NO_RECORDER,
    onControlAnswer: (a) => metrics?.observeControl(device.vmId, a),
    onNeedsReset: (why) => {
      const now = Date.now();
      if (automatic >= MAX_AUTOMATIC_DUMPS || now - lastAutomatic < MIN_AUTOMATIC_DUMP_INTERVAL_MS) return;
      automatic++;
      lastAutomatic = now;
      dump(`NEEDS_RESET: ${why}`);
    },
  });
  let metricsServer: MetricsServer | undefined;
  if (flags.metrics !== undefined) {
    metrics = new BackendMetrics({
      devices: () =>
        server === undefined ? [] : [{ device, vpc: vpcName, queues: () => model.queues, server, ...(recorder !== undefined ? { recorder } : {}) }],
      ...(vpc !== undefined ? { vpc } : {}),
    });
    metricsServer = await serveMetrics(flags.metrics.host, flags.metrics.port, metrics, log.child('metrics'));
  }
  const onUsr1 = () => void dump('SIGUSR1');
  process.on('SIGUSR1', onUsr1);
  return {
    model,
    metricsServer,
    dump,
    attachServer(s) {
      server = s;
      if (recorder === undefined) return;
      s.onWire = (e) => {
        let request = 'message';
        try {
          if (e.bytes.length >= HEADER_SIZE) request = requestName(decodeHeader(e.bytes).request);
        } catch {
          // a header the session refuses: recorded by its bytes
        }
        recorder.record({ kind: 'message', dir: e.direction, request, hex: e.bytes, fdCount: e.fdCount });
      };
    },
    async close() {
      process.removeListener('SIGUSR1', onUsr1);
      await metricsServer?.close();
      if (flags.record !== undefined && recorder !== undefined) {
        const name = path.basename(flags.record).replace(/\.json$/, '');
        try {
          writeJsonAtomic(flags.record, recorder.session(name));
          log.log('info', 'session recorded', { file: flags.record, events: recorder.recorded });
        } catch (e) {
          log.log('error', 'session recording not written', { file: flags.record, error: (e as Error).message });
        }
      }
    },
  };
}
