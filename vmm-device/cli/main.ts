// `vrdma-backend`: the user-facing backend command. It opens the host RDMA device through NativeVerbs, builds the
// virtio-rdma device model for one VM, and serves it to QEMU over a vhost-user socket:
//
//   npx vrdma-backend --socket /run/vrdma/vm0.sock --device rxe0 [--vm-id vm0] [--gid-table FILE | --virtual-ip IP]
//   npx vrdma-backend --socket S --device rxe0 --vm-id a1 --host-id host-1 --vpc-policy FILE | --vpc-etcd URLS
//   npx vrdma-backend status --status-socket PATH [--vm ID]
//
// Flags are validated with zod before anything is opened, and every error names the flag it is about. With
// --vpc-policy or --vpc-etcd the VPC layer (vmm-device/vpc/) gives the VM its address, quotas and QoS, checks every
// connection, and tears down connections a policy change makes illegal; --status-socket serves the operator's view.

import { parseArgs } from 'node:util';
import { existsSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { createLogger, type LogLevel } from '../util/log.ts';
import type { HostVerbs } from '../verbs/host-verbs.ts';
import { NO_RDMA_DEVICE_HINT } from '../verbs/native-verbs.ts';
import { RdmaDevice, pickHostGidIndex } from '../rdma/rdma-device.ts';
import { StaticAddressResolver, ipv4FromGid, type AddressResolver } from '../rdma/address-resolver.ts';
import type { DeviceQuotas } from '../rdma/limits.ts';
import { DirQpRegistry } from '../rdma/qp-registry-dir.ts';
import type { HostReservation } from '../rdma/admission-ledger.ts';
import { admitVm, checkMappingCeiling, hostAttrOf } from './admission.ts';
import { DEFAULT_ETCD_PREFIX, VpcBackend, type ControlPlaneSpec } from '../vpc/backend.ts';
import { queryStatus, serveStatus, type StatusServer } from './status.ts';
import { OBSERVE_OPTIONS, OBSERVE_USAGE, addressTableOf, observeFlagShape, refineObserveFlags, startObservability, type Observability } from './observe.ts';

export const USAGE = `usage: vrdma-backend --socket PATH --device NAME [options]
       vrdma-backend status --status-socket PATH [--vm ID]

Serves a virtio-rdma device (virtio ID 42) to QEMU over a vhost-user socket, performing the guest's verbs on the
host RDMA device NAME.

  --socket PATH        vhost-user socket to listen on (its folder must exist)
  --transport KIND     vhost-user (default: QEMU with the project's edits) or vfio-user (any QEMU >= 10.1,
                       unmodified: -device vfio-user-pci,socket=PATH; the whole PCI function is served here)
  --device NAME        host RDMA device, e.g. rxe0
  --vm-id ID           this VM's id in the address table or the VPC policy (default without VPC: vm0)
  --log-level LEVEL    debug, info, warn or error (default: info)
  --host-dir DIR       the directory the backends of this host share: wire QPN ownership (every RC connection
                       is checked against it) and the host's quota ledger (default: ${defaultHostDir()})
  --host-queue-mapping MODE
                       polled (default), notify or off: offer HOST_QUEUE_MAPPING (spec section 13: RC QPs' host queues
                       mapped into the guest, doorbells executed by a native thread) when the host device has a
                       mappable queue format and the VMM can map shared memory; polled: the thread watches the
                       doorbell slots; notify: the guest kicks mapdoorbellq (queue 2 + N) after a store
  --max-mapped-queues N
                       mapped queues the guest may hold at once (each CQ 1, each QP 2; default 3072); the shared
                       memory region is sized for N queues of the largest depth
  --help               this text

Address from a static table (no VPC policy):
  --gid-table FILE     JSON address table {"vms":[{vmId, vpc, virtualIp, hostIp, mac?, trafficClass?}]}
  --virtual-ip IP      without --gid-table: the VM's virtual IPv4 address (its GID ::ffff:IP)
  --vpc NAME           without --gid-table: the VM's VPC (default: default)
  --max-qp N, --max-cq N, --max-mr N, --max-mr-mib N
                       per-VM quotas (defaults: 1024 QPs, 1024 CQs, 4096 MRs, 4096 MiB registered). QPs and CQs
                       are also bounded by the mappings one process may hold (vm.max_map_count: 2 per QP, 1 per
                       CQ, 1 per MR, 8192 kept for the backend): about 17,700 QPs each with its CQ at the default 65530;
                       a quota above that is refused at start

VPC policy (vmm-device/vpc/README.md): address, quotas and QoS from the policy, every connection checked, live
connections torn down (QP_POLICY_TEARDOWN) when a change makes them illegal. Excludes the four flags above.
  --vpc-policy FILE    control plane 1: a local JSON policy document, reloaded when it changes
  --vpc-etcd URLS      control plane 2: etcd members, http://host:port[,http://host:port...] (v3 JSON gateway);
                       while none answers the last known policy stays enforced (log: etcd unreachable)
  --vpc-prefix PREFIX  with --vpc-etcd: the policy's key prefix, ending in / (default: ${DEFAULT_ETCD_PREFIX})
  --host-id ID         required with a VPC policy: this host's id in its "hosts"
  --vm-id ID           required with a VPC policy
  --status-socket PATH serve the operator's view (JSON) on this Unix socket (mode 0600; without a VPC policy the
                       device's counters only)

${OBSERVE_USAGE}

Operator's view: vrdma-backend status --status-socket PATH [--vm ID] prints, as JSON: the policy version and its
source, the control plane (etcd: connected, revision, disconnects, catch-ups), teardown latency, what QoS is
enforced (the traffic class; no rate limit on rxe), and per VM its address, quotas with use, QPs with their
virtual peers and states, connections, counters (allowed, unreachable, refusedByRule, tornDown, quotaHits),
and per VPC the same counters.

Without an RDMA device: ${NO_RDMA_DEVICE_HINT}. The project's test host: npm run rxe:run -- <command>.`;

/** Exit codes: 0 clean shutdown, 1 runtime failure, 2 usage error. */
export const EXIT_USAGE = 2;
export const EXIT_FAILURE = 1;

const positiveInt = (flag: string, max: number) =>
  z
    .string()
    .regex(/^\d+$/, `${flag} must be a positive integer`)
    .transform(Number)
    .refine((n) => n >= 1 && n <= max, `${flag} must be between 1 and ${max}`)
    .optional();

/** Endpoints of one etcd cluster a backend rotates through. */
export const MAX_ETCD_ENDPOINTS = 16;
/** sun_path holds 108 bytes with its terminating NUL. */
export const MAX_UNIX_SOCKET_PATH = 107;
/** --host-queue-mapping's default doorbell mode (why this one: native/src/verbs/doorbell.cc, spec 13.6). */
export const DEFAULT_HOST_QUEUE_MAPPING: 'polled' | 'notify' = 'polled';

const ipv4 = /^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}$/;

