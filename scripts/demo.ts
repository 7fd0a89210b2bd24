// `npm run demo` (scripts/demo.sh runs this inside the soft-RoCE test host): two VMs talking RDMA through the
// virtio-rdma back-end on real soft-RoCE. Each VM is a real QEMU process (the project's patched QEMU under qtest,
// vhost-user-device-pci with virtio ID 42) in front of its own vhost-user server and device instance; both devices
// share one rxe0 as one host RNIC would be. The reference driver runs an RC ping-pong (SEND/RECV) and an RDMA
// WRITE then READ back, checks every byte, prints a table, releases everything and checks with
// `rdma resource show` that nothing is left on the host. Exit code 1 when any check fails.
//
// RC runs in mapped mode (spec section 13: the host's queues in the guest, no JavaScript of the backend per work
// request) when the device offers HOST_QUEUE_MAPPING and the transport reaches its shared memory, and on the relay
// otherwise; a UD row always runs on the relay (section 13.8). Each row says which mode it used.
//
// VRDMA_DEMO_TRANSPORT=frontend uses the reference vhost-user front-end instead of QEMU (no QEMU needed).
// VRDMA_DEMO_TRANSPORT=vfio-user (or VRDMA_TRANSPORT=vfio-user) serves each device over vfio-user to an UNMODIFIED
// QEMU (vfio-user-pci; $VRDMA_STOCK_QEMU, set by scripts/demo.sh): no patched QEMU; RC runs on the relay (no host
// queue mapping over vfio-user, spec 13.2).
// VRDMA_DEMO_MAPPING=off keeps RC on the relay too.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AccessFlag, Limits, WcOpcode, WcStatus } from '../vmm-device/abi/rdma/index.ts';
import { DEFAULT_QKEY, MappedCq, RdmaContext, type Cq, type DataPathMode, type GuestBuffer, type MappedQp, type Mr, type Pd, type Qp, type WorkCompletion } from '../guest-driver-spec/driver/index.ts';
import { attachDevice, Cleanups, findStockQemu, qemuVersion, type TransportKind } from '../guest-driver-spec/driver/attach.ts';
import { RdmaDevice, StaticAddressResolver, type GidTableEntry } from '../vmm-device/rdma/index.ts';
import { NativeVerbs } from '../vmm-device/verbs/native-verbs.ts';
import { SysHost } from '../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../vmm-device/util/log.ts';
import { nativeAliasMapper } from '../vmm-device/host/alias.ts';

const RXE_DEVICE = 'rxe0';
/** rxe0's netdev address inside the test host (scripts/rxe/guest.sh). */
const RXE_HOST_IP = '10.233.0.1';
const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: RXE_HOST_IP },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: RXE_HOST_IP },
];
const PING_PONG_ROUND_TRIPS = 50;
const PING_BYTES = 64;
const WRITE_READ_BYTES = 256 * 1024;
const BUFFER_BYTES = 1024 * 1024;
/** Under TCG (the test host) on a loaded machine, a completion still comes within this. */
const WAIT_MS = 30_000;
const ALL_ACCESS = AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_READ;
/** Guest RAM of the front-end variant: one region of 8 MiB. */
const FRONTEND_RAM_BYTES = 8 << 20;

type AnyCq = Cq | MappedCq;
type AnyQp = Qp | MappedQp;

interface Vm {
  name: string;
  device: RdmaDevice;
  ctx: RdmaContext;
  pd: Pd;
  /** The RC QPs' CQ: mapped when the device and the transport allow it. */
  cq: AnyCq;
  /** A relayed CQ for the UD row (a UD QP is never mapped, and a relayed QP's CQs are relayed: 13.3). */
  relayCq: Cq;
  buf: GuestBuffer;
  mr: Mr;
}

interface Row {
  operation: string;
  mode: DataPathMode;
  count: number;
  bytesVerified: number;
  latenciesUs: number[];
  ok: boolean;
}

