// A minimal logger the layers share. Lines go to stderr as `level component: message key=value ...`, so
// operators can grep them; tests pass a recording logger to assert what was reported.

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export interface Logger {
  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void;
  child(component: string): Logger;
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

function format(fields: Record<string, unknown> | undefined): string {
  if (fields === undefined) return '';
  return Object.entries(fields)
    .map(([k, v]) => ` ${k}=${typeof v === 'string' ? JSON.stringify(v) : String(v)}`)
    .join('');
}

export class StderrLogger implements Logger {
  constructor(
    private readonly component: string,
    private readonly minLevel: LogLevel = (process.env.VRDMA_LOG as LogLevel | undefined) ?? 'info',
  ) {}

  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void {
    if (LEVELS[level] < (LEVELS[this.minLevel] ?? LEVELS.info)) return;
    process.stderr.write(`${level} ${this.component}: ${message}${format(fields)}\n`);
  }

  child(component: string): Logger {
    return new StderrLogger(`${this.component}/${component}`, this.minLevel);
  }
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