export const FlagsSchema = z
  .object({
    socket: z
      .string({ error: '--socket is required: the vhost-user socket path QEMU connects to' })
      .min(1, '--socket must not be empty')
      .refine((p) => existsSync(path.dirname(path.resolve(p))) && statSync(path.dirname(path.resolve(p))).isDirectory(), {
        message: '--socket: its folder does not exist',
      }),
    transport: z.enum(['vhost-user', 'vfio-user'], { error: '--transport must be vhost-user or vfio-user' }).default('vhost-user'),
    device: z
      .string({ error: '--device is required: the host RDMA device (e.g. rxe0)' })
      .regex(/^[A-Za-z0-9_.-]{1,64}$/, '--device must be an RDMA device name such as rxe0'),
    'vm-id': z.string().regex(/^[A-Za-z0-9_.:-]{1,128}$/, '--vm-id must be 1 to 128 letters, digits or _.:-').optional(),
    'gid-table': z
      .string()
      .refine((p) => existsSync(p), { message: '--gid-table: no such file' })
      .optional(),
    'virtual-ip': z.string().regex(ipv4, '--virtual-ip must be an IPv4 address a.b.c.d').optional(),
    vpc: z.string().regex(/^[A-Za-z0-9_.-]{1,128}$/, '--vpc must be 1 to 128 letters, digits or _.-').optional(),
    'vpc-policy': z
      .string()
      .refine((p) => existsSync(p) && statSync(p).isFile(), { message: '--vpc-policy: no such file' })
      .optional(),
    'vpc-etcd': z
      .string()
      .transform((s) => s.split(','))
      .pipe(
        z
          .array(z.string().regex(/^https?:\/\/[A-Za-z0-9.[\]:-]+:\d{1,5}$/, '--vpc-etcd: each endpoint must be http://host:port'))
          .min(1)
          .max(MAX_ETCD_ENDPOINTS, `--vpc-etcd: at most ${MAX_ETCD_ENDPOINTS} endpoints`),
      )
      .optional(),
    'vpc-prefix': z
      .string()
      .regex(/^\/[\x21-\x7e]{0,254}\/$/, '--vpc-prefix must start and end with / (printable characters, at most 256)')
      .optional(),
    'host-id': z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, '--host-id must be 1 to 128 letters, digits or ._- (as in the policy)').optional(),
    'status-socket': z
      .string()
      .min(1, '--status-socket must not be empty')
      .max(MAX_UNIX_SOCKET_PATH, `--status-socket: at most ${MAX_UNIX_SOCKET_PATH} bytes (a Unix socket path)`)
      .refine((p) => existsSync(path.dirname(path.resolve(p))), { message: '--status-socket: its folder does not exist' })
      .optional(),
    'max-qp': positiveInt('--max-qp', 1 << 24),
    'max-cq': positiveInt('--max-cq', 1 << 24),
    'max-mr': positiveInt('--max-mr', 1 << 24),
    'max-mr-mib': positiveInt('--max-mr-mib', 1 << 30),
    'host-dir': z.string().min(1, '--host-dir must not be empty').optional(),
    'log-level': z.enum(['debug', 'info', 'warn', 'error'], { error: '--log-level must be debug, info, warn or error' }).default('info'),
    'host-queue-mapping': z.enum(['polled', 'notify', 'off'], { error: '--host-queue-mapping must be polled, notify or off' }).default(DEFAULT_HOST_QUEUE_MAPPING),
    'max-mapped-queues': positiveInt('--max-mapped-queues', 0xffff_ffff),
    ...observeFlagShape,
  })
  .strict()
  .superRefine((f, ctx) => {
    const issue = (message: string, flag: string) => ctx.addIssue({ code: 'custom', message, path: [flag] });
    const vpcFlag = f['vpc-policy'] !== undefined ? '--vpc-policy' : f['vpc-etcd'] !== undefined ? '--vpc-etcd' : undefined;
    if (f['vpc-policy'] !== undefined && f['vpc-etcd'] !== undefined) {
      issue('--vpc-policy and --vpc-etcd exclude each other (one control plane)', 'vpc-policy');
    }
    if (vpcFlag !== undefined) {
      for (const flag of ['gid-table', 'virtual-ip', 'vpc', 'max-qp', 'max-cq', 'max-mr', 'max-mr-mib'] as const) {
        if (f[flag] !== undefined) issue(`--${flag} and ${vpcFlag} exclude each other (the VPC policy gives the address and quotas)`, flag);
      }
      if (f['host-id'] === undefined) issue(`--host-id is required with ${vpcFlag}: this host's id in the policy`, 'host-id');
      if (f['vm-id'] === undefined) issue(`--vm-id is required with ${vpcFlag}: the VM's id in the policy`, 'vm-id');
      if (f['vpc-prefix'] !== undefined && f['vpc-etcd'] === undefined) issue('--vpc-prefix needs --vpc-etcd', 'vpc-prefix');
      return;
    }
    for (const flag of ['host-id', 'vpc-prefix'] as const) {
      if (f[flag] !== undefined) issue(`--${flag} needs --vpc-policy or --vpc-etcd`, flag);
    }
    if (f['gid-table'] === undefined && f['virtual-ip'] === undefined) {
      issue('--virtual-ip or --gid-table is required: the VM needs a virtual address (or use --vpc-policy / --vpc-etcd)', 'virtual-ip');
    }
    if (f['gid-table'] !== undefined && f['virtual-ip'] !== undefined) {
      issue('--virtual-ip and --gid-table exclude each other (the table holds the address)', 'virtual-ip');
    }
  })
  .superRefine((f, ctx) => refineObserveFlags(f, (message, flag) => ctx.addIssue({ code: 'custom', message, path: [flag] })));

