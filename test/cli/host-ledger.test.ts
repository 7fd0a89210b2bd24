// Issue 12 item 4 with two real backend processes of one host: each VM's limits are reserved in the host ledger
// (--host-dir) at start, so a second VM whose quota no longer fits what the host device has left is refused at
// start with a message naming the flag, the capacity and what the other VM holds, instead of starting and then
// being starved at run time. A backend killed with SIGKILL leaves a stale reservation that the next start drops.
// Before the ledger both backends started (each limit was only min(host, its quota)).

import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const script = path.join(root, 'test/cli/fake-backend.ts');
const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-ledger-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
/** The shared host device: 1,024 QPs for all VMs (the other kinds plenty). */
const LIMITS = { maxQp: 1024, maxCq: 65536, maxMr: 65536, maxPd: 65536, maxAh: 65536 };
const WAIT_MS = 60_000;

function backend(vm: string, ip: string, extra: string[]): { child: ChildProcess; exited: Promise<number>; serving: Promise<void>; stderr: () => string } {
  let err = '';
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', script, '--socket', path.join(dir, `${vm}.sock`), '--device', 'fake0', '--vm-id', vm, '--virtual-ip', ip, '--host-dir', dir, ...extra],
    { cwd: root, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, FAKE_LIMITS: JSON.stringify(LIMITS) } },
  );
  t.teardown(() => child.kill('SIGKILL'));
  const exited = new Promise<number>((r) => child.on('exit', (code, signal) => r(code ?? (signal === null ? -1 : 128))));
  const serving = new Promise<void>((resolve, reject) => {
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      if (err.includes('"serving"') || err.includes(' serving')) resolve();
    });
    void exited.then((code) => reject(new Error(`backend ${vm} exited ${code}: ${err}`)));
    setTimeout(() => reject(new Error(`backend ${vm} did not serve within ${WAIT_MS} ms: ${err}`)), WAIT_MS).unref();
  });
  serving.catch(() => undefined);
  return { child, exited, serving, stderr: () => err };
}

t.test('two backends of one host: the second VM\'s quota must fit what the first left', async (t) => {
  const a = backend('vm-a', '192.168.7.1', ['--max-qp', '600']);
  await a.serving;
  t.pass('vm-a serves with 600 of the host\'s 1,024 QPs reserved');

  const b = backend('vm-b', '192.168.7.2', ['--max-qp', '600']);
  t.equal(await b.exited, 1, 'vm-b is refused at start (exit 1)');
  t.match(
    b.stderr(),
    '--max-qp 600: host device fake0 offers 1024 QPs to all VMs together and 600 are reserved by the other backends of this host (vm-a 600): at most 424 are left for VM vm-b',
    'the message names the flag, the capacity, the holder and what is left',
  );

  const b2 = backend('vm-b', '192.168.7.2', ['--max-qp', '424']);
  await b2.serving;
  t.pass('vm-b serves with the 424 QPs left');

  const c = backend('vm-c', '192.168.7.3', ['--max-qp', '1']);
  t.equal(await c.exited, 1, 'a third VM finds nothing left');
  t.match(c.stderr(), '--max-qp 1: host device fake0 offers 1024 QPs to all VMs together and 1024 are reserved by the other backends of this host (vm-a 600, vm-b 424): at most 0 are left for VM vm-c');

  // vm-a's backend dies without releasing: its reservation is stale (pid gone) and the next start drops it.
  a.child.kill('SIGKILL');
  await a.exited;
  const c2 = backend('vm-c', '192.168.7.3', ['--max-qp', '600']);
  await c2.serving;
  t.pass('vm-c gets the 600 QPs vm-a held');

  // A clean shutdown withdraws the reservation.
  b2.child.kill('SIGTERM');
  t.equal(await b2.exited, 0, 'vm-b shuts down cleanly');
  c2.child.kill('SIGTERM');
  t.equal(await c2.exited, 0);
  t.same(readdirSync(path.join(dir, 'ledger', 'fake0')).filter((n) => n.endsWith('.json')).length, 0, 'no reservation left');
});

t.test('two backends starting at the same moment: the lock admits exactly one of two that do not fit together', async (t) => {
  const d = backend('vm-d', '192.168.7.4', ['--max-qp', '700']);
  const e = backend('vm-e', '192.168.7.5', ['--max-qp', '700']);
  const outcome = async (b: ReturnType<typeof backend>) => Promise.race([b.serving.then(() => 'serving'), b.exited.then((c) => `exit ${c}`)]);
  const results = (await Promise.all([outcome(d), outcome(e)])).sort();
  t.same(results, ['exit 1', 'serving'], 'one serves, the other is refused');
  t.match(d.stderr() + e.stderr(), 'at most 324 are left');
});
