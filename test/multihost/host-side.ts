// One test host of the multi-host test, as both hosts' programs drive it (host 1's test directly, host 2's through
// its agent): its etcd member(s), the real `vrdma-backend` command serving its VM's virtio-rdma device over rxe0
// with the VPC policy from etcd, the VM's guest (the reference driver over the reference vhost-user front-end),
// a tally of the RoCE packets on the link (capture-roce.py), and the host's own view of its QPs (`rdma resource`).
// Every method takes and returns plain JSON values, so the agent can serve them over a socket unchanged.

import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface, type Interface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { AccessFlag, EventType } from '../../vmm-device/abi/rdma/index.ts';
import { CommandError, RdmaContext, VhostUserTransport, type Cq, type GuestBuffer, type Mr, type Pd, type Qp } from '../../guest-driver-spec/driver/index.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { queryStatus } from '../../vmm-device/cli/status.ts';
import { ensureEtcd } from '../vpc/etcd-harness.ts';
import { ETCD_ENDPOINTS, ETCD_MEMBERS, ETCD_PREFIX, HOST_ADDRESS, VM_OF_HOST, clientUrl, peerUrl, type HostId } from './topology.ts';

const PROJECT_ROOT = fileURLToPath(new URL('../..', import.meta.url));
const BACKEND_BIN = path.join(PROJECT_ROOT, 'bin/vrdma-backend.js');
const CAPTURE_SCRIPT = fileURLToPath(new URL('./capture-roce.py', import.meta.url));
const PYTHON = '/usr/bin/python3';
const RDMA_DEVICE = 'rxe0';
/** Under TCG a node process with tsx takes tens of seconds to start; the backend also waits for etcd's policy. */
export const BACKEND_START_MS = 240_000;
/** A completion, an event or a capture report under TCG on a loaded machine. */
export const WAIT_MS = 30_000;
/** etcd elections across two emulated VMs sharing 2 cores: generous, so a slow heartbeat is not an election. */
const ETCD_HEARTBEAT_MS = 200;
const ETCD_ELECTION_MS = 2000;
const POLL_MS = 100;
/** Guest RAM of the VM (one region) and the buffer registered in it. */
const GUEST_RAM_BYTES = 16 << 20;
export const BUFFER_BYTES = 2 << 20;
const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;
const QP_DEPTH = 32;
const CQ_DEPTH = 128;
/** Lines of a child's log quoted in an error. */
const LOG_TAIL_LINES = 30;

export interface BackendInfo {
  vmId: string;
  gid: string;
  mrIova: string;
  mrRkey: number;
  backendPid: number;
}

export type ConnectAnswer = { ok: true } | { ok: false; status: string; detail: number };

export interface Capture {
  packets: number;
  addresses: Record<string, number>;
  tos: Record<string, number>;
  /** Frames the kernel could not queue to the tally's socket: the tally is a sample when this is not 0. */
  dropped: number;
}

/** A QP as the host's kernel lists it (`rdma -j resource show qp`). */
export interface KernelQp {
  lqpn: number;
  rqpn?: number;
  state: string;
  type: string;
  pid?: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function tail(file: string): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-LOG_TAIL_LINES).join('\n');
  } catch {
    return '(no log)';
  }
}

/** The NIC of the host link: the one interface with a device behind it (scripts/rxe/guest.sh put rxe0 on it). */
export function linkInterface(): string {
  const nic = readdirSync('/sys/class/net').find((n) => n !== 'lo' && existsSync(`/sys/class/net/${n}/device`));
  if (nic === undefined) throw new Error('no NIC: this is not a multi-host test host (scripts/rxe/multi-host.sh)');
  return nic;
}

export class HostSide {
  readonly workDir = mkdtempSync(path.join(tmpdir(), 'vrdma-multihost-'));
  private readonly host = new SysHost();
  private readonly etcd = new Map<string, ChildProcess>();
  private backend: ChildProcess | undefined;
  private capture: { child: ChildProcess; lines: Interface; next: () => Promise<string> } | undefined;
  private ram: GuestRam | undefined;
  private transport: VhostUserTransport | undefined;
  private ctx: RdmaContext | undefined;
  private pd: Pd | undefined;
  private cq: Cq | undefined;
  private buf: GuestBuffer | undefined;
  private mr: Mr | undefined;
  private readonly qps = new Map<number, Qp>();
  /** Every event the guest's driver read, in order (for the report when an expected one does not come). */
  private readonly events: { at: number; type: string; handle: number; detail: number; sequence: string }[] = [];
  private backendLogFile: string | undefined;

