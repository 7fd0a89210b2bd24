// Runs one of scripts/linux-guest/*.sh to its end and gives its exit code, output and wall time.

import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface ScriptRun { code: number | null; stdout: string; stderr: string; elapsedMs: number }

export function runScript(script: string, args: readonly string[] = []): Promise<ScriptRun> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    const child = spawn('bash', [path.join(root, 'scripts/linux-guest', script), ...args], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => { stdout += c.toString(); });
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString(); });
    child.once('close', (code) => resolve({ code, stdout, stderr, elapsedMs: Date.now() - t0 }));
  });
}

/** The kernel release the module is built for: the soft-RoCE test host's (scripts/rxe/common.sh). */
export async function pinnedRelease(): Promise<string> {
  const { readFile } = await import('node:fs/promises');
  const text = await readFile(path.join(root, 'scripts/rxe/common.sh'), 'utf8');
  const m = /^RXE_KERNEL_VERSION=(\S+)$/m.exec(text);
  if (m?.[1] === undefined) throw new Error('no RXE_KERNEL_VERSION in scripts/rxe/common.sh');
  return m[1];
}