const host = new SysHost();
const failures: string[] = [];
const rows: Row[] = [];
/** Run in reverse at the end, also when a step fails. */
const cleanups = new Cleanups();

function check(ok: boolean, what: string): boolean {
  if (!ok) failures.push(what);
  return ok;
}

function pattern(size: number, seed: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 131 + seed * 17 + (i >> 8)) & 0xff;
  return b;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.length), Buffer.from(b.buffer, b.byteOffset, b.length)) === 0;
}

/**
 * QPs, CQs, MRs and PDs this process holds on the host, as `rdma resource show` lists them. The kernel names an
 * object's owner by the thread that created it (the addon's verbs run on libuv's worker threads), so an entry
 * belongs to this process when its pid is this process or one of its threads.
 */
function rdmaResourcesOfThisProcess(): Record<string, number> {
  const threads = new Set<number>([process.pid, ...fs.readdirSync(`/proc/${process.pid}/task`).map(Number)]);
  const out: Record<string, number> = {};
  for (const kind of ['qp', 'cq', 'mr', 'pd']) {
    const json = execFileSync('rdma', ['-j', 'resource', 'show', kind], { encoding: 'utf8' });
    const entries = JSON.parse(json.trim() === '' ? '[]' : json) as { pid?: number }[];
    out[kind] = entries.filter((e) => e.pid !== undefined && threads.has(e.pid)).length;
  }
  return out;
}

async function openVm(kind: TransportKind, verbs: NativeVerbs, resolver: StaticAddressResolver, dir: string, name: string): Promise<Vm> {
  const mapping = process.env['VRDMA_DEMO_MAPPING'] === 'off' ? 'off' : 'polled';
  const device = await RdmaDevice.open({ verbs, hostDevice: RXE_DEVICE, vmId: name, resolver, log: new RecordingLogger(name), aliases: nativeAliasMapper, hostQueueMapping: mapping });
  cleanups.add(`${name} device`, () => device.close());
  const transport = await attachDevice({ kind, model: device, host, dir, name, cleanups, frontendRamBytes: FRONTEND_RAM_BYTES });
  const ctx = await RdmaContext.open(transport);
  cleanups.add(`${name} driver (device reset)`, () => ctx.close());
  const pd = await ctx.allocPd();
  const relayCq = await ctx.createCq(64);
  const cq = ctx.driver.mapping !== undefined ? await ctx.createCq(64, { map: true }) : relayCq;
  const buf = ctx.allocBuffer(BUFFER_BYTES);
  const mr = await ctx.regMr(pd, buf, ALL_ACCESS);
  return { name, device, ctx, pd, cq, relayCq, buf, mr };
}

function createRc(vm: Vm): Promise<AnyQp> {
  const o = { type: 'RC', maxSendWr: 32, maxRecvWr: 32 } as const;
  return vm.cq instanceof MappedCq ? vm.ctx.createQp(vm.pd, { ...o, sendCq: vm.cq, recvCq: vm.cq }) : vm.ctx.createQp(vm.pd, { ...o, sendCq: vm.cq, recvCq: vm.cq });
}

async function rcPair(a: Vm, b: Vm): Promise<[AnyQp, AnyQp]> {
  const qa = await createRc(a);
  const qb = await createRc(b);
  const access = { accessFlags: ALL_ACCESS };
  await qa.connect({ gid: b.ctx.gid, qpn: qb.qpNum }, access);
  await qb.connect({ gid: a.ctx.gid, qpn: qa.qpNum }, access);
  return [qa, qb];
}

/** Waits for `count` completions and checks they all succeeded with the expected opcodes. */
async function expectCompletions(vm: Vm, opcodes: number[], what: string, cq: AnyCq = vm.cq): Promise<boolean> {
  const wcs: WorkCompletion[] = await cq.waitPoll(opcodes.length, WAIT_MS);
  const ok = wcs.length === opcodes.length && wcs.every((wc) => wc.status === WcStatus.SUCCESS && opcodes.includes(wc.opcode));
  return check(ok, `${what} on ${vm.name}: ${JSON.stringify(wcs.map((wc) => `${wc.opcodeName}:${wc.statusName}`))}`);
}

