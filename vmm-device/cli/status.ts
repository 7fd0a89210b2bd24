// The operator's view over a Unix socket: `vrdma-backend --status-socket PATH` serves it, `vrdma-backend status
// --status-socket PATH [--vm ID]` prints it. Protocol: the client writes one JSON line (`{}` or `{"vm":"a1"}`), the
// server answers one JSON line and closes. Bad requests get `{"error": ...}` and are counted, never a crash.
// `{"dump":true}` asks the backend to write its flight recorder's window (answer `{"dumped": FILE}`).

import net from 'node:net';
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import type { Logger } from '../util/log.ts';

/** Largest request line (a VM id is at most 128 characters). */
export const MAX_STATUS_REQUEST_BYTES = 4096;
/** A client that sends no complete line within this is dropped. */
export const STATUS_REQUEST_TIMEOUT_MS = 5000;
/** Largest answer the `status` command reads (a host's whole view with thousands of QPs fits). */
export const MAX_STATUS_ANSWER_BYTES = 64 << 20;
/** Only the owner (the operator running the backend) may read the view. */
const STATUS_SOCKET_MODE = 0o600;

export interface StatusServerMetrics {
  answered: number;
  badRequests: number;
}

export interface StatusServer {
  close(): Promise<void>;
  readonly metrics: StatusServerMetrics;
}

/** Removes a stale socket left by a previous run; refuses to remove anything that is not a socket. */
function clearStale(path: string): void {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new Error(`--status-socket ${path}: exists and is not a socket`);
  unlinkSync(path);
}

/** Serves `answer(vm)` on a Unix socket at `path`. */
export async function serveStatus(
  path: string,
  answer: (vm: string | undefined) => unknown,
  log: Logger,
  dump?: (trigger: string) => string | undefined,
): Promise<StatusServer> {
  clearStale(path);
  const metrics: StatusServerMetrics = { answered: 0, badRequests: 0 };
  const server = net.createServer((sock) => {
    let buf = '';
    const refuse = (why: string) => {
      metrics.badRequests++;
      log.log('warn', 'status request refused', { why });
      sock.end(JSON.stringify({ error: why }) + '\n');
    };
    sock.setEncoding('utf8');
    sock.setTimeout(STATUS_REQUEST_TIMEOUT_MS, () => {
      metrics.badRequests++;
      sock.destroy();
    });
    sock.on('error', () => undefined); // a client that went away: nothing to answer
    sock.on('data', (chunk: string) => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl < 0) {
        if (buf.length > MAX_STATUS_REQUEST_BYTES) refuse(`request longer than ${MAX_STATUS_REQUEST_BYTES} bytes without a newline`);
        return;
      }
      sock.removeAllListeners('data');
      let req: unknown;
      try {
        req = JSON.parse(buf.slice(0, nl) || '{}');
      } catch {
        return refuse('request is not JSON: send {} or {"vm":"ID"} and a newline');
      }
      if (req === null || typeof req !== 'object' || Array.isArray(req)) return refuse('request must be a JSON object');
      const vm = (req as { vm?: unknown }).vm;
      if (vm !== undefined && typeof vm !== 'string') return refuse('"vm" must be a string');
      const wantsDump = (req as { dump?: unknown }).dump;
      if (wantsDump !== undefined && typeof wantsDump !== 'boolean') return refuse('"dump" must be true or false');
      let body: unknown;
      try {
        if (wantsDump === true) {
          const file = dump?.('status --dump');
          if (file === undefined) return refuse('no flight recorder to dump (started with --flight-events 0?)');
          body = { dumped: file };
        } else body = answer(vm);
      } catch (e) {
        return refuse((e as Error).message);
      }
      metrics.answered++;
      sock.end(JSON.stringify(body) + '\n');
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`--status-socket ${path}: ${e.message}`)));
    server.listen(path, () => resolve());
  });
  chmodSync(path, STATUS_SOCKET_MODE);
  return {
    metrics,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        try {
          unlinkSync(path);
        } catch {
          // already gone
        }
      }),
  };
}

/** Asks a backend's status socket; the answer as parsed JSON. */
export async function queryStatus(path: string, vm?: string, timeoutMs = STATUS_REQUEST_TIMEOUT_MS, dump = false): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection(path);
    let buf = '';
    sock.setEncoding('utf8');
    sock.setTimeout(timeoutMs, () => {
      sock.destroy();
      reject(new Error(`--status-socket ${path}: no answer within ${timeoutMs} ms`));
    });
    sock.on('connect', () => sock.write(JSON.stringify(dump ? { dump: true } : vm === undefined ? {} : { vm }) + '\n'));
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > MAX_STATUS_ANSWER_BYTES) {
        sock.destroy();
        reject(new Error(`--status-socket ${path}: answer larger than ${MAX_STATUS_ANSWER_BYTES} bytes`));
      }
    });
    sock.on('error', (e) => reject(new Error(`--status-socket ${path}: ${e.message}`)));
    sock.on('end', () => {
      try {
        resolve(JSON.parse(buf));
      } catch {
        reject(new Error(`--status-socket ${path}: the answer is not JSON`));
      }
    });
  });
}
