// The embedded control plane: one local JSON policy file, reloaded on change without restarting the backend.
// fs.watch on the file's directory (editors replace files by rename, which a watch on the file itself loses). A
// change event reads the file at once (a teardown waits for it): a complete valid document is applied then; one
// that does not parse or validate may be half-written, so it is refused only when the file has been quiet for the
// debounce time and still reads the same (a log line naming the field; the last good policy stays in force).

import { EventEmitter } from 'node:events';
import { readFileSync, watch, type FSWatcher } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../util/log.ts';
import type { VpcEngine } from './engine.ts';
import { PolicyValidator, type ValidationMode } from './incremental.ts';

/**
 * Quiet time after the last change event before a file that does not parse or validate is refused. An editor's
 * save (a write, or a write to a temporary file and a rename) lands within a few milliseconds, and a half-written
 * file is not a valid document (the text of a JSON object is complete only at its last "}"), so a valid read is
 * applied at once and never waits for this: issue 12 item 9 wants connections down within 100 ms of a change
 * reaching the backend. An invalid read waits, so a save in progress is not logged as a refusal.
 */
export const DEFAULT_DEBOUNCE_MS = 20;
/** Largest policy file read (65,536 VMs with rules fit well within it). */
export const MAX_POLICY_FILE_BYTES = 64 << 20;
/** Errors quoted in one log line (the rest are counted). */
const ERRORS_PER_LINE = 5;

export interface FileSourceMetrics {
  loaded: number;
  rejected: number;
  lastError: string | undefined;
}

export interface FilePolicySourceOptions {
  path: string;
  engine: VpcEngine;
  log: Logger;
  debounceMs?: number;
  /** 'incremental' (default): only new and changed entries are validated (incremental.ts); 'full': all of them. */
  validation?: ValidationMode;
}

export type LoadOutcome = { ok: true; version: number; tornDown: number; latencyMs: number } | { ok: false; errors: string[] };

/** Emits 'applied' (LoadOutcome ok) and 'rejected' (LoadOutcome not ok) after each reload. */
export class FilePolicySource extends EventEmitter {
  readonly path: string;
  private readonly engine: VpcEngine;
  private readonly log: Logger;
  private readonly debounceMs: number;
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private firstEventAt: number | undefined;
  private lastText: string | undefined;
  private immediate: NodeJS.Immediate | undefined;
  /** The last text that did not validate, and its errors (the quiet-time refusal does not validate it again). */
  private invalid: { text: string; errors: string[] } | undefined;
  /** Validates each read against the last document accepted. */
  readonly validator: PolicyValidator;
  readonly metrics: FileSourceMetrics = { loaded: 0, rejected: 0, lastError: undefined };

  constructor(opts: FilePolicySourceOptions) {
    super();
    this.path = resolve(opts.path);
    this.engine = opts.engine;
    this.log = opts.log;
    this.debounceMs = opts.debounceMs ?? DEFAULT_DEBOUNCE_MS;
    this.validator = new PolicyValidator(opts.validation);
  }

  /** Loads the file (an invalid one is an error: the backend has no policy to start with) and watches it. */
  start(): void {
    const first = this.load(performance.now());
    if (first !== undefined && !first.ok) throw new Error(`policy file ${this.path}: ${first.errors.join('; ')}`);
    const name = basename(this.path);
    this.watcher = watch(dirname(this.path), (_event, file) => {
      if (file !== null && file !== name) return;
      this.firstEventAt ??= performance.now();
      // Events of one save often come in a burst (a rename is two): one read for those of the same turn.
      this.immediate ??= setImmediate(() => this.attempt());
      if (this.timer !== undefined) clearTimeout(this.timer);
      this.timer = setTimeout(() => this.reload(), this.debounceMs);
    });
    this.watcher.on('error', (e) => this.log.log('error', 'policy file watch failed', { path: this.path, error: e.message }));
  }

  stop(): void {
    this.watcher?.close();
    this.watcher = undefined;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.immediate !== undefined) clearImmediate(this.immediate);
    this.immediate = undefined;
  }

  /** Right after a change event: applies the file when it is a valid document; anything else waits for reload(). */
  private attempt(): void {
    this.immediate = undefined;
    const outcome = this.load(this.firstEventAt ?? performance.now(), false);
    if (outcome === undefined) return; // invalid for now (or unchanged): the quiet timer decides
    this.firstEventAt = undefined;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.emit('applied', outcome);
  }

  /** The file has been quiet for the debounce time: applied, or refused with its errors. */
  private reload(): void {
    this.timer = undefined;
    const at = this.firstEventAt ?? performance.now();
    this.firstEventAt = undefined;
    const outcome = this.load(at, true);
    if (outcome !== undefined) this.emit(outcome.ok ? 'applied' : 'rejected', outcome);
  }

  /**
   * Reads, validates and applies; undefined when the text did not change (a touch, or a write of the same bytes),
   * or when it is invalid and `refuseInvalid` is false. An invalid text is validated once: its errors are kept for
   * the refusal.
   */
  private load(observedAt: number, refuseInvalid = true): LoadOutcome | undefined {
    const refuse = (errors: string[]): LoadOutcome | undefined => {
      if (!refuseInvalid) return undefined;
      this.metrics.rejected++;
      this.metrics.lastError = errors[0];
      const more = errors.length > ERRORS_PER_LINE ? ` (and ${errors.length - ERRORS_PER_LINE} more)` : '';
      this.log.log('error', `policy file refused: ${errors.slice(0, ERRORS_PER_LINE).join('; ')}${more}`, {
        path: this.path,
        inForce: this.engine.hasPolicy ? `version ${this.engine.metrics.policyVersion} from ${this.engine.metrics.policySource}` : 'none',
      });
      return { ok: false, errors };
    };
    let text: string;
    try {
      text = readFileSync(this.path, 'utf8');
    } catch (e) {
      return refuse([`(file): cannot read it: ${(e as Error).message}`]);
    }
    if (Buffer.byteLength(text) > MAX_POLICY_FILE_BYTES) return refuse([`(file): larger than ${MAX_POLICY_FILE_BYTES} bytes`]);
    if (text === this.lastText) return undefined;
    if (this.invalid !== undefined && this.invalid.text === text) return refuse(this.invalid.errors);
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      return refuse([`(document): not JSON: ${(e as Error).message}`]);
    }
    const parsed = this.validator.validate(json);
    if (!parsed.ok) {
      this.invalid = { text, errors: parsed.errors };
      return refuse(parsed.errors);
    }
    this.invalid = undefined;
    const r = this.engine.apply(parsed.policy, { source: this.path, observedAt });
    this.lastText = text;
    this.metrics.loaded++;
    this.metrics.lastError = undefined;
    return { ok: true, version: r.version, tornDown: r.tornDown, latencyMs: r.teardownLatencyMs };
  }
}
