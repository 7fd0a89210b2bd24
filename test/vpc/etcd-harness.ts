// Real etcd members on loopback for the VPC tests: Debian's etcd-server (installed with apt when missing and the
// tests run as root; scripts/setup.sh should list it), free ports, a data directory per member, kill and restart.

import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, openSync, closeSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** How long a member may take to answer /health after it starts (TCG-free, but a loaded 2-core machine). */
const START_TIMEOUT_MS = 30_000;

function etcdBinary(): string | undefined {
  try {
    return execFileSync('sh', ['-c', 'command -v etcd'], { encoding: 'utf8' }).trim() || undefined;
  } catch {
    return undefined;
  }
}

/** The etcd binary, installing Debian's etcd-server when it is missing. Throws (the test fails) when it cannot. */
export function ensureEtcd(): string {
  let bin = etcdBinary();
  if (bin !== undefined) return bin;
  if (process.getuid?.() !== 0) throw new Error('etcd is not installed and the tests do not run as root: apt-get install etcd-server');
  execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', 'etcd-server'], {
    stdio: 'inherit',
    env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
  });
  bin = etcdBinary();
  if (bin === undefined) throw new Error('apt-get installed etcd-server but no etcd binary is on PATH');
  return bin;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export class EtcdMember {
  private child: ChildProcess | undefined;
  readonly dataDir: string;
  constructor(
    readonly name: string,
    readonly clientPort: number,
    readonly peerPort: number,
    private readonly cluster: string,
    private readonly bin: string,
    private readonly baseDir: string,
  ) {
    this.dataDir = join(baseDir, name);
  }

  get url(): string {
    return `http://127.0.0.1:${this.clientPort}`;
  }

  get peerUrl(): string {
    return `http://127.0.0.1:${this.peerPort}`;
  }

  get running(): boolean {
    return this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Starts the member (again, with its data, after kill()); resolve with waitHealthy(). */
  start(): void {
    const logFd = openSync(join(this.baseDir, `${this.name}.log`), 'a');
    this.child = spawn(
      this.bin,
      [
        '--name', this.name,
        '--data-dir', this.dataDir,
        '--listen-client-urls', this.url,
        '--advertise-client-urls', this.url,
        '--listen-peer-urls', this.peerUrl,
        '--initial-advertise-peer-urls', this.peerUrl,
        '--initial-cluster', this.cluster,
        '--initial-cluster-state', 'new',
        '--initial-cluster-token', 'vrdma-vpc-test',
        '--heartbeat-interval', '50',
        '--election-timeout', '500',
      ],
      { stdio: ['ignore', logFd, logFd] },
    );
    closeSync(logFd);
  }

  async waitHealthy(timeoutMs = START_TIMEOUT_MS): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!this.running) throw new Error(`etcd member ${this.name} exited (see ${this.baseDir}/${this.name}.log)`);
      try {
        const r = await fetch(`${this.url}/health`, { signal: AbortSignal.timeout(1000) });
        if (r.ok && ((await r.json()) as { health?: string }).health === 'true') return;
      } catch {
        // not up yet
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`etcd member ${this.name} not healthy within ${timeoutMs} ms`);
  }

  /** SIGKILL, as a crash would; resolves when the process is gone. */
  async kill(): Promise<void> {
    const c = this.child;
    if (c === undefined || !this.running) return;
    const gone = new Promise((r) => c.once('exit', r));
    c.kill('SIGKILL');
    await gone;
  }
}

export class EtcdCluster {
  readonly members: EtcdMember[];
  private readonly baseDir: string;

  private constructor(members: EtcdMember[], baseDir: string) {
    this.members = members;
    this.baseDir = baseDir;
  }

  /** Starts `size` members on loopback and waits until each is healthy (a quorum exists). */
  static async start(size: number): Promise<EtcdCluster> {
    const bin = ensureEtcd();
    const baseDir = mkdtempSync(join(tmpdir(), 'vpc-etcd-'));
    const ports: [number, number][] = [];
    for (let i = 0; i < size; i++) ports.push([await freePort(), await freePort()]);
    const cluster = ports.map(([, peer], i) => `m${i}=http://127.0.0.1:${peer}`).join(',');
    const members = ports.map(([client, peer], i) => new EtcdMember(`m${i}`, client, peer, cluster, bin, baseDir));
    const c = new EtcdCluster(members, baseDir);
    for (const m of members) m.start();
    try {
      await Promise.all(members.map((m) => m.waitHealthy()));
    } catch (e) {
      await c.stop();
      throw e;
    }
    return c;
  }

  get endpoints(): string[] {
    return this.members.map((m) => m.url);
  }

  async stop(): Promise<void> {
    await Promise.all(this.members.map((m) => m.kill()));
    rmSync(this.baseDir, { recursive: true, force: true });
  }
}

/** A loopback TCP proxy to one port that a test can cut and restore: etcd stays up, this backend loses it. */
export class CuttableProxy {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  constructor(
    readonly port: number,
    private readonly targetPort: number,
  ) {}

  static async create(targetPort: number): Promise<CuttableProxy> {
    const p = new CuttableProxy(await freePort(), targetPort);
    await p.restore();
    return p;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async restore(): Promise<void> {
    const server = createServer((client) => {
      const upstream = connect(this.targetPort, '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => undefined);
      }
      client.pipe(upstream).pipe(client);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.port, '127.0.0.1', () => resolve());
    });
    this.server = server;
  }

  /** Closes the listener and resets every connection through it. */
  async cut(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    for (const sock of this.sockets) sock.resetAndDestroy();
    if (s !== undefined) await new Promise((r) => s.close(r));
  }
}

/** Polls `check` until it returns true or `timeoutMs` passes; returns the milliseconds it took. */
export async function until(check: () => boolean, timeoutMs: number, what: string): Promise<number> {
  const start = performance.now();
  while (!check()) {
    if (performance.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
  return performance.now() - start;
}
