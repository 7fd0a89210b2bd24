// `vrdma-backend --transport vfio-user` as its own process (over the verbs test double, test/cli/fake-backend.ts)
// serving the virtio-rdma device to an UNMODIFIED QEMU (scripts/vfio-user/stock-qemu.sh) as a vfio-user-pci
// function; the reference guest driver runs every control command through QEMU's qtest (PCI, virtio-pci registers,
// INTx) and guest RAM: what a guest kernel would do, with no patched QEMU anywhere.
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AccessFlag, Command, EventType, WcOpcode, WcStatus } from '../../../vmm-device/abi/rdma/index.ts';
import { RdmaContext } from '../../../guest-driver-spec/driver/index.ts';
import { QtestTransport } from '../../../guest-driver-spec/driver/qtest-transport.ts';
import { QemuQtest } from '../../../guest-driver-spec/qtest/index.ts';
import { gidFromIpv4 } from '../../../vmm-device/rdma/index.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const script = path.join(root, 'test/cli/fake-backend.ts');
const WAIT_MS = 10_000;
const host = new SysHost();

const qemuBinary = execFileSync('bash', [path.join(root, 'scripts/vfio-user/stock-qemu.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  .trim()
  .split('\n')
  .pop()!;
t.comment(`stock QEMU: ${execFileSync(qemuBinary, ['--version'], { encoding: 'utf8' }).split('\n')[0]}`);

function backend(args: string[]): { exited: Promise<number>; serving: Promise<void>; stderr: () => string; kill: () => void } {
  const child = spawn(process.execPath, ['--import', 'tsx', script, ...args], { cwd: root, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  const exited = new Promise<number>((resolve) => child.on('exit', (code) => resolve(code ?? -1)));
  const serving = new Promise<void>((resolve, reject) => {
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      if (err.includes('"serving"')) resolve();
    });
    void exited.then((code) => reject(new Error(`backend exited (${code}) before serving: ${err}`)));
  });
  serving.catch(() => undefined);
  return { exited, serving, stderr: () => err, kill: () => child.kill('SIGTERM') };
}

t.test('--transport is validated with the other flags', async (t) => {
  const b = backend(['--transport', 'vfio', '--socket', '/tmp/x.sock', '--device', 'fake0', '--virtual-ip', '10.0.0.1']);
  t.not(await b.exited, 0, 'refused');
  t.match(b.stderr(), /--transport must be vhost-user or vfio-user/, 'with the flag named');
});

t.test('every control command through stock QEMU over vfio-user; a send completing with an INTx event; the guest resets the device', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-vfu-cli-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const table = path.join(dir, 'gids.json');
  fs.writeFileSync(table, JSON.stringify({ vms: [
    { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
    { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.2' },
  ] }));
  const socketPath = path.join(dir, 'vfu.sock');
  const b = backend(['--transport', 'vfio-user', '--socket', socketPath, '--device', 'fake0', '--vm-id', 'vm-a', '--gid-table', table, '--host-dir', dir]);
  t.teardown(() => b.kill());
  await b.serving;
  t.match(b.stderr(), /"transport":"vfio-user"/, 'the serving line names the transport');

  const qemu = await QemuQtest.start({ binary: qemuBinary, workDir: dir, args: ['-device', JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socketPath, type: 'unix' } })] });
  t.teardown(() => qemu.stop());
  const transport = await QtestTransport.open({ qemu, host });
  t.teardown(() => transport.close());
  const ctx = await RdmaContext.open(transport);
  const seen = new Set<number>();
  const did = (c: number): void => void seen.add(c);

  t.same(ctx.gid, gidFromIpv4('192.168.7.1'), 'the device configuration through QEMU from the backend');
  t.equal((await ctx.queryDevice()).max_qp, ctx.config.max_qp, 'QUERY_DEVICE');
  did(Command.QUERY_DEVICE);
  t.ok((await ctx.queryPort()).state > 0, 'QUERY_PORT');
  did(Command.QUERY_PORT);
  t.same((await ctx.queryGid()).gid, ctx.gid, 'QUERY_GID');
  did(Command.QUERY_GID);
  const pd = await ctx.allocPd();
  did(Command.CREATE_PD);
  const cq = await ctx.createCq(16);
  did(Command.CREATE_CQ);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq });
  did(Command.CREATE_QP);
  const buf = ctx.allocBuffer(4 * 4096);
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE, { pagesPerCommand: 1 });
  did(Command.REG_MR);
  did(Command.REG_MR_CONTINUE);
  // Connected to itself: the backend's QPN registry (--host-dir) knows this QP's wire number, and no other VM's.
  await qp.connect({ gid: ctx.gid, qpn: qp.qpNum });
  did(Command.MODIFY_QP);
  t.equal((await qp.query()).attr.qp_state, 3, 'QUERY_QP: RTS after MODIFY_QP');
  did(Command.QUERY_QP);
  const ah = await ctx.createAh(pd, { dgid: gidFromIpv4('192.168.7.2') });
  did(Command.CREATE_AH);

  await cq.reqNotify(false, true);
  did(Command.ARM_CQ);
  await qp.postSend([{ wrId: 9n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 128)] }]);
  t.match(await cq.waitEvent(WAIT_MS), { type: EventType.COMPLETION, handle: cq.handle }, 'completion event through INTx');
  t.match(cq.poll(), [{ wrId: 9n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND }]);

  await ctx.destroyAh(ah);
  did(Command.DESTROY_AH);
  await ctx.deregMr(mr);
  did(Command.DEREG_MR);
  await ctx.destroyQp(qp);
  did(Command.DESTROY_QP);
  await ctx.destroyCq(cq);
  did(Command.DESTROY_CQ);
  await ctx.deallocPd(pd);
  did(Command.DESTROY_PD);
  t.same([...seen].sort((x, y) => x - y), Object.values(Command).sort((x, y) => x - y), 'every control command of the spec went through');

  await ctx.close();
  t.equal(await transport.getStatus(), 0, 'device reset reads back 0');
  b.kill();
  t.equal(await b.exited, 0, 'the backend stops cleanly on SIGTERM');
});
