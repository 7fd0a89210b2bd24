// The link between the multi-host test's two programs. serveHost (host 2's agent, test/multihost/agent.ts) starts
// the host's etcd member and RoCE tally, then serves HostSide's methods to host 1's test over the link, one JSON
// line per request and per answer ({"id", "method", "args"} -> {"id", "result"} | {"id", "error"}). It ends on
// "shutdown", when the test's connection closes, or after AGENT_LIFETIME_MS (exit code 1: the test never came or
// never finished). RemoteHost is the test's end, with the same methods as HostSide.

import net from 'node:net';
import { createInterface } from 'node:readline';
import { HostSide } from './host-side.ts';
import { AGENT_PORT, HOST_ADDRESS, type HostId } from './topology.ts';

/** The whole multi-host run must fit in this (scripts/multihost/test.sh's time limit is longer). */
export const AGENT_LIFETIME_MS = 1_200_000;
/** A request line longer than this is refused (the largest is a base64 buffer of BUFFER_BYTES). */
export const MAX_REQUEST_BYTES = 8 << 20;

/** The methods the agent serves (HostSide's), by name. */
const METHODS = [
  'startBackend', 'createQp', 'connect', 'write', 'read', 'postRecv', 'postSend', 'waitCompletions', 'waitTeardown',
  'status', 'kernelQps', 'linkAddress', 'captureReport', 'killEtcd', 'diagnostics',
] as const;
type MethodName = (typeof METHODS)[number];

/** HostSide's served methods (all async, so a local HostSide and a RemoteHost are interchangeable). */
export type HostApi = { [K in MethodName]: HostSide[K] };
type Api = HostApi;

export async function serveHost(hostId: HostId): Promise<number> {
  const side = new HostSide(hostId);
  const log = (m: string) => process.stdout.write(`[agent ${hostId}] ${m}\n`);
  await side.startEtcd();
  await side.startCapture();
  const server = net.createServer();
  let served = false;
  const done = new Promise<number>((resolve) => {
    const lifetime = setTimeout(() => {
      log(`no shutdown within ${AGENT_LIFETIME_MS} ms: giving up`);
      resolve(1);
    }, AGENT_LIFETIME_MS);
    server.on('connection', (sock) => {
      if (served) {
        sock.destroy();
        return;
      }
      served = true;
      log(`test connected from ${sock.remoteAddress}`);
      const lines = createInterface({ input: sock, crlfDelay: Infinity });
      let chain: Promise<void> = Promise.resolve();
      lines.on('line', (line) => {
        // One request at a time, in order: the guest's driver is not re-entrant.
        chain = chain.then(async () => {
          let id: unknown;
          try {
            if (line.length > MAX_REQUEST_BYTES) throw new Error(`request of ${line.length} bytes (limit ${MAX_REQUEST_BYTES})`);
            const req = JSON.parse(line) as { id: unknown; method: string; args?: unknown };
            id = req.id;
            if (req.method === 'shutdown') {
              sock.end(JSON.stringify({ id, result: null }) + '\n');
              clearTimeout(lifetime);
              resolve(0);
              return;
            }
            if (!(METHODS as readonly string[]).includes(req.method)) throw new Error(`unknown method ${JSON.stringify(req.method)}`);
            const fn = side[req.method as MethodName] as (a?: unknown) => unknown;
            const result = await fn.call(side, req.args);
            sock.write(JSON.stringify({ id, result: result ?? null }) + '\n');
          } catch (e) {
            sock.write(JSON.stringify({ id, error: (e as Error).stack ?? String(e) }) + '\n');
          }
        });
      });
      sock.on('close', () => {
        clearTimeout(lifetime);
        log('the test closed its connection');
        resolve(0);
      });
      sock.on('error', (e) => log(`connection error: ${e.message}`));
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(AGENT_PORT, HOST_ADDRESS[hostId], () => resolve());
  });
  log(`serving on ${HOST_ADDRESS[hostId]}:${AGENT_PORT}`);
  const code = await done;
  server.close();
  await side.stop();
  log(`stopped (exit ${code})`);
  return code;
}

/** The test's end of the protocol: HostSide's methods on the other host. */
export class RemoteHost implements Api {
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (v: any) => void; reject: (e: Error) => void }>();
  private closedWith: Error | undefined;

  private constructor(private readonly sock: net.Socket) {
    const lines = createInterface({ input: sock, crlfDelay: Infinity });
    lines.on('line', (line) => {
      const a = JSON.parse(line) as { id: number; result?: unknown; error?: string };
      const p = this.pending.get(a.id);
      if (p === undefined) return;
      this.pending.delete(a.id);
      if (a.error !== undefined) p.reject(new Error(`host 2: ${a.error}`));
      else p.resolve(a.result);
    });
    const fail = (e: Error) => {
      this.closedWith = e;
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
    };
    sock.on('error', (e) => fail(new Error(`agent connection: ${e.message}`)));
    sock.on('close', () => fail(new Error('agent connection closed')));
  }

  /** Connects to the agent, retrying until it listens (host 2 boots and starts node meanwhile). */
  static async connect(host: string, port: number, timeoutMs: number): Promise<RemoteHost> {
    const deadline = Date.now() + timeoutMs;
    let last = '';
    while (Date.now() < deadline) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection({ host, port });
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        return new RemoteHost(sock);
      } catch (e) {
        last = (e as Error).message;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
    throw new Error(`host 2's agent at ${host}:${port} not reachable within ${timeoutMs} ms (last: ${last})`);
  }

  private call(method: string, args?: unknown): Promise<any> {
    if (this.closedWith !== undefined) return Promise.reject(this.closedWith);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.sock.write(JSON.stringify({ id, method, args }) + '\n');
    });
  }

  async shutdown(): Promise<void> {
    await this.call('shutdown').catch(() => undefined);
    this.sock.destroy();
  }

  startBackend: Api['startBackend'] = () => this.call('startBackend');
  createQp: Api['createQp'] = () => this.call('createQp');
  connect: Api['connect'] = (a) => this.call('connect', a);
  write: Api['write'] = (a) => this.call('write', a);
  read: Api['read'] = (a) => this.call('read', a);
  postRecv: Api['postRecv'] = (a) => this.call('postRecv', a);
  postSend: Api['postSend'] = (a) => this.call('postSend', a);
  waitCompletions: Api['waitCompletions'] = (a) => this.call('waitCompletions', a);
  waitTeardown: Api['waitTeardown'] = (a) => this.call('waitTeardown', a);
  status: Api['status'] = () => this.call('status');
  kernelQps: Api['kernelQps'] = () => this.call('kernelQps');
  linkAddress: Api['linkAddress'] = () => this.call('linkAddress');
  captureReport: Api['captureReport'] = () => this.call('captureReport');
  killEtcd: Api['killEtcd'] = (a) => this.call('killEtcd', a);
  diagnostics: Api['diagnostics'] = (a) => this.call('diagnostics', a);
}