export type Flags = z.infer<typeof FlagsSchema>;

/** Without a VPC policy: the VM's id and VPC when the flags do not say. */
export const DEFAULT_VM_ID = 'vm0';
export const DEFAULT_STATIC_VPC = 'default';

/** The control plane the flags name, if any. */
export function controlPlaneOf(f: Flags): ControlPlaneSpec | undefined {
  if (f['vpc-policy'] !== undefined) return { kind: 'file', path: path.resolve(f['vpc-policy']) };
  if (f['vpc-etcd'] !== undefined) return { kind: 'etcd', endpoints: f['vpc-etcd'], prefix: f['vpc-prefix'] ?? DEFAULT_ETCD_PREFIX };
  return undefined;
}

/** Where the backends of one host meet (QPN registry, quota ledger): /run/vrdma for root, else per user in tmp. */
export function defaultHostDir(): string {
  return process.getuid?.() === 0 ? '/run/vrdma/host' : path.join(os.tmpdir(), `vrdma-host-${process.getuid?.() ?? 0}`);
}

export class UsageError extends Error {}

/** Parses argv into validated flags; UsageError names the flag. `help` when --help was given. */
export function parseFlags(argv: readonly string[]): Flags | 'help' {
  let values: Record<string, unknown>;
  try {
    const parsed = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        socket: { type: 'string' },
        transport: { type: 'string' },
        device: { type: 'string' },
        'vm-id': { type: 'string' },
        'gid-table': { type: 'string' },
        'virtual-ip': { type: 'string' },
        vpc: { type: 'string' },
        'max-qp': { type: 'string' },
        'max-cq': { type: 'string' },
        'max-mr': { type: 'string' },
        'max-mr-mib': { type: 'string' },
        'log-level': { type: 'string' },
        'vpc-policy': { type: 'string' },
        'vpc-etcd': { type: 'string' },
        'vpc-prefix': { type: 'string' },
        'host-id': { type: 'string' },
        'status-socket': { type: 'string' },
        'host-dir': { type: 'string' },
        'host-queue-mapping': { type: 'string' },
        'max-mapped-queues': { type: 'string' },
        help: { type: 'boolean' },
        ...OBSERVE_OPTIONS,
      },
    });
    values = parsed.values as Record<string, unknown>;
  } catch (e) {
    // node:util names the flag: "Unknown option '--sockt'", "Option '--socket <value>' argument missing".
    throw new UsageError((e as Error).message);
  }
  if (values['help'] === true) return 'help';
  delete values['help'];
  const r = FlagsSchema.safeParse(values);
  if (!r.success) throw new UsageError(r.error.issues.map((i) => i.message).join('; '));
  return r.data;
}

