// A small etcd v3 client over etcd's JSON gateway (HTTP, keys and values base64) with Node's fetch: range, put,
// delete and a streaming watch. Several endpoints (the members of a cluster): a failed request moves to the next.
// No npm package: the gateway is plain HTTP/JSON and ships with etcd (Debian's etcd-server 3.4 serves /v3/...).

import type { Logger } from '../util/log.ts';

/** How long one unary request (range, put, delete) may take before the endpoint counts as unreachable. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 2000;
/** Largest watch message line buffered (a response holds at most a transaction's events). */
export const MAX_WATCH_LINE_BYTES = 64 << 20;

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');
const unb64 = (s: string | undefined): string => (s === undefined ? '' : Buffer.from(s, 'base64').toString('utf8'));

/** The range_end that makes a range or watch cover every key starting with `prefix`. */
export function prefixEnd(prefix: string): string {
  const bytes = Buffer.from(prefix, 'utf8');
  for (let i = bytes.length - 1; i >= 0; i--) {
    if (bytes[i]! < 0xff) {
      const end = bytes.subarray(0, i + 1);
      end[i]!++;
      return end.toString('base64');
    }
  }
  return Buffer.from([0]).toString('base64'); // every key
}

export interface KeyValue {
  key: string;
  value: string;
  modRevision: number;
}

export interface WatchEvent {
  type: 'PUT' | 'DELETE';
  key: string;
  value: string;
  modRevision: number;
}

export class EtcdError extends Error {
  constructor(
    message: string,
    readonly endpoint: string,
  ) {
    super(`${endpoint}: ${message}`);
  }
}

interface RawKv {
  key?: string;
  value?: string;
  mod_revision?: string;
}

export interface EtcdClientOptions {
  /** http://host:port of each member. */
  endpoints: string[];
  log: Logger;
  requestTimeoutMs?: number;
}

export class EtcdClient {
  readonly endpoints: string[];
  private index = 0;
  private readonly log: Logger;
  private readonly timeoutMs: number;

  constructor(opts: EtcdClientOptions) {
    if (opts.endpoints.length === 0) throw new Error('etcd: at least one endpoint is needed');
    for (const e of opts.endpoints) if (!/^https?:\/\/[^/]+$/.test(e)) throw new Error(`etcd endpoint ${JSON.stringify(e)} is not http(s)://host:port`);
    this.endpoints = [...opts.endpoints];
    this.log = opts.log;
    this.timeoutMs = opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  }

  /** The endpoint requests go to now. */
  get endpoint(): string {
    return this.endpoints[this.index]!;
  }

  /** Moves to the next endpoint (after a failure). */
  rotate(): void {
    this.index = (this.index + 1) % this.endpoints.length;
  }

