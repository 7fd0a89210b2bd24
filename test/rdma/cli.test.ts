// The vrdma-backend command: argument errors name the flag (exit 2), a missing RDMA device says how to create one,
// and with a (fake) device it listens on the socket and releases everything on SIGTERM.

import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { run } from '../../vmm-device/cli/main.ts';
import { waitFor } from './guest.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bin = path.join(root, 'bin/vrdma-backend.js');
const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-cli-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

function backend(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [bin, ...args], { cwd: root, timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : -1, stdout, stderr });
    });
  });
}

const sock = path.join(dir, 'vm.sock');
const table = path.join(dir, 'table.json');
writeFileSync(table, JSON.stringify({ vms: [{ vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' }] }));

t.test('argument errors exit 2 and name the flag (plain node runs the bin)', async (t) => {
  const cases: [string[], RegExp][] = [
    [['--device', 'rxe0', '--virtual-ip', '10.0.0.9'], /--socket is required/],
    [['--socket', sock, '--virtual-ip', '10.0.0.9'], /--device is required/],
    [['--socket', sock, '--device', 'rxe0'], /--virtual-ip or --gid-table is required/],
    [['--socket', '/nonexistent-dir/x.sock', '--device', 'rxe0', '--virtual-ip', '10.0.0.9'], /--socket: its folder does not exist/],
    [['--socket', sock, '--device', 'rxe 0', '--virtual-ip', '10.0.0.9'], /--device must be an RDMA device name/],
    [['--socket', sock, '--device', 'rxe0', '--virtual-ip', '10.0.0.300'], /--virtual-ip must be an IPv4 address/],
    [['--socket', sock, '--device', 'rxe0', '--gid-table', path.join(dir, 'missing.json')], /--gid-table: no such file/],
    [['--socket', sock, '--device', 'rxe0', '--gid-table', table, '--virtual-ip', '10.0.0.9'], /exclude each other/],
    [['--socket', sock, '--device', 'rxe0', '--virtual-ip', '10.0.0.9', '--max-qp', '0'], /--max-qp must be between 1/],
    [['--socket', sock, '--device', 'rxe0', '--virtual-ip', '10.0.0.9', '--max-qp', 'many'], /--max-qp must be a positive integer/],
    [['--socket', sock, '--device', 'rxe0', '--virtual-ip', '10.0.0.9', '--log-level', 'loud'], /--log-level must be debug, info, warn or error/],
    [['--socket', sock, '--device', 'rxe0', '--virtual-ip', '10.0.0.9', '--host-queue-mapping', 'on'], /--host-queue-mapping must be polled, notify or off/],
    [['--socket', sock, '--device', 'rxe0', '--virtual-ip', '10.0.0.9', '--max-mapped-queues', '0'], /--max-mapped-queues must be between 1/],
    [['--sockt', sock], /Unknown option '--sockt'/],
    [['--socket'], /--socket/],
    [['positional'], /positional/],
  ];
  // Through plain node and the package's bin for the first cases (each start compiles the sources: slow under
  // load), in process for the rest (the same run()).
  for (const [i, [args, re]] of cases.entries()) {
    if (i < 3) {
      const r = await backend(args);
      t.equal(r.code, 2, `exit 2 (bin): ${args.join(' ')}`);
      t.match(r.stderr, re, args.join(' '));
      continue;
    }
    const errors: string[] = [];
    const code = await run(args, { out: () => undefined, err: (s) => errors.push(s), verbs: async () => new FakeVerbs() });
    t.equal(code, 2, `exit 2: ${args.join(' ')}`);
    t.match(errors.join(''), re, args.join(' '));
  }
  const help = await backend(['--help']);
  t.equal(help.code, 0);
  t.match(help.stdout, /--socket PATH/);
});

t.test('no such RDMA device: says how to create one', async (t) => {
  const errors: string[] = [];
  const code = await run(['--socket', sock, '--device', 'rxe0', '--gid-table', table, '--vm-id', 'vm-a'], {
    out: () => undefined,
    err: (s) => errors.push(s),
    verbs: async () => new FakeVerbs(),
  });
  t.equal(code, 1);
  t.match(errors.join(''), /--device rxe0: no such RDMA device .*rdma link add rxe0 type rxe netdev <if>.*npm run rxe:run/);
});

t.test('a table without this VM is refused naming --vm-id', async (t) => {
  const errors: string[] = [];
  const code = await run(['--socket', sock, '--device', 'fake0', '--gid-table', table, '--vm-id', 'vm-z'], {
    out: () => undefined,
    err: (s) => errors.push(s),
    verbs: async () => new FakeVerbs(),
  });
  t.equal(code, 1);
  t.match(errors.join(''), /--vm-id vm-z: not in --gid-table/);
});

t.test('a malformed table names the field', async (t) => {
  const bad = path.join(dir, 'bad.json');
  writeFileSync(bad, JSON.stringify({ vms: [{ vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7', hostIp: '10.0.0.1' }] }));
  const errors: string[] = [];
  const code = await run(['--socket', sock, '--device', 'fake0', '--gid-table', bad, '--vm-id', 'vm-a'], {
    out: () => undefined,
    err: (s) => errors.push(s),
    verbs: async () => new FakeVerbs(),
  });
  t.equal(code, 1);
  t.match(errors.join(''), /--gid-table .*bad\.json: vms\.0\.virtualIp: must be an IPv4 address/);
});

t.test('serves on the socket and releases the host device on SIGTERM', async (t) => {
  const verbs = new FakeVerbs();
  const done = run(['--socket', sock, '--device', 'fake0', '--virtual-ip', '192.168.50.1', '--log-level', 'warn'], {
    out: () => undefined,
    err: (s) => t.comment(s),
    verbs: async () => verbs,
  });
  await waitFor(() => (existsSync(sock) ? true : undefined), 'socket');
  t.equal(verbs.liveObjects().device, 1, 'host device open while serving');
  process.emit('SIGTERM');
  t.equal(await done, 0);
  t.same(verbs.liveObjects(), { device: 0, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'nothing left on the host');
});
