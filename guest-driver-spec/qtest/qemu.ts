// Starting a real QEMU under the qtest accelerator with a shared memfd as guest RAM, and finding (or building) the
// project's patched QEMU binary. The test program listens on a Unix socket and QEMU connects to it as its qtest
// client channel (as QEMU's own libqtest does), so there is no race with QEMU creating a socket. On request the same
// is done for a QMP channel (`-mon mode=control` on a client socket chardev), and QEMU gets memory slots for
// RAM hot-added later (`-m SIZE,slots=N,maxmem=M`; memory-hotplug.ts adds the DIMMs through QMP).

import { spawn, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { QtestClient } from './qtest-client.ts';
import { GuestRam } from './guest-ram.ts';
import { QmpClient } from './qmp.ts';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** Default guest RAM. */
export const DEFAULT_RAM_MIB = 128;
/** How long QEMU may take to connect its qtest channel. */
export const START_TIMEOUT_MS = 30_000;
/** How long stop() waits after SIGTERM before SIGKILL. */
export const STOP_TIMEOUT_MS = 5_000;
/** QEMU's stderr kept for error messages. */
const MAX_STDERR_CHARS = 16_384;
/** The cached build may take minutes when it is missing (QEMU builds in about 3.5 minutes on 2 cores). */
const BUILD_TIMEOUT_MS = 30 * 60_000;
/** QEMU's x86 limit of DIMM slots (ACPI_MAX_RAM_SLOTS). */
export const MAX_MEMORY_SLOTS = 256;
/** Largest maxmem accepted here: a test machine has a few GiB, and nothing is allocated before a DIMM is added. */
export const MAX_MAXMEM_MIB = 64 * 1024;

let qemuBinary: Promise<string> | undefined;

/**
 * The patched qemu-system-x86_64: $VRDMA_QEMU if set, else the last stdout line of scripts/qemu/build.sh (which
 * answers in seconds from its cache and builds when the binary is missing).
 */
export function findQemu(): Promise<string> {
  if (qemuBinary !== undefined) return qemuBinary;
  const fromEnv = process.env.VRDMA_QEMU;
  qemuBinary = fromEnv
    ? Promise.resolve(fromEnv)
    : new Promise<string>((resolve, reject) => {
        execFile(
          'bash',
          [path.join(repoRoot, 'scripts/qemu/build.sh')],
          { timeout: BUILD_TIMEOUT_MS, maxBuffer: 64 * 1024 * 1024 },
          (error, stdout, stderr) => {
            if (error) {
              reject(new Error(`scripts/qemu/build.sh failed: ${error.message}\n${stderr.slice(-4000)}`));
              return;
            }
            const last = stdout.trim().split('\n').pop() ?? '';
            if (!last || !fs.existsSync(last)) reject(new Error(`scripts/qemu/build.sh printed no binary path (${last})`));
            else resolve(last);
          },
        );
      });
  qemuBinary.catch(() => {
    qemuBinary = undefined; // let a later caller retry
  });
  return qemuBinary;
}

export interface QemuQtestOptions {
  /** The QEMU binary (default: findQemu()). */
  binary?: string;
  ramMiB?: number;
  /** Extra arguments: chardevs, devices. */
  args?: readonly string[];
  /** Folder for the qtest socket (default: a fresh temporary folder, removed by stop()). */
  workDir?: string;
  startTimeoutMs?: number;
  /** Open a QMP channel too (QemuQtest.qmp), capabilities already negotiated when start() returns. */
  qmp?: boolean;
  /**
   * Memory slots for hot-added RAM: `-m ramMiB,slots=slots,maxmem=maxMiB`. Hot-added DIMMs land in the machine's
   * device-memory area (on pc: at the first GiB boundary at or above 4 GiB).
   */
  hotplug?: { slots: number; maxMiB: number };
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class QemuQtest {
  private stderrText = '';
  private exitInfo: QemuExit | undefined;
  /** stop() was called: an exit from then on is ours, not QEMU's own. */
  private stopping = false;
  readonly exited: Promise<QemuExit>;
  readonly ram: GuestRam;

  private constructor(
    readonly child: ChildProcess,
    readonly qtest: QtestClient,
    readonly workDir: string,
    private readonly ownsWorkDir: boolean,
    ramBytes: number,
    exited: Promise<QemuExit>,
    stderrSoFar: () => string,
    /** The QMP channel, when started with `qmp: true`. */
    readonly qmp: QmpClient | undefined,
  ) {
    this.exited = exited;
    this.ram = new GuestRam(ramBytes);
    this.stderrText = stderrSoFar();
    child.stderr?.on('data', (chunk: Buffer) => this.appendStderr(chunk.toString()));
    void exited.then((info) => {
      this.exitInfo = info;
      // A QEMU that ends on its own (an abort, an assertion, a refused request it treats as fatal) shows up in a
      // test as a bare ECONNRESET on the qtest socket: say what QEMU said.
      if (!this.stopping) {
        process.stderr.write(`[qtest] QEMU ${child.pid ?? '?'} exited on its own (code ${info.code}, signal ${info.signal}); its stderr:\n${this.stderrText}\n`);
      }
    });
  }

  private appendStderr(text: string): void {
    this.stderrText = (this.stderrText + text).slice(-MAX_STDERR_CHARS);
  }

  /** What QEMU wrote to stderr (the last MAX_STDERR_CHARS). */
  get stderr(): string {
    return this.stderrText;
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return this.exitInfo === undefined;
  }

  static async start(options: QemuQtestOptions = {}): Promise<QemuQtest> {
    const binary = options.binary ?? (await findQemu());
    const ramMiB = options.ramMiB ?? DEFAULT_RAM_MIB;
    if (!Number.isInteger(ramMiB) || ramMiB < 16 || ramMiB > 4096) throw new RangeError(`ramMiB ${ramMiB} outside 16..4096`);
    let memory = `${ramMiB}M`;
    if (options.hotplug !== undefined) {
      const { slots, maxMiB } = options.hotplug;
      if (!Number.isInteger(slots) || slots < 1 || slots > MAX_MEMORY_SLOTS) throw new RangeError(`hotplug slots ${slots} outside 1..${MAX_MEMORY_SLOTS}`);
      if (!Number.isInteger(maxMiB) || maxMiB <= ramMiB || maxMiB > MAX_MAXMEM_MIB) {
        throw new RangeError(`hotplug maxMiB ${maxMiB} must be above ramMiB ${ramMiB} and at most ${MAX_MAXMEM_MIB}`);
      }
      memory += `,slots=${slots},maxmem=${maxMiB}M`;
    }
    const ownsWorkDir = options.workDir === undefined;
    const workDir = options.workDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-qtest-'));
    const socketPath = path.join(workDir, `qtest-${process.pid}-${Date.now()}.sock`);
    const qmpPath = path.join(workDir, `qmp-${process.pid}-${Date.now()}.sock`);
    const listen = async (at: string): Promise<net.Server> => {
      const server = net.createServer();
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(at, () => resolve());
      });
      return server;
    };
    const server = await listen(socketPath);
    const qmpServer = options.qmp === true ? await listen(qmpPath).catch((e: unknown) => {
      server.close();
      throw e;
    }) : undefined;
    const args = [
      '-accel', 'qtest',
      '-qtest', `unix:${socketPath}`,
      // Without -qtest-log QEMU logs every qtest command and reply to stderr, a dozen write calls each, which this
      // process then reads and keeps: per control request a notify and an ISR read, so most of a set-up's cost
      // through QEMU (bench/setup/bench.ts, VRDMA_SETUP_TRANSPORT=qemu), and real errors pushed out of the kept
      // stderr. VRDMA_QTEST_LOG=FILE writes the log there for debugging.
      '-qtest-log', process.env['VRDMA_QTEST_LOG'] || 'none',
      ...(qmpServer !== undefined ? ['-chardev', `socket,id=qmp,path=${qmpPath}`, '-mon', 'chardev=qmp,mode=control'] : []),
      '-machine', 'pc,memory-backend=mem',
      '-m', memory,
      '-object', `memory-backend-memfd,id=mem,size=${ramMiB}M,share=on`,
      '-nodefaults', '-display', 'none', '-nic', 'none', '-serial', 'none', '-monitor', 'none',
      '-L', '/usr/share/seabios', '-L', '/usr/share/qemu',
      ...(options.args ?? []),
    ];
    const child = spawn(binary, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    const onStderr = (chunk: Buffer): void => {
      stderr = (stderr + chunk.toString()).slice(-MAX_STDERR_CHARS);
    };
    child.stderr?.on('data', onStderr);
    const exited = new Promise<QemuExit>((resolve) => {
      child.once('exit', (code, signal) => resolve({ code, signal }));
      child.once('error', () => resolve({ code: null, signal: null }));
    });
    const timeoutMs = options.startTimeoutMs ?? START_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    // Both connections are taken as soon as they come (QEMU connects its chardevs before the qtest channel is
    // served); a socket that arrives after a failure is closed.
    const accepted: net.Socket[] = [];
    const connection = (s: net.Server): Promise<net.Socket> =>
      new Promise<net.Socket>((resolve) =>
        s.once('connection', (c: net.Socket) => {
          accepted.push(c);
          resolve(c);
        }),
      );
    const qtestConnected = connection(server);
    const qmpConnected = qmpServer !== undefined ? connection(qmpServer) : Promise.resolve(undefined);
    let qmp: QmpClient | undefined;
    try {
      // The QMP greeting and capabilities negotiation are part of the start, under the same deadline.
      const [socket] = await Promise.race([
        Promise.all([qtestConnected, qmpConnected]).then(async ([q, m]) => {
          if (m !== undefined) {
            qmp = new QmpClient(m);
            await qmp.handshake();
          }
          return [q] as const;
        }),
        exited.then((info) => {
          throw new Error(`QEMU exited before connecting qtest${qmpServer !== undefined ? ' and QMP' : ''} (code ${info.code}, signal ${info.signal}):\n${stderr}`);
        }),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`QEMU did not connect qtest${qmpServer !== undefined ? ' and QMP' : ''} within ${timeoutMs} ms:\n${stderr}`)), timeoutMs);
        }),
      ]);
      const qtest = new QtestClient(socket);
      child.stderr?.off('data', onStderr);
      return new QemuQtest(child, qtest, workDir, ownsWorkDir, ramMiB * 1024 * 1024, exited, () => stderr, qmp);
    } catch (error) {
      qmp?.close();
      for (const c of accepted) c.destroy();
      child.kill('SIGKILL');
      await exited;
      if (ownsWorkDir) fs.rmSync(workDir, { recursive: true, force: true });
      throw error;
    } finally {
      if (timer !== undefined) clearTimeout(timer);
      server.close();
      qmpServer?.close();
      fs.rmSync(socketPath, { force: true });
      fs.rmSync(qmpPath, { force: true });
    }
  }

  /** Ends QEMU: SIGTERM, then SIGKILL if it is still there after STOP_TIMEOUT_MS. Safe to call twice. */
  async stop(): Promise<QemuExit> {
    this.stopping = true;
    this.qtest.close();
    this.qmp?.close();
    if (this.running) {
      this.child.kill('SIGTERM');
      let timer: NodeJS.Timeout | undefined;
      const killed = await Promise.race([
        this.exited.then(() => false),
        new Promise<boolean>((resolve) => {
          timer = setTimeout(() => resolve(true), STOP_TIMEOUT_MS);
        }),
      ]);
      if (timer !== undefined) clearTimeout(timer);
      if (killed) this.child.kill('SIGKILL');
    }
    const info = await this.exited;
    if (this.ownsWorkDir) fs.rmSync(this.workDir, { recursive: true, force: true });
    return info;
  }
}
