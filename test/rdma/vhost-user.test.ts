// The device behind the real vhost-user server, driven by the reference front-end over a real socket with memfd
// guest RAM and eventfds (QEMU's sequences): configuration space, a control request through the kick and call
// eventfds, and what happens to the VM's host objects when the front-end disconnects without a reset (QEMU died).

import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  Command,
  CtrlResponseHeader,
  DeviceConfig,
  FeatureBit,
  HandleResponse,
  Status,
  encodeRequest,
} from '../../vmm-device/abi/rdma/index.ts';
import { VhostUserFrontend } from '../../guest-driver-spec/frontend/frontend.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { GuestAllocator, SplitRingDriver } from '../../guest-driver-spec/frontend/guest-driver.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { F_VERSION_1, bit } from '../../vmm-device/abi/virtio.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { RdmaDevice, StaticAddressResolver, gidFromIpv4 } from '../../vmm-device/rdma/index.ts';
import { TABLE, waitFor } from './guest.ts';

const host = new SysHost();

t.test('over vhost-user: config, a control request, and a front-end that dies releases the VM', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-vu-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 'vm.sock');
  const verbs = new FakeVerbs();
  const log = new RecordingLogger('test');
  const device = await RdmaDevice.open({ verbs, hostDevice: 'fake0', vmId: 'vm-a', resolver: new StaticAddressResolver(TABLE), log, aliases: new FakeAliasMapper() });
  const server = new VhostUserServer({ path: sock, host, model: device, log });
  const closes: string[] = [];
  server.onClose = (r) => closes.push(r);
  server.listen();
  t.teardown(async () => {
    server.close();
    await device.close();
  });

  const fe = await VhostUserFrontend.connect(host, sock);
  const init = await fe.init({ queues: 3 });
  t.equal(init.queueNum >= 3, true, 'at least the three queues');
  const config = DeviceConfig.decode(await fe.getConfig(0, DeviceConfig.size));
  t.same([...config.gid], [...gidFromIpv4('192.168.7.1')], 'GET_CONFIG carries the virtual GID');
  t.equal(config.gid_tbl_len, 1);

  const ram = new GuestRam(host, [{ gpa: 0, size: 0x40000 }]);
  t.teardown(() => ram.release());
  const alloc = new GuestAllocator(ram, 0);
  const queues = [new SplitRingDriver(ram, alloc, 16), new SplitRingDriver(ram, alloc, 16), new SplitRingDriver(ram, alloc, 16)];
  await fe.start({
    ram,
    features: bit(F_VERSION_1) | (1n << BigInt(FeatureBit.RC)) | (1n << BigInt(FeatureBit.UD)),
    queues: queues.map((q, index) => ({ index, size: 16, ...q.addrs })),
  });
  await fe.sync();

  const { head, responseAddr } = queues[0]!.post(alloc, encodeRequest(Command.CREATE_PD, 5n, new Uint8Array(0)), 16 + HandleResponse.size);
  fe.kick(0);
  t.ok((await fe.waitCall(0)) > 0n, 'call eventfd fired');
  t.same(queues[0]!.readUsed(), [{ id: head, len: 16 + HandleResponse.size }]);
  const answer = new Uint8Array(16 + HandleResponse.size);
  ram.memory.read(responseAddr, answer);
  t.same(CtrlResponseHeader.decode(answer), { status: Status.OK, detail: 0, tag: 5n });
  t.equal(HandleResponse.decode(answer, 16).handle, 1);
  t.equal(verbs.liveObjects().pd, 1, 'a host PD for the guest');

  fe.close(); // no GET_VRING_BASE, no SET_STATUS 0: QEMU crashed
  await waitFor(() => (closes.length > 0 ? true : undefined), 'server noticed the disconnect');
  await device.settled();
  t.same(verbs.liveObjects(), { device: 1, pd: 0, cq: 0, qp: 0, mr: 0, ah: 0 }, 'every host object of the VM released');
});