export function quotasOf(f: Flags): Partial<DeviceQuotas> {
  const q: Partial<DeviceQuotas> = {};
  if (f['max-qp'] !== undefined) q.maxQp = f['max-qp'];
  if (f['max-cq'] !== undefined) q.maxCq = f['max-cq'];
  if (f['max-mr'] !== undefined) q.maxMr = f['max-mr'];
  if (f['max-mr-mib'] !== undefined) q.maxMrBytes = BigInt(f['max-mr-mib']) << 20n;
  return q;
}

/** The host device must exist before anything is served: say how to get one when it does not. */
export function checkHostDevice(verbs: HostVerbs, name: string): void {
  const names = verbs.listDevices().map((d) => d.name);
  if (!names.includes(name)) {
    throw new Error(
      `--device ${name}: no such RDMA device on this host (devices: ${names.join(', ') || 'none'}). ` +
        `Create one with \`rdma link add ${name} type rxe netdev <if>\`, or run inside the project's test host: ` +
        '`npm run rxe:run -- <command>`',
    );
  }
}

/** The address table: the file, or one entry built from --virtual-ip and the host device's own IPv4 GID. */
export async function buildResolver(verbs: HostVerbs, f: Flags): Promise<StaticAddressResolver> {
  const vmId = f['vm-id'] ?? DEFAULT_VM_ID;
  if (f['gid-table'] !== undefined) {
    const r = StaticAddressResolver.fromFile(f['gid-table']);
    if (r.ownAddress(vmId) === undefined) throw new Error(`--vm-id ${vmId}: not in --gid-table ${f['gid-table']}`);
    return r;
  }
  const dev = await verbs.openDevice(f.device);
  try {
    const table = await verbs.queryGidTable(dev);
    const gid = table.find((g) => g.index === pickHostGidIndex(table, f.device))!.gid;
    const hostIp = ipv4FromGid(gid);
    if (hostIp === undefined) throw new Error(`--device ${f.device}: its RoCE v2 GID is not an IPv4 address; use --gid-table`);
    return new StaticAddressResolver([{ vmId, vpc: f.vpc ?? DEFAULT_STATIC_VPC, virtualIp: f['virtual-ip']!, hostIp }]);
  } finally {
    await verbs.closeDevice(dev);
  }
}

