// The relayed data path over vfio-user against vhost-user, in the same test-host run (bash bench/vfio-user/run.sh
// --data-path starts the soft-RoCE test host and runs this inside it): two VMs over vfio-user (the unmodified QEMU
// 11.1.3, vfio-user-pci) and two over vhost-user (the project's patched QEMU 10.0, vhost-user-device-pci), each VM
// a device instance over NativeVerbs on the one rxe0, the reference driver through qtest. Per transport:
//   - RDMA WRITE latency, 2 bytes, ping-pong as ib_write_lat (each side watches the last byte of its buffer), one
//     way = half a round trip; p50;
//   - RDMA WRITE bandwidth, 64 KiB per work request, a window of TX_DEPTH in flight, every SIGNAL_EVERY-th signaled.
// Rounds alternate the transports (vfio-user first in odd rounds) so that a change of machine load hits both.
// Neither transport maps host queues here (vfio-user cannot; vhost-user's mapping is off) so both rows measure the
// relay, and the difference is the transport: over vfio-user every doorbell is a trapped BAR write that QEMU
// forwards as a vfio-user REGION_WRITE message (no ioeventfd), over vhost-user it is an ioeventfd kick.
// Adds its records to bench-results/vfio-user.json, keeping the control round-trip ones (bench.ts).
//   VRDMA_BENCH_ROUNDS (default 2), VRDMA_BENCH_LAT_ITERS (default 40), VRDMA_BENCH_BW_ITERS (default 64)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Cleanups, findStockQemu, qemuVersion } from '../../guest-driver-spec/driver/attach.ts';
import { findQemu } from '../../guest-driver-spec/qtest/index.ts';
import { StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { RXE_DEVICE, RXE_HOST_IP, positiveInt } from '../common/test-host.ts';
import type { GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { median, percentile, record, type BenchRecord } from '../common/results.ts';
import { openDataVm, openRcPair, withRcPair, writeBandwidth, writeLatency, type DataVm, type RcPair } from '../common/data-path.ts';
import { mergeResults } from './merge.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const ROUNDS = positiveInt('VRDMA_BENCH_ROUNDS', 2, 100);
const LAT_ITERS = positiveInt('VRDMA_BENCH_LAT_ITERS', 40, 100_000);
const LAT_WARMUP = 5;
const BW_ITERS = positiveInt('VRDMA_BENCH_BW_ITERS', 64, 100_000);
const LAT_SIZE = 2;
const BW_SIZE = 64 * 1024;
const TX_DEPTH = 16;
const SIGNAL_EVERY = 8;
const BUFFER_BYTES = 4 * BW_SIZE;
const SEND_AT = 0;
const RECV_AT = 4096;
/** Under TCG on a loaded machine a completion or a written byte still comes within this. */
const WAIT_MS = 60_000;

type Kind = 'vfio-user' | 'qemu';
/** Four VMs in one VPC, all on this rxe0: two per transport, all open at once (distinct names and addresses). */
const vmName = (kind: Kind, side: 'a' | 'b'): string => `${kind === 'qemu' ? 'vhost' : 'vfio'}-${side}`;
const TABLE: GidTableEntry[] = (['vfio-user', 'qemu'] as const).flatMap((kind, k) =>
  (['a', 'b'] as const).map((side, s) => ({ vmId: vmName(kind, side), vpc: 'bench', virtualIp: `192.168.9.${1 + 2 * k + s}`, hostIp: RXE_HOST_IP })),
);
const host = new SysHost();

interface Testbed {
  a: DataVm;
  b: DataVm;
  close(): Promise<string[]>;
}

async function openTestbed(kind: Kind, verbs: NativeVerbs, resolver: StaticAddressResolver): Promise<Testbed> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vrdma-bench-vfu-${kind}-`));
  const cleanups = new Cleanups();
  const close = async (): Promise<string[]> => {
    const errors = await cleanups.runAll();
    fs.rmSync(dir, { recursive: true, force: true });
    return errors;
  };
  const openVm = (name: string): Promise<DataVm> =>
    openDataVm(name, {
      // Mapping off on both: the relayed path is what is compared (vfio-user never offers it anyway).
      device: { verbs, hostDevice: RXE_DEVICE, resolver, aliases: nativeAliasMapper, hostQueueMapping: 'off' },
      attach: { kind, host, dir, cleanups, frontendRamBytes: 0 },
      bufferBytes: BUFFER_BYTES,
    });
  try {
    return { a: await openVm(vmName(kind, 'a')), b: await openVm(vmName(kind, 'b')), close };
  } catch (e) {
    await close();
    throw e;
  }
}

/** An RC pair between the testbed's VMs; the QPs take the driver's default inline size, which the loops do not use. */
function rcPair(t: Testbed): Promise<RcPair> {
  return openRcPair(t.a, t.b, 2 * TX_DEPTH, () => ({ maxSendWr: TX_DEPTH, maxRecvWr: 4 }));
}

/** One-way RDMA WRITE latencies (us): A writes B's slot, B sees the byte change and writes A's; half the round. */
function writeLatencies(t: Testbed): Promise<number[]> {
  // The send queue is two groups deep: each signaled WRITE's completion is awaited before the next iteration.
  const params = { size: LAT_SIZE, iters: LAT_ITERS, warmup: LAT_WARMUP, signalEvery: SIGNAL_EVERY, sendAt: SEND_AT, recvAt: RECV_AT, waitMs: WAIT_MS, inline: false, awaitEachSignaled: true };
  return withRcPair(() => rcPair(t), (pair) => writeLatency(pair, t.a, t.b, params));
}

/** MiB/s of BW_ITERS 64 KiB WRITEs A -> B, TX_DEPTH in flight; the guest sleeps on the CQ when the window is full. */
function writeBandwidthMiBs(t: Testbed): Promise<number> {
  return withRcPair(() => rcPair(t), (pair) => writeBandwidth(pair, t.a, t.b, { size: BW_SIZE, iters: BW_ITERS, txDepth: TX_DEPTH, signalEvery: SIGNAL_EVERY, waitMs: WAIT_MS }));
}

async function main(): Promise<number> {
  if (process.env['VRDMA_IN_TEST_HOST'] !== '1') {
    console.error('bench/vfio-user/data-path.ts runs inside the soft-RoCE test host: bash bench/vfio-user/run.sh --data-path');
    return 2;
  }
  const stock = qemuVersion(findStockQemu());
  const patched = qemuVersion(await findQemu());
  console.log(`[bench:vfio-user data path] vfio-user: ${stock}; vhost-user: ${patched}; ${ROUNDS} round(s), ${LAT_ITERS} latency iterations, ${BW_ITERS} x 64 KiB`);
  const verbs = new NativeVerbs();
  const lat: Record<Kind, number[]> = { 'vfio-user': [], qemu: [] };
  const bw: Record<Kind, number[]> = { 'vfio-user': [], qemu: [] };
  const beds: Partial<Record<Kind, Testbed>> = {};
  try {
    const resolver = new StaticAddressResolver(TABLE);
    for (const kind of ['vfio-user', 'qemu'] as const) beds[kind] = await openTestbed(kind, verbs, resolver);
    for (let r = 0; r < ROUNDS; r++) {
      const order: Kind[] = r % 2 === 0 ? ['vfio-user', 'qemu'] : ['qemu', 'vfio-user'];
      for (const kind of order) {
        const l = await writeLatencies(beds[kind]!);
        lat[kind].push(...l);
        const b = await writeBandwidthMiBs(beds[kind]!);
        bw[kind].push(b);
        console.log(`round ${r + 1} ${kind === 'qemu' ? 'vhost-user' : kind}: WRITE 2 B one-way p50 ${percentile(l, 50).toFixed(0)} us, 64 KiB WRITE ${b.toFixed(2)} MiB/s`);
      }
    }
  } finally {
    for (const bed of Object.values(beds)) for (const e of await bed.close()) console.error(e);
  }
  const base = `over vhost-user (the project's QEMU 10.0, vhost-user-device-pci, relayed path), same test-host run, rounds alternated`;
  const records: BenchRecord[] = [
    record('relayed_write_latency_2b_p50_vfio_user', percentile(lat['vfio-user'], 50), percentile(lat.qemu, 50), `the same RDMA WRITE 2 B ping-pong (one way, p50) ${base}`, 'us', 'lower'),
    record('relayed_write_latency_2b_p99_vfio_user', percentile(lat['vfio-user'], 99), percentile(lat.qemu, 99), `the same RDMA WRITE 2 B ping-pong (one way, p99) ${base}`, 'us', 'lower'),
    record('relayed_write_bw_64k_vfio_user', median(bw['vfio-user']), median(bw.qemu), `the same 64 KiB RDMA WRITE stream (median of rounds) ${base}`, 'MiB/s', 'higher'),
  ];
  const file = path.join(root, 'bench-results/vfio-user.json');
  mergeResults(file, records);
  for (const r of records) console.log(`${r.metric}: ${r.ours} ${r.unit} vs ${r.baseline} ratio ${r.ratio}`);
  console.log(`wrote ${file}`);
  return 0;
}

process.exitCode = await main();
