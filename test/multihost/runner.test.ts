// The multi-host runner's parts that need no VM: its usage errors (multi-host.sh, run.sh --host-link), and the VM
// slots a multi-host run takes (rxe_take_slots in scripts/rxe/common.sh): all it needs at once or none, in arrival
// order, so two runs that each need two VMs never hold one each and wait for each other forever, and a one-VM run
// that arrives later does not slip into the slot the earlier two-VM run is waiting for. Real flock locks on real
// files in a scratch cache folder.

import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const MULTI_HOST = path.join(ROOT, 'scripts/rxe/multi-host.sh');
const RUN = path.join(ROOT, 'scripts/rxe/run.sh');
const COMMON = path.join(ROOT, 'scripts/rxe/common.sh');
const EXIT_USAGE = 2;
/** Long enough for a waiter to have polled its slots many times (it polls every SLOT_POLL_S). */
const SETTLE_MS = 1500;
const SLOT_POLL_S = '0.1';
/** A waiter that should get its slots gets them within this. */
const TAKE_MS = 10_000;

interface Proc {
  child: ChildProcess;
  out: string;
  err: string;
  exit: Promise<number>;
}

function start(cmd: string, args: string[], env: Record<string, string> = {}): Proc {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const p: Proc = { child, out: '', err: '', exit: undefined as unknown as Promise<number> };
  child.stdout!.on('data', (d) => (p.out += d));
  child.stderr!.on('data', (d) => (p.err += d));
  p.exit = new Promise((r) => child.on('close', (code, sig) => r(code ?? (sig === null ? -1 : 128))));
  return p;
}

async function waitFor(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

t.test('usage errors name what is wrong, before anything boots', async (t) => {
  const cases: Array<[string, string[], RegExp]> = [
    [MULTI_HOST, ['--', 'true'], /--host-2 '<command>' is required/],
    [MULTI_HOST, ['--host-2', 'true'], /no host-1 command given/],
    [MULTI_HOST, ['--grace', 'soon', '--host-2', 'true', '--', 'true'], /--grace takes a whole number of seconds/],
    [MULTI_HOST, ['--frobnicate'], /unknown option '--frobnicate'/],
    [RUN, ['--host-link', '10.77.0.1/24,relative.sock,/tmp/b.sock', '--', 'true'], /--host-link takes ADDRESS\/PREFIX,LOCAL_SOCKET,REMOTE_SOCKET/],
    [RUN, ['--host-link', '10.77.0.1,/tmp/a.sock,/tmp/b.sock', '--', 'true'], /--host-link takes/],
  ];
  for (const [script, args, message] of cases) {
    const p = start('bash', [script, ...args]);
    const code = await p.exit;
    const name = `${path.basename(script)} ${args.join(' ')}`;
    t.equal(code, EXIT_USAGE, `${name}: exit ${EXIT_USAGE}`);
    t.match(p.err, message, `${name}: says why`);
    t.equal(p.out, '', `${name}: nothing on stdout`);
  }
});

t.test('VM slots: all at once or none, in arrival order', async (t) => {
  const cache = mkdtempSync(path.join(tmpdir(), 'vrdma-slots-'));
  const procs: Proc[] = [];
  t.teardown(() => {
    for (const p of procs) p.child.kill('SIGKILL');
    rmSync(cache, { recursive: true, force: true });
  });
  const env = { VRDMA_CACHE: cache };
  // A waiter: takes COUNT slots of 2, says so, and holds them until its stdin-less `read` times out or it is killed.
  const waiter = (count: number, name: string) => {
    const p = start('bash', ['-c', `. "${COMMON}"; RXE_MAX_VMS=2; RXE_SLOT_POLL_S=${SLOT_POLL_S}; rxe_take_slots ${count}; echo "${name} took"; exec sleep 600`], env);
    procs.push(p);
    return p;
  };
  // Another run's VM holds slot 0.
  const holder = start('bash', ['-c', `mkdir -p "${cache}/rxe/slots"; exec {fd}>"${cache}/rxe/slots/0"; flock "$fd"; echo holding; exec sleep 600`]);
  procs.push(holder);
  await waitFor(() => holder.out.includes('holding'), TAKE_MS, 'the holder');

  const two = waiter(2, 'two');
  await new Promise((r) => setTimeout(r, SETTLE_MS));
  t.notOk(two.out.includes('took'), 'a two-VM run does not start with one slot free');
  t.match(two.err, /waiting for 2 free test-host slots at once/, 'and says what it waits for');
  const one = waiter(1, 'one');
  await new Promise((r) => setTimeout(r, SETTLE_MS));
  t.notOk(one.out.includes('took'), 'a one-VM run that came later does not take the free slot the two-VM run waits for');

  holder.child.kill('SIGKILL');
  await waitFor(() => two.out.includes('two took'), TAKE_MS, 'the two-VM run to take both slots');
  t.pass('the two-VM run took both slots once the holder was gone');
  await new Promise((r) => setTimeout(r, SETTLE_MS));
  t.notOk(one.out.includes('took'), 'the one-VM run waits while both slots are held');
  two.child.kill('SIGKILL');
  await waitFor(() => one.out.includes('one took'), TAKE_MS, 'the one-VM run to take a slot');
  t.pass('the one-VM run took a slot once the two-VM run ended');
  t.match(one.err, /got a slot after \d+ s/, 'the one-slot messages are the ones run.sh always printed');

  const tooMany = start('bash', ['-c', `. "${COMMON}"; RXE_MAX_VMS=2; RXE_SLOT_POLL_S=${SLOT_POLL_S}; rxe_take_slots 3`], env);
  t.not(await tooMany.exit, 0, 'more slots than exist: an error, not a wait forever');
  t.match(tooMany.err, /3 VM slots wanted, but only 2 exist here/, 'and says so');
});