  constructor(readonly hostId: HostId) {}

  private get socketPath(): string {
    return path.join(this.workDir, 'vm.sock');
  }

  private get statusPath(): string {
    return path.join(this.workDir, 'status.sock');
  }

  /** Starts this host's etcd members (the cluster forms once a quorum of the three is up). */
  async startEtcd(): Promise<string[]> {
    const bin = ensureEtcd();
    const cluster = ETCD_MEMBERS.map((m) => `${m.name}=${peerUrl(m)}`).join(',');
    const names: string[] = [];
    for (const m of ETCD_MEMBERS.filter((x) => x.host === this.hostId)) {
      const log = openSync(path.join(this.workDir, `etcd-${m.name}.log`), 'a');
      const child = spawn(bin, [
        '--name', m.name,
        '--data-dir', path.join(this.workDir, `etcd-${m.name}`),
        '--listen-client-urls', clientUrl(m),
        '--advertise-client-urls', clientUrl(m),
        '--listen-peer-urls', peerUrl(m),
        '--initial-advertise-peer-urls', peerUrl(m),
        '--initial-cluster', cluster,
        '--initial-cluster-state', 'new',
        '--initial-cluster-token', 'vrdma-multihost',
        '--heartbeat-interval', String(ETCD_HEARTBEAT_MS),
        '--election-timeout', String(ETCD_ELECTION_MS),
      ], { stdio: ['ignore', log, log] });
      closeSync(log);
      this.etcd.set(m.name, child);
      names.push(m.name);
    }
    return names;
  }

  /** SIGKILL of one of this host's members, as a crash would; resolves once it is gone. */
  async killEtcd(a: { name: string }): Promise<void> {
    const c = this.etcd.get(a.name);
    if (c === undefined) throw new Error(`etcd member ${a.name} does not run on ${this.hostId}`);
    if (c.exitCode !== null || c.signalCode !== null) return;
    const gone = new Promise((r) => c.once('exit', r));
    c.kill('SIGKILL');
    await gone;
  }

  /** Starts the RoCE tally on the link's NIC. */
  async startCapture(): Promise<string> {
    const nic = linkInterface();
    const child = spawn(PYTHON, [CAPTURE_SCRIPT, nic], { stdio: ['pipe', 'pipe', 'inherit'] });
    const lines = createInterface({ input: child.stdout! });
    const queue: string[] = [];
    const waiters: ((l: string) => void)[] = [];
    lines.on('line', (l) => (waiters.length > 0 ? waiters.shift()!(l) : queue.push(l)));
    const next = () =>
      new Promise<string>((resolve, reject) => {
        if (queue.length > 0) return resolve(queue.shift()!);
        const timer = setTimeout(() => reject(new Error(`capture-roce.py on ${nic}: no answer within ${WAIT_MS} ms`)), WAIT_MS);
        waiters.push((l) => {
          clearTimeout(timer);
          resolve(l);
        });
      });
    this.capture = { child, lines, next };
    const ready = JSON.parse(await next()) as { ready?: string };
    if (ready.ready !== nic) throw new Error(`capture-roce.py did not start on ${nic}: ${JSON.stringify(ready)}`);
    return nic;
  }

  async captureReport(): Promise<Capture> {
    if (this.capture === undefined) throw new Error('the capture is not started');
    this.capture.child.stdin!.write('report\n');
    return JSON.parse(await this.capture.next()) as Capture;
  }

