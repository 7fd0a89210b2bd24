// Runs scripts/rxe/run.sh (the soft-RoCE test host) from the tests of the runner itself, keeping what it printed
// and when: these tests boot the real VM, on the host (not inside it: a TCG VM nested in one takes minutes).

import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const PROJECT_ROOT = path.resolve(here, '../..');
export const RUN_SH = path.join(PROJECT_ROOT, 'scripts/rxe/run.sh');

/** The runner's own codes besides the command's (documented in run.sh). */
export const EXIT_USAGE = 2;
export const EXIT_TIMEOUT = 124;

/** How long one run may take in these tests (boot included; the machine's 2 cores are shared). */
export const RUN_TIMEOUT_S = 240;
/**
 * A tap timeout for a test that boots the VM once: the run's own limit, the build of a cold cache, and a wait for
 * a VM slot (one VM at a time on a 2-core machine: another file's VM may be running).
 */
export const ONE_BOOT_TEST_TIMEOUT_MS = (RUN_TIMEOUT_S + 180 + 2 * RUN_TIMEOUT_S) * 1000;
/** The whole file's limit (tap's own default from package.json is shorter than a few serialized boots). */
export const FILE_TIMEOUT_MS = 3 * ONE_BOOT_TEST_TIMEOUT_MS;

export interface StdoutChunk {
  /** Milliseconds since the runner was started. */
  atMs: number;
  text: string;
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  chunks: StdoutChunk[];
  elapsedMs: number;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
}

/** Runs `bash scripts/rxe/run.sh <args...>` to its end. */
export function runInTestHost(args: string[], options: RunOptions = {}): Promise<RunResult> {
  return startInTestHost(args, options).done;
}

/** Starts `bash scripts/rxe/run.sh <args...>`: the runner's process, and its result when it ends. */
export function startInTestHost(args: string[], options: RunOptions = {}): { child: ChildProcess; done: Promise<RunResult> } {
  const started = Date.now();
  const child = spawn('bash', [RUN_SH, ...args], {
    cwd: options.cwd ?? PROJECT_ROOT,
    env: options.env ?? process.env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const chunks: StdoutChunk[] = [];
  const stderr: string[] = [];
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stdout.on('data', (text: string) => chunks.push({ atMs: Date.now() - started, text }));
  child.stderr.on('data', (text: string) => stderr.push(text));
  const done = new Promise<RunResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) =>
      resolve({
        code,
        signal,
        stdout: chunks.map((c) => c.text).join(''),
        stderr: stderr.join(''),
        chunks,
        elapsedMs: Date.now() - started,
      }),
    );
  });
  return { child, done };
}

/** Pids of the processes whose command line contains `text` (e.g. the QEMU of one run, by its --out folder). */
export function pidsWithCommandLine(text: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmdline.includes(text)) pids.push(Number(entry));
    } catch {
      // The process ended while we looked.
    }
  }
  return pids;
}

/** Polls `predicate` every 200 ms until it holds or `timeoutMs` passes; returns whether it held. */
export async function waitFor(predicate: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (predicate()) return true;
    await new Promise((r) => setTimeout(r, 200));
  }
  return predicate();
}

/** Skip reason when these tests run inside the test host itself (they would boot a VM in the VM). */
export function insideTestHostReason(): string | false {
  return process.env['VRDMA_IN_TEST_HOST'] === '1'
    ? 'the runner boots the test host; inside the test host that would be a nested TCG VM (minutes to boot)'
    : false;
}

/** The lines between `==> name` and the next `==> ` header in output built by `section` shell helpers. */
export function section(output: string, name: string): string {
  const lines = output.split('\n');
  const start = lines.indexOf(`==> ${name}`);
  if (start < 0) return '';
  const rest = lines.slice(start + 1);
  const end = rest.findIndex((l) => l.startsWith('==> '));
  return (end < 0 ? rest : rest.slice(0, end)).join('\n');
}
