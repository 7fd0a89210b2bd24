// A client of QEMU's machine protocol (QMP, docs/interop/qmp-spec.rst in QEMU): one JSON object per line each way.
// QEMU greets first ({"QMP": {"version": ..., "capabilities": [...]}}), the client leaves capabilities negotiation
// mode with `qmp_capabilities`, then sends {"execute", "arguments", "id"} and gets {"return", "id"} or
// {"error": {"class", "desc"}, "id"}. Asynchronous {"event", "data", "timestamp"} objects may arrive at any time,
// also between a command and its answer; they are kept (bounded) for tests to wait on.
//
// Like the qtest channel, QEMU connects to a socket this process listens on (QemuQtest starts it with a socket
// chardev in client mode and `-mon chardev=...,mode=control`), so there is no race with QEMU creating a socket.

import type net from 'node:net';

/** Longest line accepted from QEMU (query results are small; a longer line is a protocol error). */
export const MAX_QMP_LINE_CHARS = 1 << 20;
/** How long a command may take before the caller gets an error (device_add of a DIMM is milliseconds). */
export const QMP_COMMAND_TIMEOUT_MS = 30_000;
/** Events kept for waitEvent (oldest dropped first). */
export const MAX_KEPT_EVENTS = 256;

/** QEMU refused a command: its error class (GenericError, CommandNotFound, ...) and description. */
export class QmpError extends Error {
  override name = 'QmpError';
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
  }
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  match: (e: QmpEvent) => boolean;
  resolve: (e: QmpEvent) => void;
  reject: (error: Error) => void;
}

export class QmpClient {
  private buffered = '';
  private closedError: Error | undefined;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly waiters = new Set<EventWaiter>();
  private greetingResolve: ((g: QmpGreeting) => void) | undefined;
  private greetingReject: ((e: Error) => void) | undefined;
  /** The greeting, once QEMU sent it. */
  readonly greeting: Promise<QmpGreeting>;
  /** Asynchronous events received, oldest first (at most MAX_KEPT_EVENTS). */
  readonly events: QmpEvent[] = [];

  constructor(private readonly socket: net.Socket) {
    this.greeting = new Promise<QmpGreeting>((resolve, reject) => {
      this.greetingResolve = resolve;
      this.greetingReject = reject;
    });
    this.greeting.catch(() => undefined); // observed through handshake(); never an unhandled rejection
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (error) => this.fail(error));
    socket.on('close', () => this.fail(new Error('QMP: QEMU closed the connection')));
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  /** Waits for the greeting and leaves capabilities negotiation mode; returns the greeting. */
  async handshake(): Promise<QmpGreeting> {
    const g = await this.greeting;
    await this.execute('qmp_capabilities');
    return g;
  }

  /** Runs one command; resolves with its "return" value, rejects with QmpError when QEMU answers "error". */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = QMP_COMMAND_TIMEOUT_MS): Promise<T> {
    if (this.closedError !== undefined) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(`${JSON.stringify({ execute: command, ...(args !== undefined ? { arguments: args } : {}), id })}\n`);
    });
  }

  /** The first kept or future event `match` accepts (kept ones are searched first); rejects after `timeoutMs`. */
  waitEvent(match: (e: QmpEvent) => boolean, timeoutMs = QMP_COMMAND_TIMEOUT_MS): Promise<QmpEvent> {
    const seen = this.events.find(match);
    if (seen !== undefined) return Promise.resolve(seen);
    if (this.closedError !== undefined) return Promise.reject(this.closedError);
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        match,
        resolve: (e) => {
          clearTimeout(timer);
          resolve(e);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new Error(`QMP: no matching event within ${timeoutMs} ms (seen: ${this.events.map((e) => e.event).join(', ') || 'none'})`));
      }, timeoutMs);
      this.waiters.add(waiter);
    });
  }

  close(): void {
    this.socket.destroy();
    this.fail(new Error('QMP: client closed'));
  }

  private onData(chunk: string): void {
    this.buffered += chunk;
    let newline: number;
    while ((newline = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, newline).trim();
      this.buffered = this.buffered.slice(newline + 1);
      if (line.length > 0) this.onLine(line);
    }
    if (this.buffered.length > MAX_QMP_LINE_CHARS) {
      this.fail(new Error(`QMP: a line longer than ${MAX_QMP_LINE_CHARS} characters`));
      this.socket.destroy();
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(line);
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('not an object');
      msg = parsed as Record<string, unknown>;
    } catch (e) {
      this.fail(new Error(`QMP: a line that is not a JSON object (${(e as Error).message}): ${line.slice(0, 200)}`));
      this.socket.destroy();
      return;
    }
    if ('QMP' in msg) {
      this.greetingResolve?.(msg.QMP as QmpGreeting);
      this.greetingResolve = undefined;
      this.greetingReject = undefined;
      return;
    }
    if (typeof msg.event === 'string') {
      const e = msg as unknown as QmpEvent;
      this.events.push(e);
      if (this.events.length > MAX_KEPT_EVENTS) this.events.shift();
      for (const w of this.waiters) {
        if (!w.match(e)) continue;
        this.waiters.delete(w);
        w.resolve(e);
      }
      return;
    }
    const id = msg.id;
    const p = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (p === undefined) {
      // An answer to nothing we asked (or to a command that timed out): QEMU and this client disagree.
      this.fail(new Error(`QMP: an answer with no command pending: ${line.slice(0, 200)}`));
      this.socket.destroy();
      return;
    }
    this.pending.delete(id as number);
    clearTimeout(p.timer);
    if ('return' in msg) {
      p.resolve(msg.return);
      return;
    }
    const err = msg.error as { class?: unknown; desc?: unknown } | undefined;
    p.reject(new QmpError(p.command, String(err?.class ?? 'unknown'), String(err?.desc ?? line)));
  }

  private fail(error: Error): void {
    if (this.closedError !== undefined) return;
    this.closedError = error;
    this.greetingReject?.(error);
    this.greetingResolve = undefined;
    this.greetingReject = undefined;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this.pending.clear();
    for (const w of this.waiters) w.reject(error);
    this.waiters.clear();
  }
}