/** The static table checks RC connections against the host directory's QPN registry (issue 12 item 1). */
export function useHostQpRegistry(table: StaticAddressResolver, vmId: string, hostDir: string): void {
  let registry: DirQpRegistry;
  try {
    registry = new DirQpRegistry(hostDir);
  } catch (e) {
    throw new Error(`--host-dir ${hostDir}: cannot use it (${(e as Error).message})`);
  }
  const own = table.ownAddress(vmId) === undefined ? undefined : table.hostKeyOf(vmId);
  if (own !== undefined) {
    registry.announceHost(own);
    registry.clearVm(own, vmId);
  }
  table.useQpRegistry(registry);
}

export interface RunIo {
  out: (s: string) => void;
  err: (s: string) => void;
  /** The host verbs (tests pass a double); NativeVerbs by default, loaded only once the flags are valid. */
  verbs?: () => Promise<HostVerbs>;
  /** Called once the device is served (tests look at what the flags built). */
  onServing?: (served: { device: RdmaDevice; vpc: VpcBackend | undefined }) => void;
}

export const STATUS_USAGE = `usage: vrdma-backend status --status-socket PATH [--vm ID | --dump]

--dump: the backend writes its flight recorder's last events as a session fixture and prints the file's path.

Prints the operator's view a running backend serves on --status-socket (JSON): the policy in force and its control
plane, teardown latency, QoS enforcement, and per VM and per VPC the counters, resources and connections.`;

/** `vrdma-backend status ...`: asks a backend's status socket and prints the answer. */
export async function runStatus(argv: readonly string[], io: RunIo): Promise<number> {
  let values: { 'status-socket'?: string; vm?: string; dump?: boolean; help?: boolean };
  try {
    values = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: { 'status-socket': { type: 'string' }, vm: { type: 'string' }, dump: { type: 'boolean' }, help: { type: 'boolean' } },
    }).values;
  } catch (e) {
    io.err(`vrdma-backend status: ${(e as Error).message}\n(see --help)\n`);
    return EXIT_USAGE;
  }
  if (values.help === true) {
    io.out(STATUS_USAGE + '\n');
    return 0;
  }
  const sock = values['status-socket'];
  if (sock === undefined || sock === '') {
    io.err('vrdma-backend status: --status-socket is required: the socket the backend serves its view on\n');
    return EXIT_USAGE;
  }
  if (values.vm !== undefined && !/^[A-Za-z0-9_.:-]{1,128}$/.test(values.vm)) {
    io.err('vrdma-backend status: --vm must be 1 to 128 letters, digits or _.:-\n');
    return EXIT_USAGE;
  }
  try {
    if (values.dump === true && values.vm !== undefined) {
      io.err('vrdma-backend status: --dump and --vm exclude each other (the dump is the whole device)\n');
      return EXIT_USAGE;
    }
    const answer = await queryStatus(sock, values.vm, undefined, values.dump === true);
    io.out(JSON.stringify(answer, null, 2) + '\n');
    if (answer !== null && typeof answer === 'object' && 'error' in answer) return EXIT_FAILURE;
    if (values.vm !== undefined && (answer as { vms?: unknown[] }).vms?.length === 0) {
      io.err(`vrdma-backend status: --vm ${values.vm}: not in this backend's policy\n`);
      return EXIT_FAILURE;
    }
    return 0;
  } catch (e) {
    io.err(`vrdma-backend status: ${(e as Error).message}\n`);
    return EXIT_FAILURE;
  }
}

