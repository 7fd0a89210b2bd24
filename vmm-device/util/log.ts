// The logger the layers share: `log.log(level, message, fields)` and `child(component)`. Two formats for the same
// records: JSON lines through pino (one object per line: level, time, pid, component, msg and the fields as
// top-level keys; what log collectors ingest), and the human format `level component: message key=value ...` that
// operators grep. Both write through process.stderr (not pino's own fd writer) so the lines of every component stay
// in one order and a test can capture them. Tests pass a recording logger to assert what was reported.

import pino from 'pino';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type LogFormat = 'json' | 'human';
export const LOG_FORMATS: readonly LogFormat[] = ['json', 'human'];

export interface Logger {
  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void;
  child(component: string): Logger;
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

function envLevel(): LogLevel {
  const v = process.env.VRDMA_LOG;
  return v !== undefined && v in LEVELS ? (v as LogLevel) : 'info';
}

function format(fields: Record<string, unknown> | undefined): string {
  if (fields === undefined) return '';
  return Object.entries(fields)
    .map(([k, v]) => ` ${k}=${typeof v === 'string' ? JSON.stringify(v) : String(v)}`)
    .join('');
}

/** The human format: `level component: message key=value ...` on stderr. */
export class StderrLogger implements Logger {
  constructor(
    private readonly component: string,
    private readonly minLevel: LogLevel = envLevel(),
  ) {}

  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void {
    if (LEVELS[level] < (LEVELS[this.minLevel] ?? LEVELS.info)) return;
    process.stderr.write(`${level} ${this.component}: ${message}${format(fields)}\n`);
  }

  child(component: string): Logger {
    return new StderrLogger(`${this.component}/${component}`, this.minLevel);
  }
}

/** Where JSON lines go: anything with write(string) (process.stderr by default). */
export interface LineSink {
  write(line: string): unknown;
}

/**
 * JSON lines through pino. A child is a pino child carrying `component` as `parent/child` (the same names as the
 * human format). Field values pino cannot serialise as they are (bigint) are written as decimal strings.
 */
export class JsonLogger implements Logger {
  private constructor(
    /** The root: children are made from it so `component` is bound once (pino would repeat the key). */
    private readonly root: pino.Logger,
    private readonly p: pino.Logger,
    private readonly component: string,
  ) {}

  static create(component: string, minLevel: LogLevel = envLevel(), sink: LineSink = process.stderr): JsonLogger {
    const p = pino(
      {
        level: minLevel,
        base: { pid: process.pid },
        // The level as its name ("info"), not pino's number: the same word the human format prints.
        formatters: { level: (label) => ({ level: label }) },
        timestamp: pino.stdTimeFunctions.isoTime,
      },
      { write: (s: string) => sink.write(s) },
    );
    return new JsonLogger(p, p.child({ component }), component);
  }

  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void {
    if (!this.p.isLevelEnabled(level)) return;
    if (fields === undefined) {
      this.p[level](message);
      return;
    }
    let clean: Record<string, unknown> | undefined;
    for (const [k, v] of Object.entries(fields)) {
      if (typeof v === 'bigint' || k === 'component' || k === 'msg' || k === 'level' || k === 'time' || k === 'pid') {
        clean ??= { ...fields };
        // Reserved keys keep the record's own meaning; the field moves aside rather than overwrite it.
        if (typeof v === 'bigint') clean[k] = v.toString();
        if (k === 'component' || k === 'msg' || k === 'level' || k === 'time' || k === 'pid') {
          delete clean[k];
          clean[`field_${k}`] = typeof v === 'bigint' ? v.toString() : v;
        }
      }
    }
    this.p[level](clean ?? fields, message);
  }

  child(component: string): Logger {
    const name = `${this.component}/${component}`;
    return new JsonLogger(this.root, this.root.child({ component: name }), name);
  }
}

/** The backend's root logger in the format the operator chose. */
export function createLogger(component: string, opts: { level?: LogLevel; format?: LogFormat; sink?: LineSink } = {}): Logger {
  const level = opts.level ?? envLevel();
  return (opts.format ?? 'json') === 'json' ? JsonLogger.create(component, level, opts.sink) : new StderrLogger(component, level);
}

/** Keeps every line in memory (tests). */
export class RecordingLogger implements Logger {
  readonly lines: { level: LogLevel; component: string; message: string; fields?: Record<string, unknown> }[];

  constructor(
    private readonly component = 'test',
    lines?: RecordingLogger['lines'],
  ) {
    this.lines = lines ?? [];
  }

  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void {
    this.lines.push(fields === undefined ? { level, component: this.component, message } : { level, component: this.component, message, fields });
  }

  child(component: string): Logger {
    return new RecordingLogger(`${this.component}/${component}`, this.lines);
  }
}
