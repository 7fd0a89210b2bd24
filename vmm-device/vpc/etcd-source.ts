// The shared control plane: the policy document's parts under keys of an etcd cluster that many hosts' backends
// watch. Layout under a prefix P (e.g. /vrdma/vpc/):
//
//   P settings        {"version":1,"provider":{...},"defaultQuotas":{...}}
//   P hosts/<id>      one host      P tenants/<id>   one tenant
//   P vpcs/<id>       one VPC       P vms/<id>       one VM
//
// The backend reads the prefix (range, with the store's revision), validates the assembled document, applies it,
// and watches from the next revision; every watch response is re-assembled and re-validated (an invalid state is
// refused with the key and field in the log, the last good one stays in force). When etcd is unreachable the
// backend keeps enforcing its last known state, says so (log line, `connected` metric), and when a member answers
// again it re-reads with the revision and catches up. publishPolicy() writes a whole document in one transaction.

import { performance } from 'node:perf_hooks';
import type { Logger } from '../util/log.ts';
import type { VpcEngine } from './engine.ts';
import { EtcdClient, type KeyValue } from './etcd-client.ts';
import { PolicyValidator, type ValidationMode } from './incremental.ts';
import type { PolicyDocument, PolicyInput } from './schema.ts';

/** How often the backend checks that its etcd member still answers (a hung member never ends the watch). */
export const DEFAULT_HEALTH_INTERVAL_MS = 500;
/**
 * Failed health checks in a row before the member counts as gone. A killed member also ends the watch stream at
 * once; this is for a member that hangs, and one slow answer on a loaded machine must not count as an outage.
 */
export const HEALTH_FAILURES_BEFORE_DOWN = 3;
/** Wait between reconnection attempts: doubles from the first to the last. */
export const RECONNECT_MIN_MS = 100;
export const RECONNECT_MAX_MS = 2000;
/** Errors quoted in one log line. */
const ERRORS_PER_LINE = 5;

const LISTS = ['hosts', 'tenants', 'vpcs', 'vms'] as const;
type ListName = (typeof LISTS)[number];
export const SETTINGS_KEY = 'settings';

export interface EtcdSourceMetrics {
  /** False while no member answers: the last known state is enforced. */
  connected: boolean;
  /** Store revision of the state last read (applied or refused). */
  revision: number;
  /** Revision of the state in force. */
  appliedRevision: number;
  applied: number;
  rejected: number;
  disconnects: number;
  /** Re-reads after a disconnect. */
  catchUps: number;
  unreachableSince: number | undefined;
  lastError: string | undefined;
  endpoint: string;
}

export interface EtcdPolicySourceOptions {
  client: EtcdClient;
  /** Key prefix, ending in "/". */
  prefix: string;
  engine: VpcEngine;
  log: Logger;
  healthIntervalMs?: number;
  /** 'incremental' (default): only new and changed entries are validated (incremental.ts); 'full': all of them. */
  validation?: ValidationMode;
}

/** A key's value as last parsed: an unchanged key hands the validator the very same object (nothing to compare). */
type ParseCache = Map<string, { text: string; value: unknown }>;

/** The assembled document, and which key each list entry came from (for error messages). */
function assemble(prefix: string, kvs: Map<string, string>, cache: ParseCache): { value: unknown; keyOf: Map<string, string>; errors: string[] } {
  const errors: string[] = [];
  const doc: Record<string, unknown> = {};
  const keyOf = new Map<string, string>();
  for (const key of [...cache.keys()]) if (!kvs.has(key)) cache.delete(key); // bounded by the keys in the store
  const parse = (key: string, text: string): unknown => {
    const known = cache.get(key);
    if (known !== undefined && known.text === text) return known.value;
    try {
      const value: unknown = JSON.parse(text);
      cache.set(key, { text, value });
      return value;
    } catch (e) {
      errors.push(`key ${key}: not JSON: ${(e as Error).message}`);
      return undefined;
    }
  };
  const settings = kvs.get(prefix + SETTINGS_KEY);
  if (settings === undefined) errors.push(`key ${prefix}${SETTINGS_KEY}: missing (it holds version, provider and defaultQuotas)`);
  else {
    const s = parse(prefix + SETTINGS_KEY, settings);
    if (s !== null && typeof s === 'object' && !Array.isArray(s)) Object.assign(doc, s);
    else if (s !== undefined) errors.push(`key ${prefix}${SETTINGS_KEY}: must be a JSON object`);
  }
  for (const list of LISTS) {
    const items: unknown[] = [];
    const keys = [...kvs.keys()].filter((k) => k.startsWith(`${prefix}${list}/`)).sort();
    for (const key of keys) {
      const item = parse(key, kvs.get(key)!);
      if (item === undefined) continue;
      const id = key.slice(`${prefix}${list}/`.length);
      if (item === null || typeof item !== 'object' || (item as { id?: unknown }).id !== id) {
        errors.push(`key ${key}: its value's "id" must be ${JSON.stringify(id)}, the last part of the key`);
      }
      keyOf.set(`${list}[${items.length}]`, key);
      items.push(item);
    }
    doc[list] = items;
  }
  return { value: doc, keyOf, errors };
}

