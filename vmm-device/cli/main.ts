// `vrdma-backend`: the user-facing backend command. It opens the host RDMA device through NativeVerbs, builds the
// virtio-rdma device model for one VM, and serves it to QEMU over a vhost-user socket:
//
//   npx vrdma-backend --socket /run/vrdma/vm0.sock --device rxe0 [--vm-id vm0] [--gid-table FILE | --virtual-ip IP]
//
// Flags are validated with zod before anything is opened, and every error names the flag it is about.

import { parseArgs } from 'node:util';
import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { StderrLogger, type LogLevel } from '../util/log.ts';
import type { HostVerbs } from '../verbs/host-verbs.ts';
import { NO_RDMA_DEVICE_HINT } from '../verbs/native-verbs.ts';
import { RdmaDevice, pickHostGidIndex } from '../rdma/rdma-device.ts';
import { StaticAddressResolver, ipv4FromGid, type AddressResolver } from '../rdma/address-resolver.ts';
import type { DeviceQuotas } from '../rdma/limits.ts';

export const USAGE = `usage: vrdma-backend --socket PATH --device NAME [options]

Serves a virtio-rdma device (virtio ID 42) to QEMU over a vhost-user socket, performing the guest's verbs on the
host RDMA device NAME.

  --socket PATH        vhost-user socket to listen on (its folder must exist)
  --device NAME        host RDMA device, e.g. rxe0
  --vm-id ID           this VM's name in the address table (default: vm0)
  --gid-table FILE     JSON address table {"vms":[{vmId, vpc, virtualIp, hostIp, mac?, trafficClass?}]}
  --virtual-ip IP      without --gid-table: the VM's virtual IPv4 address (its GID ::ffff:IP)
  --vpc NAME           without --gid-table: the VM's VPC (default: default)
  --max-qp N, --max-cq N, --max-mr N, --max-mr-mib N
                       per-VM quotas (defaults: 1024 QPs, 1024 CQs, 4096 MRs, 4096 MiB registered)
  --log-level LEVEL    debug, info, warn or error (default: info)
  --help               this text

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

const ipv4 = /^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}$/;

export const FlagsSchema = z
  .object({
    socket: z
      .string({ error: '--socket is required: the vhost-user socket path QEMU connects to' })
      .min(1, '--socket must not be empty')
      .refine((p) => existsSync(path.dirname(path.resolve(p))) && statSync(path.dirname(path.resolve(p))).isDirectory(), {
        message: '--socket: its folder does not exist',
      }),
    device: z
      .string({ error: '--device is required: the host RDMA device (e.g. rxe0)' })
      .regex(/^[A-Za-z0-9_.-]{1,64}$/, '--device must be an RDMA device name such as rxe0'),
    'vm-id': z.string().regex(/^[A-Za-z0-9_.:-]{1,128}$/, '--vm-id must be 1 to 128 letters, digits or _.:-').default('vm0'),
    'gid-table': z
      .string()
      .refine((p) => existsSync(p), { message: '--gid-table: no such file' })
      .optional(),
    'virtual-ip': z.string().regex(ipv4, '--virtual-ip must be an IPv4 address a.b.c.d').optional(),
    vpc: z.string().regex(/^[A-Za-z0-9_.-]{1,128}$/, '--vpc must be 1 to 128 letters, digits or _.-').default('default'),
    'max-qp': positiveInt('--max-qp', 1 << 24),
    'max-cq': positiveInt('--max-cq', 1 << 24),
    'max-mr': positiveInt('--max-mr', 1 << 24),
    'max-mr-mib': positiveInt('--max-mr-mib', 1 << 30),
    'log-level': z.enum(['debug', 'info', 'warn', 'error'], { error: '--log-level must be debug, info, warn or error' }).default('info'),
  })
  .strict()
  .superRefine((f, ctx) => {
    if (f['gid-table'] === undefined && f['virtual-ip'] === undefined) {
      ctx.addIssue({ code: 'custom', message: '--virtual-ip or --gid-table is required: the VM needs a virtual address', path: ['virtual-ip'] });
    }
    if (f['gid-table'] !== undefined && f['virtual-ip'] !== undefined) {
      ctx.addIssue({ code: 'custom', message: '--virtual-ip and --gid-table exclude each other (the table holds the address)', path: ['virtual-ip'] });
    }
  });

export type Flags = z.infer<typeof FlagsSchema>;

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
        help: { type: 'boolean' },
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
export async function buildResolver(verbs: HostVerbs, f: Flags): Promise<AddressResolver> {
  if (f['gid-table'] !== undefined) {
    const r = StaticAddressResolver.fromFile(f['gid-table']);
    if (r.ownAddress(f['vm-id']) === undefined) throw new Error(`--vm-id ${f['vm-id']}: not in --gid-table ${f['gid-table']}`);
    return r;
  }
  const dev = await verbs.openDevice(f.device);
  try {
    const table = await verbs.queryGidTable(dev);
    const gid = table.find((g) => g.index === pickHostGidIndex(table, f.device))!.gid;
    const hostIp = ipv4FromGid(gid);
    if (hostIp === undefined) throw new Error(`--device ${f.device}: its RoCE v2 GID is not an IPv4 address; use --gid-table`);
    return new StaticAddressResolver([{ vmId: f['vm-id'], vpc: f.vpc, virtualIp: f['virtual-ip']!, hostIp }]);
  } finally {
    await verbs.closeDevice(dev);
  }
}

export interface RunIo {
  out: (s: string) => void;
  err: (s: string) => void;
  /** The host verbs (tests pass a double); NativeVerbs by default, loaded only once the flags are valid. */
  verbs?: () => Promise<HostVerbs>;
}

/** Runs the backend until SIGINT/SIGTERM; returns the exit code. */
export async function run(argv: readonly string[], io: RunIo = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) }): Promise<number> {
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
  const log = new StderrLogger('vrdma-backend', flags['log-level'] as LogLevel);
  let device: RdmaDevice | undefined;
  try {
    const verbs = io.verbs !== undefined ? await io.verbs() : new (await import('../verbs/native-verbs.ts')).NativeVerbs();
    checkHostDevice(verbs, flags.device);
    const resolver = await buildResolver(verbs, flags);
    device = await RdmaDevice.open({ verbs, hostDevice: flags.device, vmId: flags['vm-id'], resolver, quotas: quotasOf(flags), log: log.child('device') });
    const { VhostUserServer } = await import('../transport/vhost-user/server.ts');
    const { SysHost } = await import('../transport/vhost-user/sys-host.ts');
    const server = new VhostUserServer({ path: flags.socket, host: new SysHost(), model: device, log: log.child('vhost-user') });
    server.listen();
    log.log('info', 'serving', { socket: flags.socket, device: flags.device, vm: flags['vm-id'], gid: Buffer.from(device.config.gid).toString('hex') });
    await new Promise<void>((resolve) => {
      const stop = (sig: string) => {
        log.log('info', 'shutting down', { signal: sig });
        resolve();
      };
      process.once('SIGINT', () => stop('SIGINT'));
      process.once('SIGTERM', () => stop('SIGTERM'));
    });
    server.close();
    await device.close();
    return 0;
  } catch (e) {
    io.err(`vrdma-backend: ${(e as Error).message}\n`);
    if (device !== undefined) await device.close().catch(() => undefined);
    return EXIT_FAILURE;
  }
}