const PING_OFFSET = 0;
const PONG_OFFSET = 4096;

async function pingPong(a: Vm, b: Vm, qa: AnyQp, qb: AnyQp): Promise<void> {
  const row: Row = { operation: `RC SEND/RECV ping-pong (${PING_BYTES} B each way)`, mode: qa.mode, count: 0, bytesVerified: 0, latenciesUs: [], ok: true };
  rows.push(row);
  for (let i = 0; i < PING_PONG_ROUND_TRIPS; i++) {
    const ping = pattern(PING_BYTES, 2 * i);
    const pong = pattern(PING_BYTES, 2 * i + 1);
    a.buf.write(PING_OFFSET, ping);
    b.buf.write(PING_OFFSET, pong);
    await qa.postRecv([{ wrId: BigInt(i), sgList: [a.mr.sge(PONG_OFFSET, PING_BYTES)] }]);
    await qb.postRecv([{ wrId: BigInt(i), sgList: [b.mr.sge(PONG_OFFSET, PING_BYTES)] }]);
    const start = process.hrtime.bigint();
    await qa.postSend([{ wrId: BigInt(i), opcode: 'SEND', signaled: true, sgList: [a.mr.sge(PING_OFFSET, PING_BYTES)] }]);
    if (!(await expectCompletions(b, [WcOpcode.RECV], `ping ${i} receive`))) { row.ok = false; break; }
    await qb.postSend([{ wrId: BigInt(i), opcode: 'SEND', signaled: true, sgList: [b.mr.sge(PING_OFFSET, PING_BYTES)] }]);
    // A's CQ gets its SEND completion and the pong's RECV; B's its SEND completion.
    if (!(await expectCompletions(a, [WcOpcode.SEND, WcOpcode.RECV], `pong ${i}`))) { row.ok = false; break; }
    row.latenciesUs.push(Number(process.hrtime.bigint() - start) / 1000);
    if (!(await expectCompletions(b, [WcOpcode.SEND], `pong ${i} send`))) { row.ok = false; break; }
    const pingOk = check(equalBytes(b.buf.read(PONG_OFFSET, PING_BYTES), ping), `ping ${i} bytes`);
    const pongOk = check(equalBytes(a.buf.read(PONG_OFFSET, PING_BYTES), pong), `pong ${i} bytes`);
    if (!pingOk || !pongOk) { row.ok = false; break; }
    row.count++;
    row.bytesVerified += 2 * PING_BYTES;
  }
}

async function writeThenRead(a: Vm, b: Vm, qa: AnyQp): Promise<void> {
  const data = pattern(WRITE_READ_BYTES, 99);
  a.buf.write(0, data);
  const remoteOffset = BUFFER_BYTES - WRITE_READ_BYTES;
  let start = process.hrtime.bigint();
  await qa.postSend([{ wrId: 1000n, opcode: 'RDMA_WRITE', signaled: true, sgList: [a.mr.sge(0, WRITE_READ_BYTES)], remoteAddr: b.mr.iova + BigInt(remoteOffset), rkey: b.mr.rkey }]);
  let ok = await expectCompletions(a, [WcOpcode.RDMA_WRITE], 'RDMA WRITE');
  const writeUs = Number(process.hrtime.bigint() - start) / 1000;
  ok = check(equalBytes(b.buf.read(remoteOffset, WRITE_READ_BYTES), data), 'RDMA WRITE: peer memory holds the written bytes') && ok;
  rows.push({ operation: `RDMA WRITE A -> B (${WRITE_READ_BYTES / 1024} KiB)`, mode: qa.mode, count: ok ? 1 : 0, bytesVerified: ok ? WRITE_READ_BYTES : 0, latenciesUs: [writeUs], ok });

  // READ it back into a zeroed area of A.
  const readOffset = WRITE_READ_BYTES;
  a.buf.write(readOffset, new Uint8Array(WRITE_READ_BYTES));
  start = process.hrtime.bigint();
  await qa.postSend([{ wrId: 1001n, opcode: 'RDMA_READ', signaled: true, sgList: [a.mr.sge(readOffset, WRITE_READ_BYTES)], remoteAddr: b.mr.iova + BigInt(remoteOffset), rkey: b.mr.rkey }]);
  let readOk = await expectCompletions(a, [WcOpcode.RDMA_READ], 'RDMA READ');
  const readUs = Number(process.hrtime.bigint() - start) / 1000;
  readOk = check(equalBytes(a.buf.read(readOffset, WRITE_READ_BYTES), data), 'RDMA READ: the bytes came back') && readOk;
  rows.push({ operation: `RDMA READ B -> A (${WRITE_READ_BYTES / 1024} KiB)`, mode: qa.mode, count: readOk ? 1 : 0, bytesVerified: readOk ? WRITE_READ_BYTES : 0, latenciesUs: [readUs], ok: readOk });
}

