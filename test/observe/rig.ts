// A real backend process (test/observe/backend-process.ts over FakeVerbs) and a guest for it: the reference
// driver over the reference vhost-user front-end, connected to the process's socket. Lines the process writes on
// stderr are collected as they come.

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { RdmaContext, VhostUserTransport } from '../../guest-driver-spec/driver/index.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const entry = path.join(root, 'test/observe/backend-process.ts');
/** Longest wait for the process to start or answer on a loaded 2-core machine (each start compiles the sources). */
export const WAIT_MS = 60_000;
export const host = new SysHost();

export interface BackendProcess {
  child: ChildProcess;
  lines: string[];
  /** Resolves with the first stderr line `pred` accepts (already seen or coming). */
  line(pred: (l: string) => boolean, what: string): Promise<string>;
  exited: Promise<number>;
  stop(): Promise<number>;
}

export interface StartOptions {
  /** The script to run instead of the FakeVerbs process (the package's bin for real verbs), run with plain node. */
  bin?: string;
  /** Longest wait for a line (default WAIT_MS; the soft-RoCE test host needs minutes for a cold start). */
  waitMs?: number;
}

export function startBackend(args: string[], opts: StartOptions = {}): BackendProcess {
  const argv = opts.bin !== undefined ? [opts.bin, ...args] : ['--import', 'tsx', entry, ...args];
  const waitMs = opts.waitMs ?? WAIT_MS;
  const child = spawn(process.execPath, argv, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  const waiters: { pred: (l: string) => boolean; resolve: (l: string) => void }[] = [];
  let partial = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    partial += chunk;
    let nl;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const l = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      lines.push(l);
      for (const w of [...waiters]) if (w.pred(l)) waiters.splice(waiters.indexOf(w), 1), w.resolve(l);
    }
  });
  child.stdout!.resume();
  const exited = new Promise<number>((resolve) => child.on('exit', (code, sig) => resolve(code ?? (sig !== null ? -1 : 0))));
  let done = false;
  void exited.then(() => (done = true));
  return {
    child,
    lines,
    exited,
    line(pred, what) {
      const seen = lines.find(pred);
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`backend: no ${what} within ${waitMs} ms; stderr:\n${lines.join('\n')}`)), waitMs);
        waiters.push({ pred, resolve: (l) => (clearTimeout(timer), resolve(l)) });
        void exited.then((code) => reject(new Error(`backend exited (${code}) before ${what}; stderr:\n${lines.join('\n')}`)));
      });
    },
    async stop() {
      if (!done) child.kill('SIGTERM');
      return exited;
    },
  };
}

/** The reference driver on the backend's socket, with two RAM regions and a hole between them. */
export async function openGuest(socketPath: string) {
  const ram = new GuestRam(host, [
    { gpa: 0, size: 4 << 20 },
    { gpa: 0x1000_0000, size: 8 << 20 },
  ]);
  const transport = await VhostUserTransport.open({ host, socketPath, ram, queues: 3 });
  const ctx = await RdmaContext.open(transport);
  return {
    ctx,
    async close() {
      await ctx.close(); // closes the transport too
      ram.release();
    },
  };
}

export async function scrape(port: number): Promise<{ status: number; type: string; body: string }> {
  const r = await fetch(`http://127.0.0.1:${port}/metrics`);
  return { status: r.status, type: r.headers.get('content-type') ?? '', body: await r.text() };
}

/**
 * A scratch folder removed at the end of test `t`, holding `table.json`: the --gid-table of the observe tests
 * (vm-a and vm-b in VPC blue, vm-c in red, all on one host).
 */
export function scratchWithTable(t: { teardown(fn: () => void): void }, prefix: string): { dir: string; table: string } {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const table = path.join(dir, 'table.json');
  writeFileSync(
    table,
    JSON.stringify({
      vms: [
        { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
        { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
        { vmId: 'vm-c', vpc: 'red', virtualIp: '192.168.7.3', hostIp: '10.0.0.1' },
      ],
    }),
  );
  return { dir, table };
}
