// A runner that is stopped takes its VM with it: SIGTERM (what tap sends a test that runs too long) and SIGKILL
// (nothing can be trapped) both end QEMU, so no VM keeps running for the rest of its time limit.

import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { insideTestHostReason, pidsWithCommandLine, startInTestHost, waitFor, FILE_TIMEOUT_MS } from './harness.ts';

t.setTimeout(FILE_TIMEOUT_MS);

/** How long QEMU may take to appear (a cold cache builds the kernel first), and to go once its runner is gone. */
const QEMU_START_MS = 240_000;
const QEMU_GONE_MS = 15_000;
const EXIT_ON_SIGTERM = 143;

for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
  t.test(`${signal} to the runner ends its QEMU`, { timeout: QEMU_START_MS + 60_000, skip: insideTestHostReason() }, async (t) => {
    // The --out folder's path is on QEMU's command line (-virtfs): it names this run's QEMU among all others.
    const outDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-rxe-stop-'));
    t.teardown(() => fs.rmSync(outDir, { recursive: true, force: true }));
    const { child, done } = startInTestHost(['--timeout', '1000', '--out', outDir, '--', 'sleep', '1000']);
    const qemuOf = () => pidsWithCommandLine(`path=${outDir},`).filter((pid) => pid !== child.pid);
    t.ok(await waitFor(() => qemuOf().length > 0, QEMU_START_MS), 'QEMU started');
    child.kill(signal);
    const r = await done;
    if (signal === 'SIGTERM') t.equal(r.code, EXIT_ON_SIGTERM, 'the runner exits 143');
    else t.equal(r.signal, 'SIGKILL', 'the runner died of SIGKILL');
    t.ok(await waitFor(() => qemuOf().length === 0, QEMU_GONE_MS), `no process of that run is left (${qemuOf().join(' ')})`);
  });
}
