// The reference driver over real QEMU: the project's patched QEMU under qtest with vhost-user-device-pci (virtio ID
// 42, 3 queues, 128 bytes of configuration) in front of this process's vhost-user server and the virtio-rdma device
// (over FakeVerbs: no RDMA hardware needed). The driver touches PCI, the virtio-pci registers and INTx through
// qtest, and guest RAM through QEMU's own memfd mapped into this process.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AccessFlag, EventType, WcOpcode, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { RdmaContext } from '../../guest-driver-spec/driver/index.ts';
import { QtestTransport } from '../../guest-driver-spec/driver/qtest-transport.ts';
import { QemuQtest } from '../../guest-driver-spec/qtest/index.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4, type GidTableEntry } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { host } from './harness.ts';

const TABLE: GidTableEntry[] = [
  { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: '10.0.0.1' },
  { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: '10.0.0.1' },
];
const WAIT_MS = 10_000;

/** QEMU's generic vhost-user device as spec section 3 says to attach it. */
function deviceArgs(socketPath: string): string[] {
  return [
    '-chardev', `socket,id=vu,path=${socketPath}`,
    '-device', 'vhost-user-device-pci,chardev=vu,virtio-id=42,num_vqs=3,vq_size=256,config_size=128,page-per-vq=on',
  ];
}

// The project's QEMU recipe sets vq_index_end of the generic vhost-user device (scripts/qemu/common.sh), so a guest's
// device reset reaches the back-end as SET_STATUS 0, which resets the device: its host objects are released then,
// not only when the connection closes.

t.test('open, control path, a send completing into the guest CQ, INTx-driven events, reset releases all', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-driver-qemu-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'vu.sock');
  const verbs = new FakeVerbs();
  const device = await RdmaDevice.open({ verbs, hostDevice: 'fake0', vmId: 'vm-a', resolver: new StaticAddressResolver(TABLE), log: new RecordingLogger('device'), aliases: new FakeAliasMapper() });
  t.teardown(() => device.close());
  const server = new VhostUserServer({ path: socketPath, host, model: device, log: new RecordingLogger('vhost-user') });
  server.listen();
  t.teardown(() => server.close());
  const qemu = await QemuQtest.start({ workDir: dir, args: deviceArgs(socketPath) });
  t.teardown(() => qemu.stop());
  const transport = await QtestTransport.open({ qemu, host });
  t.teardown(() => transport.close());

  const ctx = await RdmaContext.open(transport);
  t.equal(transport.kind, 'qtest virtio-pci');
  t.same(ctx.gid, gidFromIpv4('192.168.7.1'), 'configuration read through QEMU from the back-end');
  t.equal(await transport.numQueues(), 3, 'num_vqs = 3');
  const dev = await ctx.queryDevice();
  t.equal(dev.max_qp, ctx.config.max_qp, 'a control round trip');

  const pd = await ctx.allocPd();
  const cq = await ctx.createCq(16);
  const qp = await ctx.createQp(pd, { type: 'RC', sendCq: cq, recvCq: cq });
  const buf = ctx.allocBuffer(8192);
  const mr = await ctx.regMr(pd, buf, AccessFlag.LOCAL_WRITE | AccessFlag.REMOTE_WRITE);
  await qp.connect({ gid: gidFromIpv4('192.168.7.2'), qpn: 0x77 });
  t.equal((await qp.query()).attr.qp_state, 3, 'RTS');

  await cq.reqNotify(false, true);
  await qp.postSend([{ wrId: 9n, opcode: 'SEND', signaled: true, sgList: [mr.sge(0, 128)] }]);
  t.match(await cq.waitEvent(WAIT_MS), { type: EventType.COMPLETION, handle: cq.handle }, 'completion event through INTx');
  t.match(cq.poll(), [{ wrId: 9n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND }]);

  await ctx.close();
  t.equal(await transport.getStatus(), 0, 'device reset');
  await new Promise((r) => setTimeout(r, 200));
  t.same(verbs.liveObjects(), { device: 1, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'reset (SET_STATUS 0 from QEMU) released every host object of the VM');
});