/** Runs the backend until SIGINT/SIGTERM; returns the exit code. */
export async function run(argv: readonly string[], io: RunIo = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) }): Promise<number> {
  if (argv[0] === 'status') return runStatus(argv.slice(1), io);
  let flags: Flags | 'help';
  try {
    flags = parseFlags(argv);
  } catch (e) {
    io.err(`vrdma-backend: ${(e as Error).message}\n(see --help)\n`);
    return EXIT_USAGE;
  }
  if (flags === 'help') {
    io.out(USAGE + '\n');
    return 0;
  }
  const log = createLogger('vrdma-backend', { level: flags['log-level'] as LogLevel, format: flags['log-format'] });
  // Signals are caught from the start: a backend still waiting for etcd must stop cleanly too.
  const stopping = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    log.log('info', 'shutting down', { signal: sig });
    stopping.abort();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const stopped = new Promise<void>((resolve) => stopping.signal.addEventListener('abort', () => resolve(), { once: true }));
  let device: RdmaDevice | undefined;
  let vpc: VpcBackend | undefined;
  let status: StatusServer | undefined;
  let detach: (() => void) | undefined;
  let observe: Observability | undefined;
  let reservation: HostReservation | undefined; // this VM's share of the host device
  try {
    const vmId = flags['vm-id'] ?? DEFAULT_VM_ID;
    const verbs = io.verbs !== undefined ? await io.verbs() : new (await import('../verbs/native-verbs.ts')).NativeVerbs();
    checkHostDevice(verbs, flags.device);
    const controlPlane = controlPlaneOf(flags);
    let resolver: AddressResolver;
    let quotas: Partial<DeviceQuotas>;
    let deviceLog = log.child('device');
    // [tenancy] The QPN registry and the quota ledger of this host. A verbs double (tests) is no device shared with
    // other processes: it gets them only when --host-dir asks.
    const hostDir = flags['host-dir'] ?? (io.verbs === undefined ? defaultHostDir() : undefined);
    if (controlPlane !== undefined) {
      vpc = await VpcBackend.start({ controlPlane, hostId: flags['host-id']!, log: log.child('vpc'), signal: stopping.signal, ...(hostDir === undefined ? {} : { hostDir }) });
      quotas = vpc.deviceQuotasOf(vmId);
      resolver = vpc.resolver;
      deviceLog = vpc.deviceLogger(vmId, deviceLog);
      vpc.prepareVm(vmId);
    } else {
      const table = await buildResolver(verbs, flags);
      quotas = quotasOf(flags);
      if (hostDir !== undefined) useHostQpRegistry(table, vmId, hostDir);
      resolver = table;
    }
    const attr = await hostAttrOf(verbs, flags.device); // [tenancy] quotas this process and this host can honour
    checkMappingCeiling({ attr, quotas, policy: controlPlane !== undefined, vmId });
    if (hostDir !== undefined) reservation = await admitVm({ attr, device: flags.device, vmId, hostDir, quotas, policy: controlPlane !== undefined });
    const { nativeAliasMapper } = await import('../host/alias.ts');
    const { close: closeFd } = await import('../native/sys.ts'); // NOTIFY mode: the lent queue's call fd
    // The host's answers to the device's verbs go on a tape that every recording carries, so that a replay over the
    // test double answers with this host's QPNs, keys and attributes (observe/verbs-tape.ts). Control path only.
    const { RecordingVerbs, VerbsTape } = await import('../observe/verbs-tape.ts');
    const tape = new VerbsTape();
    device = await RdmaDevice.open({
      verbs: new RecordingVerbs(verbs, tape),
      hostDevice: flags.device,
      vmId,
      resolver,
      quotas,
      log: deviceLog,
      aliases: nativeAliasMapper,
      hostQueueMapping: flags['host-queue-mapping'],
      closeFd,
      ...(flags['max-mapped-queues'] !== undefined ? { maxMappedQueues: flags['max-mapped-queues'] } : {}),
    });
    if (vpc !== undefined) detach = vpc.attach(device);
    const vpcName = vpc?.engine.describeVm(vmId)?.vpc ?? flags.vpc ?? DEFAULT_STATIC_VPC;
    observe = await startObservability(flags, device, vpc, vpcName, log.child('observe'), {
      addressTable: addressTableOf(flags['gid-table'], resolver, vmId),
      quotas,
      tape,
      hostQueueMapping: flags['host-queue-mapping'],
      ...(flags['max-mapped-queues'] !== undefined ? { maxMappedQueues: flags['max-mapped-queues'] } : {}),
    });
    if (flags['status-socket'] !== undefined) {
      const backend = vpc;
      const dev = device;
      const obs = observe;
      const view = (vm: string | undefined) => (backend !== undefined ? backend.status(vm) : { vm: dev.vmId, pid: process.pid, counters: dev.counters });
      status = await serveStatus(flags['status-socket'], view, log.child('status'), (trigger) => obs.dump(trigger));
    }
    const { SysHost } = await import('../host/sys-host.ts');
    let server: { close(): void };
    if (flags.transport === 'vfio-user') {
      const { VfioUserServer } = await import('../transport/vfio-user/server.ts');
      const vfu = new VfioUserServer({ path: flags.socket, host: new SysHost(), model: observe.model, log: log.child('vfio-user') });
      vfu.listen();
      server = vfu;
    } else {
      const { VhostUserServer } = await import('../transport/vhost-user/server.ts');
      const vhu = new VhostUserServer({ path: flags.socket, host: new SysHost(), model: observe.model, log: log.child('vhost-user') });
      observe.attachServer(vhu);
      vhu.listen();
      server = vhu;
    }
    log.log('info', 'serving', {
      socket: flags.socket,
      transport: flags.transport,
      device: flags.device,
      vm: vmId,
      gid: Buffer.from(device.config.gid).toString('hex'),
      policy: controlPlane === undefined ? 'static table' : controlPlane.kind === 'file' ? `file ${controlPlane.path}` : `etcd ${controlPlane.endpoints.join(',')} ${controlPlane.prefix}`,
      ...(flags['status-socket'] === undefined ? {} : { statusSocket: flags['status-socket'] }),
      ...(observe.metricsServer === undefined ? {} : { metrics: `${observe.metricsServer.host}:${observe.metricsServer.port}` }),
    });
    io.onServing?.({ device, vpc });
    await stopped;
    server.close();
    await status?.close();
    await observe.close();
    detach?.();
    await device.close();
    reservation?.release();
    await vpc?.stop();
    return 0;
  } catch (e) {
    // A shutdown asked for while the backend still waited for its first policy is a clean exit.
    const asked = stopping.signal.aborted && device === undefined;
    if (!asked) io.err(`vrdma-backend: ${(e as Error).message}\n`);
    await status?.close().catch(() => undefined);
    await observe?.close().catch(() => undefined);
    detach?.();
    if (device !== undefined) await device.close().catch(() => undefined);
    reservation?.release();
    await vpc?.stop().catch(() => undefined);
    return asked ? 0 : EXIT_FAILURE;
  } finally {
    process.removeListener('SIGINT', onSignal);
    process.removeListener('SIGTERM', onSignal);
  }
}