/** UD SEND/RECV on the relay (never mapped: a rxe UD WQE names its own destination, section 13.8). */
async function udExchange(a: Vm, b: Vm): Promise<void> {
  const ua = await a.ctx.createQp(a.pd, { type: 'UD', sendCq: a.relayCq, recvCq: a.relayCq });
  const ub = await b.ctx.createQp(b.pd, { type: 'UD', sendCq: b.relayCq, recvCq: b.relayCq });
  try {
    await ua.readyUd();
    await ub.readyUd();
    const ah = await a.ctx.createAh(a.pd, { dgid: b.ctx.gid });
    try {
      const msg = pattern(PING_BYTES, 7);
      const at = 2 * WRITE_READ_BYTES;
      a.buf.write(at, msg);
      await ub.postRecv([{ wrId: 1n, sgList: [b.mr.sge(at, Limits.GRH_SIZE + PING_BYTES)] }]);
      const start = process.hrtime.bigint();
      await ua.postSend([{ wrId: 2n, opcode: 'SEND', signaled: true, sgList: [a.mr.sge(at, PING_BYTES)], ah, remoteQpn: ub.qpNum, remoteQkey: DEFAULT_QKEY }]);
      let ok = await expectCompletions(b, [WcOpcode.RECV], 'UD receive', b.relayCq);
      const us = Number(process.hrtime.bigint() - start) / 1000;
      ok = (await expectCompletions(a, [WcOpcode.SEND], 'UD send', a.relayCq)) && ok;
      ok = check(equalBytes(b.buf.read(at + Limits.GRH_SIZE, PING_BYTES), msg), 'UD SEND: the datagram after the 40-byte header area') && ok;
      rows.push({ operation: `UD SEND A -> B (${PING_BYTES} B)`, mode: ua.mode, count: ok ? 1 : 0, bytesVerified: ok ? PING_BYTES : 0, latenciesUs: [us], ok });
    } finally {
      await ah.destroy();
    }
  } finally {
    await ua.destroy();
    await ub.destroy();
  }
}

/** The backend's per-QP counters: work requests its JavaScript relayed for mapped QPs (0 when the bypass holds). */
function relayedForMapped(vms: Vm[]): number {
  let n = 0;
  for (const vm of vms) for (const c of vm.device.qpCounters()) if (c.mapped) n += c.relayedWorkRequests;
  return n;
}

