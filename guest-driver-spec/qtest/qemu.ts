// Starting a real QEMU under the qtest accelerator with a shared memfd as guest RAM, and finding (or building) the
// project's patched QEMU binary. The test program listens on a Unix socket and QEMU connects to it as its qtest
// client channel (as QEMU's own libqtest does), so there is no race with QEMU creating a socket.

import { spawn, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { QtestClient } from './qtest-client.ts';
import { GuestRam } from './guest-ram.ts';

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
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class QemuQtest {
  private stderrText = '';
  private exitInfo: QemuExit | undefined;
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
  ) {
    this.exited = exited;
    this.ram = new GuestRam(ramBytes);
    this.stderrText = stderrSoFar();
    child.stderr?.on('data', (chunk: Buffer) => this.appendStderr(chunk.toString()));
    void exited.then((info) => (this.exitInfo = info));
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
    const ownsWorkDir = options.workDir === undefined;
    const workDir = options.workDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-qtest-'));
    const socketPath = path.join(workDir, `qtest-${process.pid}-${Date.now()}.sock`);
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
    const args = [
      '-accel', 'qtest',
      '-qtest', `unix:${socketPath}`,
      '-machine', 'pc,memory-backend=mem',
      '-m', `${ramMiB}M`,
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
    try {
      const socket = await Promise.race([
        new Promise<net.Socket>((resolve) => server.once('connection', resolve)),
        exited.then((info) => {
          throw new Error(`QEMU exited before connecting qtest (code ${info.code}, signal ${info.signal}):\n${stderr}`);
        }),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`QEMU did not connect qtest within ${timeoutMs} ms:\n${stderr}`)), timeoutMs);
        }),
      ]);
      child.stderr?.off('data', onStderr);
      return new QemuQtest(child, new QtestClient(socket), workDir, ownsWorkDir, ramMiB * 1024 * 1024, exited, () => stderr);
    } catch (error) {
      child.kill('SIGKILL');
      await exited;
      if (ownsWorkDir) fs.rmSync(workDir, { recursive: true, force: true });
      throw error;
    } finally {
      if (timer !== undefined) clearTimeout(timer);
      server.close();
      fs.rmSync(socketPath, { force: true });
    }
  }

  /** Ends QEMU: SIGTERM, then SIGKILL if it is still there after STOP_TIMEOUT_MS. Safe to call twice. */
  async stop(): Promise<QemuExit> {
    this.qtest.close();
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
