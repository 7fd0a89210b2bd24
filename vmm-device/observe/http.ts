// The metrics endpoint: GET /metrics answers the Prometheus text exposition; anything else gets 404 or 405. It
// listens on loopback unless the operator explicitly allows another address (the counters name VMs and tenants).

import http from 'node:http';
import net from 'node:net';
import type { Logger } from '../util/log.ts';
import type { BackendMetrics } from './metrics.ts';

/** A scraper that does not finish its request within this is dropped. */
export const METRICS_REQUEST_TIMEOUT_MS = 10_000;
/** Scrapes served at once; more wait in the kernel's backlog (a scrape walks every VM's state). */
export const MAX_METRICS_CONNECTIONS = 16;

/** True for 127.0.0.0/8, ::1, ::ffff:127.x.y.z and the name localhost. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  const h = host.replace(/^\[|\]$/g, '');
  if (net.isIPv4(h)) return h.startsWith('127.');
  if (net.isIPv6(h)) return h === '::1' || /^::ffff:127\./i.test(h);
  return false;
}

export interface MetricsServer {
  readonly port: number;
  readonly host: string;
  close(): Promise<void>;
  /** Scrapes answered, bad requests refused. */
  readonly served: { scrapes: number; refused: number };
}

export async function serveMetrics(host: string, port: number, metrics: BackendMetrics, log: Logger): Promise<MetricsServer> {
  const served = { scrapes: 0, refused: 0 };
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '').split('?')[0];
    if (path !== '/metrics') {
      served.refused++;
      res.writeHead(404, { 'content-type': 'text/plain' }).end('only /metrics is served here\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      served.refused++;
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('GET /metrics\n');
      return;
    }
    metrics.text().then(
      (body) => {
        served.scrapes++;
        res.writeHead(200, { 'content-type': metrics.contentType }).end(req.method === 'HEAD' ? undefined : body);
      },
      (e: Error) => {
        log.log('error', 'metrics collection failed', { error: e.message });
        res.writeHead(500, { 'content-type': 'text/plain' }).end(`collection failed: ${e.message}\n`);
      },
    );
  });
  server.requestTimeout = METRICS_REQUEST_TIMEOUT_MS;
  server.headersTimeout = METRICS_REQUEST_TIMEOUT_MS;
  server.maxConnections = MAX_METRICS_CONNECTIONS;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`--metrics ${host}:${port}: ${e.message}`)));
    server.listen(port, host.replace(/^\[|\]$/g, ''), () => resolve());
  });
  const addr = server.address() as net.AddressInfo;
  log.log('info', 'metrics served', { url: `http://${host.includes(':') && !host.startsWith('[') ? `[${host}]` : host}:${addr.port}/metrics` });
  return {
    port: addr.port,
    host,
    served,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