function percentile(values: number[], p: number): number | undefined {
  if (values.length === 0) return undefined;
  const sorted = [...values].sort((x, y) => x - y);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function printTable(kind: TransportKind, elapsedS: number): void {
  const via = kind === 'qemu'
    ? 'two real QEMU processes (qtest, vhost-user-device-pci, virtio ID 42)'
    : kind === 'vfio-user'
      ? `two unmodified QEMU processes over vfio-user (qtest, vfio-user-pci; ${qemuVersion(findStockQemu())})`
      : 'the reference vhost-user front-end (no QEMU)';
  console.log('');
  console.log(`vrdma demo: two VMs on ${RXE_DEVICE} (soft-RoCE) via ${via}`);
  const header = ['operation', 'mode', 'count', 'bytes verified', 'p50 latency', 'result'];
  const body = rows.map((r) => {
    const p50 = percentile(r.latenciesUs, 50);
    return [r.operation, r.mode, String(r.count), String(r.bytesVerified), p50 === undefined ? '-' : `${(p50 / 1000).toFixed(2)} ms`, r.ok ? 'ok' : 'FAILED'];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  const line = (cells: string[]): string => '| ' + cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ') + ' |';
  console.log(line(header));
  console.log('|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|');
  for (const row of body) console.log(line(row));
  console.log(`total ${elapsedS.toFixed(1)} s (latencies include the driver's qtest/${kind === 'vfio-user' ? 'vfio-user' : 'vhost-user'} round trips under TCG)`);
}

async function main(): Promise<number> {
  if (process.env['VRDMA_IN_TEST_HOST'] !== '1') {
    console.error('scripts/demo.ts runs inside the soft-RoCE test host: npm run demo');
    return 2;
  }
  const asked = process.env['VRDMA_DEMO_TRANSPORT'] ?? (process.env['VRDMA_TRANSPORT'] === 'vfio-user' ? 'vfio-user' : undefined);
  const kind: TransportKind = asked === 'frontend' || asked === 'vfio-user' ? asked : 'qemu';
  const begin = Date.now();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-demo-'));
  const verbs = new NativeVerbs();
  const resolver = new StaticAddressResolver(TABLE);
  try {
    console.log(`[demo] opening two VMs (${kind})...`);
    const a = await openVm(kind, verbs, resolver, dir, 'vm-a');
    const b = await openVm(kind, verbs, resolver, dir, 'vm-b');
    console.log('[demo] connecting an RC queue pair between them...');
    const [qa, qb] = await rcPair(a, b);
    // The release check at the end means something only if the host attributes the live objects to this process.
    const live = rdmaResourcesOfThisProcess();
    check(live['qp'] === 2 && live['pd'] === 2, `the host lists the VMs' live objects for this process: ${JSON.stringify(live)}`);
    console.log(`[demo] ping-pong, ${PING_PONG_ROUND_TRIPS} round trips...`);
    await pingPong(a, b, qa, qb);
    console.log('[demo] RDMA WRITE then READ back...');
    await writeThenRead(a, b, qa);
    if (qa.mode === 'mapped') {
      const relayed = relayedForMapped([a, b]);
      check(relayed === 0, `the backend's JavaScript relayed ${relayed} work requests of mapped QPs`);
      rows.push({ operation: 'mapped QPs: work requests relayed by the backend', mode: 'mapped', count: relayed, bytesVerified: 0, latenciesUs: [], ok: relayed === 0 });
    }
    console.log('[demo] UD SEND on the relay...');
    await udExchange(a, b);
    await qa.destroy();
    await qb.destroy();
  } catch (e) {
    failures.push(`step failed: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
  } finally {
    failures.push(...(await cleanups.runAll()));
    fs.rmSync(dir, { recursive: true, force: true });
  }
  // The host objects go when the connections close; give the last close a moment to reach the device.
  await new Promise((r) => setTimeout(r, 500));
  const left = rdmaResourcesOfThisProcess();
  const leftTotal = Object.values(left).reduce((x, y) => x + y, 0);
  check(leftTotal === 0, `host objects left after release (rdma resource show): ${JSON.stringify(left)}`);
  rows.push({ operation: 'release: host QP/CQ/MR/PD left', mode: 'relay', count: leftTotal, bytesVerified: 0, latenciesUs: [], ok: leftTotal === 0 });
  printTable(kind, (Date.now() - begin) / 1000);
  if (failures.length > 0) {
    console.log(`FAILED (${failures.length}):`);
    for (const f of failures) console.log(`  - ${f}`);
    return 1;
  }
  console.log('all checks passed');
  return 0;
}

process.exitCode = await main();