export class EtcdPolicySource {
  private readonly client: EtcdClient;
  readonly prefix: string;
  private readonly engine: VpcEngine;
  private readonly log: Logger;
  private readonly healthIntervalMs: number;
  private kvs = new Map<string, string>();
  private stopped = false;
  private loop: Promise<void> | undefined;
  private watchAbort: AbortController | undefined;
  private readonly parsed: ParseCache = new Map();
  /** Validates each state against the last one accepted (the one in force). */
  readonly validator: PolicyValidator;
  private resolveReady!: () => void;
  /** Resolves when the first valid state is in force. */
  readonly ready: Promise<void>;
  readonly metrics: EtcdSourceMetrics;
  private readonly listeners = new Set<(m: EtcdSourceMetrics) => void>();

  constructor(opts: EtcdPolicySourceOptions) {
    if (!opts.prefix.endsWith('/')) throw new Error(`etcd prefix ${JSON.stringify(opts.prefix)} must end with "/"`);
    this.client = opts.client;
    this.prefix = opts.prefix;
    this.engine = opts.engine;
    this.log = opts.log;
    this.healthIntervalMs = opts.healthIntervalMs ?? DEFAULT_HEALTH_INTERVAL_MS;
    this.validator = new PolicyValidator(opts.validation);
    this.ready = new Promise((r) => (this.resolveReady = r));
    this.metrics = {
      connected: false,
      revision: 0,
      appliedRevision: 0,
      applied: 0,
      rejected: 0,
      disconnects: 0,
      catchUps: 0,
      unreachableSince: undefined,
      lastError: undefined,
      endpoint: this.client.endpoint,
    };
  }

  /** Called after every change of the metrics (tests wait on it; an exporter can too). */
  onChange(listener: (m: EtcdSourceMetrics) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private changed(): void {
    this.metrics.endpoint = this.client.endpoint;
    for (const l of this.listeners) l(this.metrics);
  }

  start(): void {
    if (this.loop !== undefined) throw new Error('the etcd policy source is already started');
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.watchAbort?.abort();
    await this.loop;
  }

  private async run(): Promise<void> {
    let backoff = RECONNECT_MIN_MS;
    let everConnected = false;
    while (!this.stopped) {
      const abort = new AbortController();
      this.watchAbort = abort;
      let health: NodeJS.Timeout | undefined;
      try {
        const snap = await this.client.range(this.prefix);
        if (this.stopped) break;
        const observedAt = performance.now();
        if (!this.metrics.connected) {
          if (everConnected) {
            this.metrics.catchUps++;
            this.log.log('info', 'etcd reachable again: catching up', { endpoint: this.client.endpoint, from: this.metrics.revision, to: snap.revision });
          }
          this.metrics.connected = true;
          this.metrics.unreachableSince = undefined;
        }
        everConnected = true;
        backoff = RECONNECT_MIN_MS;
        this.kvs = new Map(snap.kvs.map((kv: KeyValue) => [kv.key, kv.value]));
        this.evaluate(snap.revision, observedAt);
        // A member that stops answering (killed, partitioned, lost its quorum) does not always end the stream.
        let failures = 0;
        let checking = false;
        health = setInterval(() => {
          if (checking) return; // one check at a time: a slow one is not several failures
          checking = true;
          this.client
            .range(`${this.prefix}${SETTINGS_KEY}`)
            .then(() => (failures = 0))
            .catch((e: Error) => {
              this.metrics.lastError = e.message;
              if (++failures >= HEALTH_FAILURES_BEFORE_DOWN) abort.abort();
            })
            .finally(() => (checking = false));
        }, this.healthIntervalMs);
        const endpoint = this.client.endpoint;
        await this.client.watch(
          this.prefix,
          snap.revision + 1,
          (events, revision) => {
            const at = performance.now();
            for (const e of events) {
              if (e.type === 'DELETE') this.kvs.delete(e.key);
              else this.kvs.set(e.key, e.value);
            }
            this.evaluate(revision, at);
          },
          abort.signal,
        );
        if (this.stopped) break;
        // The health check aborted the watch: the member stopped answering.
        throw new Error(this.metrics.lastError ?? `etcd member ${endpoint} stopped answering`);
      } catch (e) {
        if (this.stopped) break;
        this.metrics.lastError = (e as Error).message;
        if (this.metrics.connected || !everConnected) {
          if (this.metrics.connected) {
            this.metrics.disconnects++;
            this.metrics.connected = false;
            this.metrics.unreachableSince = Date.now();
          }
          this.log.log('warn', everConnected ? 'etcd unreachable: enforcing the last known policy' : 'etcd unreachable: no policy yet', {
            endpoint: this.client.endpoint,
            revision: this.metrics.appliedRevision,
            error: (e as Error).message,
          });
          this.changed();
        }
        this.client.rotate();
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, RECONNECT_MAX_MS);
      } finally {
        if (health !== undefined) clearInterval(health);
      }
    }
  }

