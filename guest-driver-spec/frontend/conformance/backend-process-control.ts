// Runs backend-process.ts as a child process for restart tests and follows its JSON events (the reference
// front-end's tests and the QEMU tests both kill it with SIGKILL mid-request and start another).
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const BACKEND_SCRIPT = path.join(here, 'backend-process.ts');
/** How long a test waits for an event of the back-end process. */
const WAIT_MS = 60_000;

export interface BackendEvent {
  event: string;
  queue?: number;
  head?: number;
  text?: string;
}

export class BackendProcess {
  readonly events: BackendEvent[] = [];
  private readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  private constructor(readonly child: ChildProcess) {
    readline.createInterface({ input: child.stdout! }).on('line', (line) => this.events.push(JSON.parse(line) as BackendEvent));
    child.stderr!.on('data', (d: Buffer) => process.stderr.write(d));
    this.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  }

  static async start(socketPath: string, queues: number, mode: 'echo' | 'hold'): Promise<BackendProcess> {
    const child = spawn(process.execPath, ['--import', 'tsx', BACKEND_SCRIPT, socketPath, String(queues), mode], { stdio: ['ignore', 'pipe', 'pipe'] });
    const b = new BackendProcess(child);
    await b.until((e) => e.some((x) => x.event === 'listening'), 'the back-end process to listen');
    return b;
  }

  async until(done: (events: BackendEvent[]) => boolean, what: string): Promise<void> {
    const deadline = Date.now() + WAIT_MS;
    while (!done(this.events)) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; events: ${JSON.stringify(this.events)}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** Waits until the process has reported `count` completed requests (it reports after answering). */
  untilServed(count: number): Promise<void> {
    return this.until((e) => e.filter((x) => x.event === 'served').length >= count, `${count} requests served`);
  }

  texts(event: 'served' | 'held'): string[] {
    return this.events.filter((e) => e.event === event).map((e) => e.text!);
  }

  kill(signal: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    this.child.kill(signal);
    return this.exited;
  }
}

/** For the exactly-once check of the restart tests: are the completed buffer ids distinct, and how many are there. */
export function completions(ids: readonly number[]): { distinct: boolean; count: number } {
  return { distinct: new Set(ids).size === ids.length, count: ids.length };
}
