// The runner's contract with its caller: exit code, stdout carrying the command's output and nothing else, and
// streamed as it comes, the working directory and environment, writable --out folders, bad arguments.

import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {  EXIT_USAGE,
  ONE_BOOT_TEST_TIMEOUT_MS,
  PROJECT_ROOT,
  RUN_TIMEOUT_S,
  insideTestHostReason,
  runInTestHost,
  section,
  FILE_TIMEOUT_MS,
} from './harness.ts';

t.setTimeout(FILE_TIMEOUT_MS);

/** The gap the command leaves between its two lines; the host must see the first well before the second. */
const STREAM_GAP_S = 6;

t.test('arguments the runner refuses, before booting anything', async (t) => {
  const cases: Array<[string[], RegExp]> = [
    [['--timeout', 'soon', '--', 'true'], /--timeout must be a whole number of seconds/],
    [['--timeout', '0', '--', 'true'], /--timeout must be a whole number of seconds/],
    [['--timeout', '9999999', '--', 'true'], /--timeout must be a whole number of seconds/],
    [['--env', 'NOT-A-NAME', '--', 'true'], /--env takes a variable name/],
    [['--frobnicate', '--', 'true'], /unknown option '--frobnicate'/],
    [['--timeout', '10'], /no command given/],
    [[], /no command given/],
  ];
  for (const [args, message] of cases) {
    const r = await runInTestHost(args);
    t.equal(r.code, EXIT_USAGE, `${JSON.stringify(args)} exits ${EXIT_USAGE}`);
    t.match(r.stderr, message, `${JSON.stringify(args)} says why`);
    t.equal(r.stdout, '', `${JSON.stringify(args)} prints nothing on stdout`);
  }
});

t.test(
  'exit code, clean streamed stdout, working directory, environment, --out',
  { timeout: ONE_BOOT_TEST_TIMEOUT_MS, skip: insideTestHostReason() },
  async (t) => {
    const outDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-rxe-out-'));
    const cwd = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-rxe-cwd-'));
    fs.writeFileSync(path.join(cwd, 'from-host.txt'), 'written on the host\n');
    t.teardown(() => {
      fs.rmSync(outDir, { recursive: true, force: true });
      fs.rmSync(cwd, { recursive: true, force: true });
    });
    const script = [
      `echo first`,
      `sleep ${STREAM_GAP_S}`,
      `echo second`,
      `echo '==> cwd'; pwd; cat from-host.txt`,
      `echo '==> env'; env | grep -E '^(VRDMA_|RXE_PASSED_BY_ENV=|RXE_NOT_PASSED=|HOME=)' | sort`,
      `echo '==> out'; echo inside > ${outDir}/from-vm.txt && echo wrote-out`,
      `echo inside > ${cwd}/not-shared.txt && echo wrote-overlay`,
      `echo '==> stderr'; echo on-stderr >&2`,
      `printf 'last line without newline'`,
      `exit 3`,
    ].join('\n');
    const env = { ...process.env, VRDMA_RXE_TEST_MARK: 'marked', RXE_PASSED_BY_ENV: 'a b  c', RXE_NOT_PASSED: 'no' };
    const r = await runInTestHost(['--timeout', String(RUN_TIMEOUT_S), '--out', outDir, '--env', 'RXE_PASSED_BY_ENV', '--', 'bash', '-c', script], {
      cwd,
      env,
    });
    t.equal(r.code, 3, `a command exiting 3 gives 3 (stderr: ${r.stderr.slice(-2000)})`);

    // Nothing but the command's output: it starts with its first line and ends with its last bytes.
    t.ok(r.stdout.startsWith('first\nsecond\n'), `stdout starts with the command's output: ${JSON.stringify(r.stdout.slice(0, 200))}`);
    t.ok(r.stdout.endsWith('last line without newline'), 'stdout ends with the last bytes, no newline added, no marker');
    t.notMatch(r.stdout, /VRDMA-RXE-|SeaBIOS|sysrq|vrdma-rxe:/, 'no boot noise and no marker lines on stdout');
    t.notMatch(r.stdout, /\r/, 'no carriage returns added by the console');

    // Streamed: "first" reached the host before the command slept, not when the VM ended.
    const firstAt = r.chunks.find((c) => c.text.includes('first'))?.atMs;
    const secondAt = r.chunks.find((c) => c.text.includes('second'))?.atMs;
    t.ok(firstAt !== undefined && secondAt !== undefined, 'both lines arrived');
    if (firstAt !== undefined && secondAt !== undefined)
      t.ok(secondAt - firstAt >= (STREAM_GAP_S - 1) * 1000, `first arrived ${secondAt - firstAt} ms before second`);

    t.equal(section(r.stdout, 'cwd'), `${fs.realpathSync(cwd)}\nwritten on the host`, "runs in the caller's folder, sees its files");
    t.equal(
      section(r.stdout, 'env'),
      [
        'HOME=' + (process.env['HOME'] ?? ''),
        'RXE_PASSED_BY_ENV=a b  c',
        'VRDMA_IN_TEST_HOST=1',
        // Every VRDMA_* variable of the caller (the mark set here, and any the test run itself was given).
        ...Object.entries(env)
          .filter(([name]) => name.startsWith('VRDMA_') && name !== 'VRDMA_IN_TEST_HOST')
          .map(([name, value]) => `${name}=${value ?? ''}`),
      ]
        .sort()
        .join('\n'),
      'HOME, VRDMA_*, --env names pass (values intact); other variables do not; VRDMA_IN_TEST_HOST=1 is set',
    );
    t.equal(section(r.stdout, 'out'), 'wrote-out\nwrote-overlay', 'both writes succeeded inside');
    t.equal(fs.readFileSync(path.join(outDir, 'from-vm.txt'), 'utf8'), 'inside\n', 'a write to an --out folder reaches the host');
    t.notOk(fs.existsSync(path.join(cwd, 'not-shared.txt')), 'a write elsewhere stays in the VM (read-only share)');
    t.match(section(r.stdout, 'stderr'), /^on-stderr/, "the command's stderr comes out on stdout too (one console)");
  },
);

t.test(
  'a command killed by a signal gives 128 + the signal number',
  { timeout: ONE_BOOT_TEST_TIMEOUT_MS, skip: insideTestHostReason() },
  async (t) => {
    const r = await runInTestHost(['--timeout', String(RUN_TIMEOUT_S), '--', 'bash', '-c', 'kill -TERM $$']);
    t.equal(r.code, 128 + 15, 'a command killed by SIGTERM gives 143, as in a shell');
    t.equal(r.stdout, '', 'and prints nothing');
  },
);

t.test('the npm scripts rxe:run and test:rxe call the runner', { skip: insideTestHostReason() }, async (t) => {
  const pkg = JSON.parse(fs.readFileSync(path.join(PROJECT_ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
  t.equal(pkg.scripts['rxe:run'], 'bash scripts/rxe/run.sh');
  t.match(pkg.scripts['test:rxe'] ?? '', /scripts\/rxe\/run\.sh .*-- npx tap test\/rxe$/);
});