  /** Validates the state of `revision` and applies it when it is valid and differs from the one in force. */
  private evaluate(revision: number, observedAt: number): void {
    this.metrics.revision = revision;
    const { value, keyOf, errors } = assemble(this.prefix, this.kvs, this.parsed);
    let policy: PolicyDocument | undefined;
    let unchanged = false;
    if (errors.length === 0) {
      const r = this.validator.validate(value, { compare: true });
      if (r.ok) {
        policy = r.policy;
        unchanged = r.unchanged;
      }
      else {
        for (const err of r.errors) {
          const m = /^(\w+\[\d+\])/.exec(err);
          const key = m === null ? undefined : keyOf.get(m[1]!);
          errors.push(key === undefined ? err : `key ${key}: ${err}`);
        }
      }
    }
    if (policy === undefined) {
      this.metrics.rejected++;
      this.metrics.lastError = errors[0];
      const more = errors.length > ERRORS_PER_LINE ? ` (and ${errors.length - ERRORS_PER_LINE} more)` : '';
      this.log.log('error', `etcd policy refused: ${errors.slice(0, ERRORS_PER_LINE).join('; ')}${more}`, {
        revision,
        inForce: this.engine.hasPolicy ? `etcd revision ${this.metrics.appliedRevision}` : 'none',
      });
      this.changed();
      return;
    }
    if (!unchanged) {
      this.engine.apply(policy, { source: `etcd revision ${revision}`, observedAt });
      this.metrics.applied++;
    }
    this.metrics.appliedRevision = revision;
    this.changed();
    this.resolveReady();
  }
}

/** A document to publish: validated by every backend that reads it, not by the writer (which may be a test). */
export type PolicyParts = Record<ListName, { id: string }[]> & Record<string, unknown>;

/** The key/value pairs that hold a document under `prefix`. */
export function policyKeys(prefix: string, doc: PolicyInput | PolicyParts): Map<string, string> {
  const out = new Map<string, string>();
  const { hosts, tenants, vpcs, vms, ...settings } = doc;
  out.set(prefix + SETTINGS_KEY, JSON.stringify(settings));
  const lists: Record<ListName, { id: string }[]> = { hosts, tenants, vpcs, vms };
  for (const list of LISTS) for (const item of lists[list]) out.set(`${prefix}${list}/${item.id}`, JSON.stringify(item));
  return out;
}

/** Writes `doc` under `prefix` in one transaction, deleting the keys of parts it no longer has. Returns the revision. */
export async function publishPolicy(client: EtcdClient, prefix: string, doc: PolicyInput | PolicyParts): Promise<number> {
  const want = policyKeys(prefix, doc);
  const have = await client.range(prefix);
  const deletes = have.kvs.map((kv) => kv.key).filter((k) => !want.has(k));
  const current = new Map(have.kvs.map((kv) => [kv.key, kv.value]));
  const puts = [...want].filter(([k, v]) => current.get(k) !== v).map(([key, value]) => ({ key, value }));
  if (puts.length === 0 && deletes.length === 0) return have.revision;
  return client.txn(puts, deletes);
}
