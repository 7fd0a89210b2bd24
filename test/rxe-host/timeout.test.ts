// The runner's time limit: a command that never ends is stopped with the VM, and the runner exits 124.

import t from 'tap';
import { EXIT_TIMEOUT, ONE_BOOT_TEST_TIMEOUT_MS, insideTestHostReason, runInTestHost, FILE_TIMEOUT_MS } from './harness.ts';

t.setTimeout(FILE_TIMEOUT_MS);

const LIMIT_S = 30;
/** QEMU gets SIGTERM at the limit and SIGKILL 5 s later; the rest is the runner's own start and clean-up. */
const STOP_SLACK_S = 20;
/** A cold cache downloads and unpacks the kernel package first. */
const COLD_BUILD_ALLOWANCE_S = 300;

t.test('sleep 1000 with --timeout 30 gives 124', { timeout: ONE_BOOT_TEST_TIMEOUT_MS, skip: insideTestHostReason() }, async (t) => {
  const r = await runInTestHost(['--timeout', String(LIMIT_S), '--', 'sleep', '1000']);
  t.equal(r.code, EXIT_TIMEOUT, 'exit code 124');
  t.match(r.stderr, new RegExp(`time-out: the test host ran longer than --timeout ${LIMIT_S} s`), 'a clear message on stderr');
  t.ok(r.elapsedMs >= LIMIT_S * 1000, `it ran the whole ${LIMIT_S} s (${r.elapsedMs} ms)`);
  // Time spent before the VM started does not count toward the limit: a cold cache's build, a wait for a VM slot.
  const waitedS = Number(/got a slot after (\d+) s/.exec(r.stderr)?.[1] ?? 0);
  const buildS = /building the test host/.test(r.stderr) ? COLD_BUILD_ALLOWANCE_S : 0;
  t.ok(r.elapsedMs < (LIMIT_S + STOP_SLACK_S + waitedS + buildS) * 1000, `and stopped soon after (${r.elapsedMs} ms)`);
  t.notMatch(r.stdout, /VRDMA-RXE-/, 'no marker on stdout');
});
