// The QPN registry across hosts (issue 12 item 1): each backend publishes the wire QPNs of its VM under
// `<prefix><host GID hex>/<qpn>` = {"vm", "peer"?}, attached to a lease it keeps alive, so the keys of a backend that
// died expire with its QPs. A backend checking a connection to another host's QPN reads exactly that key.
//
// Publishing is asynchronous (an HTTP round trip) and ordered per backend; a guest usually hands its QPN to the peer
// right after CREATE_QP, so a lookup that finds no key waits a little (LOOKUP_GRACE_MS) for a publish in flight.
// etcd unreachable: the lookup is `unverifiable` and the connection is refused (never allowed unchecked).

import type { GidKey } from '../rdma/address-resolver.ts';
import type { QpLookup, QpRegistry } from '../rdma/qp-ownership.ts';
import type { Logger } from '../util/log.ts';
import type { EtcdClient } from './etcd-client.ts';

/** The registry's key prefix when none is given: apart from the policy's (its watcher must not see these keys). */
export const DEFAULT_QPN_PREFIX = '/vrdma/qpn/';
/** Lease TTL: a dead backend's QPNs are gone from etcd at most this long after it died. */
export const QPN_LEASE_TTL_S = 10;
/** How long a lookup that finds no key retries (a peer's publish may still be in flight). */
export const LOOKUP_GRACE_MS = 1000;
const LOOKUP_RETRY_MS = 100;

export interface EtcdQpRegistryOptions {
  client: EtcdClient;
  prefix?: string;
  log: Logger;
  ttlSeconds?: number;
  graceMs?: number;
}

export class EtcdQpRegistry implements QpRegistry {
  private readonly client: EtcdClient;
  private readonly prefix: string;
  private readonly log: Logger;
  private readonly ttl: number;
  private readonly graceMs: number;
  private lease: string | undefined;
  private keepAlive: NodeJS.Timeout | undefined;
  /** Publishes in order: a destroy never overtakes its create. */
  private tail: Promise<void> = Promise.resolve();
  readonly metrics = { published: 0, failed: 0, lookups: 0 };

  constructor(opts: EtcdQpRegistryOptions) {
    this.client = opts.client;
    this.prefix = opts.prefix ?? DEFAULT_QPN_PREFIX;
    this.log = opts.log;
    this.ttl = opts.ttlSeconds ?? QPN_LEASE_TTL_S;
    this.graceMs = opts.graceMs ?? LOOKUP_GRACE_MS;
  }

  /** Grants the lease and keeps it alive. */
  async start(): Promise<void> {
    this.lease = await this.client.leaseGrant(this.ttl);
    this.keepAlive = setInterval(() => {
      if (this.lease !== undefined) {
        this.client.leaseKeepAlive(this.lease).catch((e: unknown) => this.log.log('warn', 'QPN lease keep-alive failed', { error: (e as Error).message }));
      }
    }, (this.ttl * 1000) / 3);
    this.keepAlive.unref();
  }

  /** Waits for the publishes so far (tests, shutdown). */
  async settled(): Promise<void> {
    await this.tail;
  }

  /** Revokes the lease: this backend's QPNs leave etcd at once. */
  async stop(): Promise<void> {
    if (this.keepAlive !== undefined) clearInterval(this.keepAlive);
    await this.tail;
    const lease = this.lease;
    this.lease = undefined;
    if (lease !== undefined) await this.client.leaseRevoke(lease).catch(() => undefined);
  }

  private key(host: GidKey, qpn: number): string {
    return `${this.prefix}${host}/${qpn >>> 0}`;
  }

  private enqueue(what: string, op: () => Promise<unknown>): void {
    this.tail = this.tail.then(async () => {
      try {
        await op();
        this.metrics.published++;
      } catch (e) {
        this.metrics.failed++;
        this.log.log('warn', 'QPN registry: publish failed', { what, error: (e as Error).message });
      }
    });
  }

  created(host: GidKey, qpn: number, vm: string): void {
    this.put(host, qpn, { vm });
  }

  connected(host: GidKey, qpn: number, vm: string, peer: { vm: string; qpn: number }): void {
    this.put(host, qpn, { vm, peer: { vm: peer.vm, qpn: peer.qpn } });
  }

  private put(host: GidKey, qpn: number, record: object): void {
    const key = this.key(host, qpn);
    this.enqueue(key, () => {
      if (this.lease === undefined) throw new Error('the registry is not started');
      return this.client.putWithLease(key, JSON.stringify(record), this.lease);
    });
  }

  destroyed(host: GidKey, qpn: number, _vm: string): void {
    const key = this.key(host, qpn);
    this.enqueue(key, () => this.client.delete(key));
  }

  async lookup(host: GidKey, qpn: number): Promise<QpLookup> {
    this.metrics.lookups++;
    const deadline = Date.now() + this.graceMs;
    for (;;) {
      let text: string | undefined;
      try {
        text = await this.client.get(this.key(host, qpn));
      } catch (e) {
        this.log.log('warn', 'QPN registry: etcd unreachable, connection refused', { error: (e as Error).message });
        return 'unverifiable';
      }
      if (text !== undefined) return parseRecord(text);
      if (Date.now() >= deadline) return undefined;
      await new Promise((r) => setTimeout(r, LOOKUP_RETRY_MS));
    }
  }
}

function parseRecord(text: string): QpLookup {
  try {
    const j = JSON.parse(text) as { vm?: unknown; peer?: { vm?: unknown; qpn?: unknown } };
    if (typeof j.vm !== 'string') return undefined;
    if (j.peer === undefined) return { vm: j.vm };
    if (typeof j.peer.vm !== 'string' || typeof j.peer.qpn !== 'number') return undefined;
    return { vm: j.vm, peer: { vm: j.peer.vm, qpn: j.peer.qpn } };
  } catch {
    return undefined;
  }
}