  /** One request to the current endpoint; on a failure to reach it, tries each other endpoint once. */
  private async call(path: string, body: unknown): Promise<any> {
    let last: unknown;
    for (let tries = 0; tries < this.endpoints.length; tries++) {
      const endpoint = this.endpoint;
      let res: Response;
      try {
        res = await fetch(`${endpoint}${path}`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify(body),
          signal: AbortSignal.timeout(this.timeoutMs),
        });
      } catch (e) {
        last = new EtcdError(`unreachable (${(e as Error).message})`, endpoint);
        this.log.log('debug', 'etcd endpoint unreachable', { endpoint, error: (e as Error).message });
        this.rotate();
        continue;
      }
      const text = await res.text();
      if (!res.ok) {
        last = new EtcdError(`HTTP ${res.status} for ${path}: ${text.slice(0, 200)}`, endpoint);
        // 5xx: this member cannot serve (no leader, shutting down): another may.
        if (res.status >= 500) {
          this.rotate();
          continue;
        }
        throw last;
      }
      return JSON.parse(text);
    }
    throw last;
  }

  /** Every key under `prefix`, and the store's revision the answer reflects. */
  async range(prefix: string): Promise<{ revision: number; kvs: KeyValue[] }> {
    const r = await this.call('/v3/kv/range', { key: b64(prefix), range_end: prefixEnd(prefix) });
    const kvs = ((r.kvs ?? []) as RawKv[]).map((kv) => ({ key: unb64(kv.key), value: unb64(kv.value), modRevision: Number(kv.mod_revision ?? 0) }));
    return { revision: Number(r.header?.revision ?? 0), kvs };
  }

  async put(key: string, value: string): Promise<number> {
    const r = await this.call('/v3/kv/put', { key: b64(key), value: b64(value) });
    return Number(r.header?.revision ?? 0);
  }

  /** The value of exactly `key`, or undefined. */
  async get(key: string): Promise<string | undefined> {
    const r = await this.call('/v3/kv/range', { key: b64(key) });
    const kv = ((r.kvs ?? []) as RawKv[])[0];
    return kv === undefined ? undefined : unb64(kv.value);
  }

  /** Puts `key` attached to lease `lease`: etcd deletes it when the lease expires (its backend died). */
  async putWithLease(key: string, value: string, lease: string): Promise<number> {
    const r = await this.call('/v3/kv/put', { key: b64(key), value: b64(value), lease });
    return Number(r.header?.revision ?? 0);
  }

  /** A lease of `ttlSeconds`; its id as etcd's gateway writes it (a decimal string: int64 does not fit a double). */
  async leaseGrant(ttlSeconds: number): Promise<string> {
    const r = await this.call('/v3/lease/grant', { TTL: String(ttlSeconds) });
    if (typeof r.ID !== 'string' && typeof r.ID !== 'number') throw new EtcdError('lease grant answered no ID', this.endpoint);
    return String(r.ID);
  }

  async leaseKeepAlive(lease: string): Promise<void> {
    await this.call('/v3/lease/keepalive', { ID: lease });
  }

  /** Revokes a lease: every key attached to it goes at once. */
  async leaseRevoke(lease: string): Promise<void> {
    await this.call('/v3/lease/revoke', { ID: lease });
  }

  async delete(key: string): Promise<number> {
    const r = await this.call('/v3/kv/deleterange', { key: b64(key) });
    return Number(r.header?.revision ?? 0);
  }

  /** Puts and deletes in one transaction: watchers see them as one revision (no half-written policy). */
  async txn(puts: { key: string; value: string }[], deletes: string[]): Promise<number> {
    const success = [
      ...puts.map((p) => ({ request_put: { key: b64(p.key), value: b64(p.value) } })),
      ...deletes.map((k) => ({ request_delete_range: { key: b64(k) } })),
    ];
    const r = await this.call('/v3/kv/txn', { compare: [], success });
    return Number(r.header?.revision ?? 0);
  }

  /**
   * Watches every key under `prefix` from `startRevision` on the current endpoint, calling `onEvents` with each
   * response's events and revision, until `signal` aborts (resolves) or the stream fails or ends (rejects: the
   * caller re-reads and watches again). A compacted start revision or a cancel rejects too.
   */
  async watch(prefix: string, startRevision: number, onEvents: (events: WatchEvent[], revision: number) => void, signal: AbortSignal): Promise<void> {
    const endpoint = this.endpoint;
    const body = { create_request: { key: b64(prefix), range_end: prefixEnd(prefix), start_revision: String(startRevision) } };
    let res: Response;
    try {
      res = await fetch(`${endpoint}/v3/watch`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal });
    } catch (e) {
      if (signal.aborted) return;
      throw new EtcdError(`watch unreachable (${(e as Error).message})`, endpoint);
    }
    if (!res.ok || res.body === null) throw new EtcdError(`watch answered HTTP ${res.status}`, endpoint);
    const decoder = new TextDecoder();
    let buffered = '';
    try {
      for await (const chunk of res.body) {
        buffered += decoder.decode(chunk as Uint8Array, { stream: true });
        if (buffered.length > MAX_WATCH_LINE_BYTES) throw new EtcdError('a watch message exceeds the size limit', endpoint);
        let nl: number;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, nl).trim();
          buffered = buffered.slice(nl + 1);
          if (line !== '') this.watchLine(line, endpoint, onEvents);
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      throw e instanceof EtcdError ? e : new EtcdError(`watch stream failed (${(e as Error).message})`, endpoint);
    }
    if (signal.aborted) return;
    throw new EtcdError('watch stream ended', endpoint);
  }

  private watchLine(line: string, endpoint: string, onEvents: (events: WatchEvent[], revision: number) => void): void {
    const msg = JSON.parse(line) as { result?: any; error?: { message?: string } };
    if (msg.error !== undefined) throw new EtcdError(`watch error: ${msg.error.message ?? JSON.stringify(msg.error)}`, endpoint);
    const r = msg.result;
    if (r === undefined) return;
    if (r.compact_revision !== undefined && Number(r.compact_revision) > 0) throw new EtcdError(`watch start revision compacted (now ${r.compact_revision})`, endpoint);
    if (r.canceled === true) throw new EtcdError(`watch canceled: ${r.cancel_reason ?? ''}`, endpoint);
    const events = ((r.events ?? []) as { type?: string; kv?: RawKv }[]).map((e) => ({
      type: e.type === 'DELETE' ? ('DELETE' as const) : ('PUT' as const),
      key: unb64(e.kv?.key),
      value: unb64(e.kv?.value),
      modRevision: Number(e.kv?.mod_revision ?? 0),
    }));
    if (events.length > 0) onEvents(events, Number(r.header?.revision ?? 0));
  }
}
