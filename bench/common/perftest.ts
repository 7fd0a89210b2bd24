// perftest (ib_write_lat, ib_send_lat, ib_write_bw, ...) as a same-run baseline: runs a server and a client of one
// tool on one RDMA device (both in this machine, over loopback for perftest's own out-of-band exchange) and reads
// the client's result line. Shared by the benchmarks that compare against perftest; pure parsing is separate from
// running so it can be checked on recorded output.

import { spawn } from 'node:child_process';

/** perftest's default TCP port for the out-of-band exchange; each run takes the next one (no reuse races). */
export const PERFTEST_PORT_BASE = 18_515;
/** The client retries its connection while the server starts listening: attempts and the pause between them. */
export const CLIENT_CONNECT_ATTEMPTS = 60;
export const CLIENT_RETRY_PAUSE_MS = 500;
/** Output kept per process for error messages. */
const MAX_OUTPUT_CHARS = 64 * 1024;

export interface PerftestRun {
  /** e.g. ib_write_lat */
  tool: string;
  device: string;
  gidIndex: number;
  /** Tool arguments besides device, GID, port and the server address (-s, -n, ...). */
  args: readonly string[];
  /** Kills both processes after this long (a lost message would otherwise hang the run). */
  timeoutMs: number;
}

export interface PerftestOutput {
  /** The command line as a reader would type it for the client (without the port). */
  commandLine: string;
  client: string;
  server: string;
}

export class PerftestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PerftestError';
  }
}

interface Finished {
  code: number;
  out: string;
}

function runProcess(cmd: string, args: readonly string[], timeoutMs: number): Promise<Finished> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const take = (d: Buffer): void => {
      if (out.length < MAX_OUTPUT_CHARS) out += d.toString();
    };
    p.stdout.on('data', take);
    p.stderr.on('data', take);
    const timer = setTimeout(() => {
      out += `\n[killed after ${timeoutMs} ms]`;
      p.kill('SIGKILL');
    }, timeoutMs);
    p.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, out });
    });
  });
}

let nextPort = PERFTEST_PORT_BASE;

/** Client output that means "the server is not listening yet": try again. */
const NOT_LISTENING = /Couldn't connect|Unable to open file descriptor|Connection refused/i;

/** Runs `tool` as server and client on the same device; resolves with both outputs, throws when either fails. */
export async function runPerftest(o: PerftestRun): Promise<PerftestOutput> {
  const port = String(nextPort++);
  const common = ['-d', o.device, '-x', String(o.gidIndex), '-F', ...o.args];
  const withPort = [...common, '-p', port];
  const server = runProcess(o.tool, withPort, o.timeoutMs);
  let client: Finished | undefined;
  for (let attempt = 0; attempt < CLIENT_CONNECT_ATTEMPTS; attempt++) {
    await new Promise((r) => setTimeout(r, CLIENT_RETRY_PAUSE_MS));
    client = await runProcess(o.tool, [...withPort, '127.0.0.1'], o.timeoutMs);
    if (client.code === 0 || !NOT_LISTENING.test(client.out)) break;
  }
  const s = await server;
  if (client === undefined || client.code !== 0 || s.code !== 0) {
    throw new PerftestError(`${o.tool} failed (client exit ${client?.code}, server exit ${s.code}):\n--- client\n${client?.out}\n--- server\n${s.out}`);
  }
  return { commandLine: `${o.tool} ${common.join(' ')}`, client: client.out, server: s.out };
}

export interface LatencyResult {
  bytes: number;
  iterations: number;
  minUs: number;
  maxUs: number;
  /** perftest's t_typical: the median. */
  typicalUs: number;
  avgUs: number;
}

export interface BandwidthResult {
  bytes: number;
  iterations: number;
  peakMiBs: number;
  /** perftest's "BW average[MB/sec]": MB is 2^20 bytes. */
  averageMiBs: number;
}

const NUMBER = String.raw`([\d.]+)`;

/** The result line of ib_*_lat: `#bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%`. */
export function parseLatency(out: string, bytes: number, iterations: number): LatencyResult {
  const m = new RegExp(String.raw`^\s*${bytes}\s+${iterations}\s+${NUMBER}\s+${NUMBER}\s+${NUMBER}\s+${NUMBER}`, 'm').exec(out);
  if (m === null) throw new PerftestError(`no latency line for ${bytes} bytes x ${iterations} in perftest's output:\n${out}`);
  const v = m.slice(1, 5).map(Number);
  if (v.some((x) => !Number.isFinite(x))) throw new PerftestError(`unreadable latency line: ${m[0]}`);
  return { bytes, iterations, minUs: v[0]!, maxUs: v[1]!, typicalUs: v[2]!, avgUs: v[3]! };
}

/** The result line of ib_*_bw: `#bytes #iterations BW_peak BW_average MsgRate`. */
export function parseBandwidth(out: string, bytes: number, iterations: number): BandwidthResult {
  const m = new RegExp(String.raw`^\s*${bytes}\s+${iterations}\s+${NUMBER}\s+${NUMBER}`, 'm').exec(out);
  if (m === null) throw new PerftestError(`no bandwidth line for ${bytes} bytes x ${iterations} in perftest's output:\n${out}`);
  const peak = Number(m[1]);
  const average = Number(m[2]);
  if (!Number.isFinite(peak) || !Number.isFinite(average)) throw new PerftestError(`unreadable bandwidth line: ${m[0]}`);
  return { bytes, iterations, peakMiBs: peak, averageMiBs: average };
}