  /**
   * Starts `vrdma-backend` for this host's VM with the policy from etcd (all three members), then the VM's guest:
   * driver up, a PD, a CQ, a buffer and its MR.
   */
  async startBackend(): Promise<BackendInfo> {
    const { vmId } = VM_OF_HOST[this.hostId];
    const logFile = path.join(this.workDir, 'backend.log');
    this.backendLogFile = logFile;
    const log = openSync(logFile, 'a');
    const env = { ...process.env };
    // The backend is no tap test process: tsx-for-tap.mjs must leave it alone (bin/ registers tsx itself).
    delete env['TAP_CHILD_ID'];
    const child = spawn(process.execPath, [
      BACKEND_BIN,
      '--socket', this.socketPath,
      '--device', RDMA_DEVICE,
      '--vm-id', vmId,
      '--host-id', this.hostId,
      '--vpc-etcd', ETCD_ENDPOINTS.join(','),
      '--vpc-prefix', ETCD_PREFIX,
      '--status-socket', this.statusPath,
      '--log-level', 'info',
    ], { stdio: ['ignore', log, log], env });
    closeSync(log);
    this.backend = child;
    const deadline = Date.now() + BACKEND_START_MS;
    while (!existsSync(this.socketPath) || !existsSync(this.statusPath)) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`vrdma-backend on ${this.hostId} exited (${child.exitCode ?? child.signalCode}):\n${tail(logFile)}`);
      }
      if (Date.now() > deadline) throw new Error(`vrdma-backend on ${this.hostId} not serving within ${BACKEND_START_MS} ms:\n${tail(logFile)}`);
      await sleep(POLL_MS);
    }
    this.ram = new GuestRam(this.host, [{ gpa: 0, size: GUEST_RAM_BYTES }]);
    this.transport = await VhostUserTransport.open({ host: this.host, socketPath: this.socketPath, ram: this.ram, queues: 3 });
    this.ctx = await RdmaContext.open(this.transport);
    this.ctx.driver.onEvent((e) => this.events.push({ at: Date.now(), type: e.typeName, handle: e.handle, detail: e.detail, sequence: String(e.sequence) }));
    this.pd = await this.ctx.allocPd();
    this.cq = await this.ctx.createCq(CQ_DEPTH);
    this.buf = this.ctx.allocBuffer(BUFFER_BYTES);
    this.mr = await this.ctx.regMr(this.pd, this.buf, ALL_ACCESS);
    return {
      vmId,
      gid: Buffer.from(this.ctx.gid).toString('hex'),
      mrIova: this.mr.iova.toString(),
      mrRkey: this.mr.rkey,
      backendPid: child.pid!,
    };
  }

  private need<T>(v: T | undefined, what: string): T {
    if (v === undefined) throw new Error(`${what}: startBackend() first`);
    return v;
  }

  private qp(handle: number): Qp {
    const q = this.qps.get(handle);
    if (q === undefined) throw new Error(`no QP with handle ${handle} on ${this.hostId}`);
    return q;
  }

  async createQp(): Promise<{ handle: number; qpn: number }> {
    const ctx = this.need(this.ctx, 'createQp');
    const cq = this.need(this.cq, 'createQp');
    const qp = await ctx.createQp(this.need(this.pd, 'createQp'), { type: 'RC', sendCq: cq, recvCq: cq, maxSendWr: QP_DEPTH, maxRecvWr: QP_DEPTH });
    this.qps.set(qp.handle, qp);
    return { handle: qp.handle, qpn: qp.qpNum };
  }

  /** RESET -> INIT -> RTR (to the peer's VIRTUAL GID) -> RTS; a refusal comes back as its status and detail. */
  async connect(a: { qp: number; peerGid: string; peerQpn: number }): Promise<ConnectAnswer> {
    try {
      await this.qp(a.qp).connect({ gid: Buffer.from(a.peerGid, 'hex'), qpn: a.peerQpn }, { accessFlags: ALL_ACCESS });
      return { ok: true };
    } catch (e) {
      if (e instanceof CommandError) return { ok: false, status: e.statusName, detail: e.detail };
      throw e;
    }
  }

  async write(a: { offset: number; data: string }): Promise<void> {
    this.need(this.buf, 'write').write(a.offset, Buffer.from(a.data, 'base64'));
  }

  async read(a: { offset: number; length: number }): Promise<string> {
    return Buffer.from(this.need(this.buf, 'read').read(a.offset, a.length)).toString('base64');
  }

  async postRecv(a: { qp: number; wrId: number; offset: number; length: number }): Promise<void> {
    await this.qp(a.qp).postRecv([{ wrId: BigInt(a.wrId), sgList: [this.need(this.mr, 'postRecv').sge(a.offset, a.length)] }]);
  }

  async postSend(a: { qp: number; wrId: number; opcode: 'SEND' | 'RDMA_WRITE' | 'RDMA_READ'; offset: number; length: number; remoteAddr?: string; rkey?: number }): Promise<void> {
    await this.qp(a.qp).postSend([{
      wrId: BigInt(a.wrId),
      opcode: a.opcode,
      signaled: true,
      sgList: [this.need(this.mr, 'postSend').sge(a.offset, a.length)],
      ...(a.remoteAddr === undefined ? {} : { remoteAddr: BigInt(a.remoteAddr), rkey: a.rkey }),
    }]);
  }

  /** Waits for `count` completions; returns each as "OPCODE:STATUS wrId". */
  async waitCompletions(a: { count: number }): Promise<string[]> {
    const wcs = await this.need(this.cq, 'waitCompletions').waitPoll(a.count, WAIT_MS);
    return wcs.map((wc) => `${wc.opcodeName}:${wc.statusName} ${wc.wrId}`);
  }

  /** Waits for QP_POLICY_TEARDOWN on a QP; its detail (the reason) and how long the wait took, or null. */
  async waitTeardown(a: { qp: number; timeoutMs: number }): Promise<{ reason: number; waitedMs: number } | null> {
    const start = performance.now();
    const e = await this.need(this.ctx, 'waitTeardown').driver.waitEvent((ev) => ev.type === EventType.QP_POLICY_TEARDOWN && ev.handle === a.qp, a.timeoutMs);
    return e === undefined ? null : { reason: e.detail, waitedMs: performance.now() - start };
  }

  /**
   * What to show when an expected event did not come: the guest's events since `since` (ms since the epoch), the
   * driver's counters, and the backend's log lines since it started (the last LOG_TAIL_LINES).
   */
  async diagnostics(a: { since: number }): Promise<{ events: unknown[]; driver: unknown; backendLog: string }> {
    const ctx = this.need(this.ctx, 'diagnostics');
    ctx.driver.pumpEvents();
    return {
      events: this.events.filter((e) => e.at >= a.since && e.type !== 'COMPLETION'),
      driver: { ...ctx.driver.counters },
      backendLog: this.backendLogFile === undefined ? '' : tail(this.backendLogFile),
    };
  }

  /** The backend's operator view (`vrdma-backend status`), as JSON. */
  async status(): Promise<any> {
    return queryStatus(this.statusPath);
  }

  /**
   * Every QP of this host as its kernel lists them. Not filtered by the backend's pid: the kernel does not always
   * attribute a QP to its process (see the device-exchange notes); QP numbers are unique on the host.
   */
  async kernelQps(): Promise<KernelQp[]> {
    const out = execFileSync('rdma', ['-j', 'resource', 'show', 'qp'], { encoding: 'utf8' }).trim();
    return JSON.parse(out === '' ? '[]' : out) as KernelQp[];
  }

  /** The host's own address on the link, as the host kernel configured it. */
  async linkAddress(): Promise<string> {
    const out = execFileSync('ip', ['-j', '-4', 'addr', 'show', 'dev', linkInterface()], { encoding: 'utf8' });
    const addr = (JSON.parse(out) as { addr_info: { local: string }[] }[])[0]?.addr_info[0]?.local;
    if (addr !== HOST_ADDRESS[this.hostId]) throw new Error(`${this.hostId}: link address ${addr}, expected ${HOST_ADDRESS[this.hostId]}`);
    return addr;
  }

  /** Releases the guest, stops the backend (SIGTERM: it releases its host objects), the capture and etcd. */
  async stop(): Promise<void> {
    const steps: (() => Promise<unknown>)[] = [
      async () => this.ctx?.close(),
      async () => this.transport?.close(),
      async () => this.ram?.release(),
      () => stopChild(this.backend, 'SIGTERM'),
      async () => this.capture?.child.stdin!.end(),
      () => stopChild(this.capture?.child, 'SIGTERM'),
      ...[...this.etcd.values()].map((c) => () => stopChild(c, 'SIGKILL')),
    ];
    for (const step of steps) await step().catch(() => undefined);
    rmSync(this.workDir, { recursive: true, force: true });
  }
}

/** How long a child may take to end after SIGTERM before SIGKILL. */
const STOP_GRACE_MS = 10_000;

async function stopChild(c: ChildProcess | undefined, signal: NodeJS.Signals): Promise<void> {
  if (c === undefined || c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once('exit', r));
  c.kill(signal);
  const timer = setTimeout(() => c.kill('SIGKILL'), STOP_GRACE_MS);
  await gone;
  clearTimeout(timer);
}

/** Polls until etcd member `url` answers /health true. */
export async function waitEtcdHealthy(url: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  while (Date.now() < deadline) {
    try {
      const r = await fetch(`${url}/health`, { signal: AbortSignal.timeout(2000) });
      const body = (await r.json()) as { health?: string };
      if (r.ok && body.health === 'true') return;
      last = JSON.stringify(body);
    } catch (e) {
      last = (e as Error).message;
    }
    await sleep(250);
  }
  throw new Error(`etcd member ${url} not healthy within ${timeoutMs} ms (last: ${last})`);
}

