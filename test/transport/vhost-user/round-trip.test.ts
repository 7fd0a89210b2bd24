// End to end over a real socket: QEMU's init and start sequences from the reference front-end, a request through
// a split virtqueue in memfd guest RAM, the kick eventfd waking the back-end, the answer in the used ring and the
// call eventfd firing; then QEMU's stop sequence, and nothing left mapped or watched.
import t from 'tap';
import { GuestAllocator, SplitRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { F_VERSION_1, bit } from '../../../vmm-device/abi/virtio.ts';
import { ECHO_F_TEST } from '../../../guest-driver-spec/frontend/conformance/echo-device.ts';
import { rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('init, start, echo round trip, stop', async (t) => {
  const r = await rig({ queues: 2 });
  const init = await r.fe.init({ queues: 2 });
  await r.fe.sync();
  t.equal(init.queueNum, 2, 'GET_QUEUE_NUM');
  t.equal(init.maxMemSlots, 509, 'GET_MAX_MEM_SLOTS');
  t.ok(r.session().describe().owner, 'SET_OWNER');
  t.ok(r.session().describe().backendChannel, 'back-end channel installed');

  const ram = r.ram([{ gpa: 0, size: 0x20000 }, { gpa: 0x100000, size: 0x10000 }]);
  const alloc = new GuestAllocator(ram, 0);
  const q0 = new SplitRingDriver(ram, alloc, 64);
  const q1 = new SplitRingDriver(ram, alloc, 16);
  await r.fe.start({
    ram,
    features: bit(F_VERSION_1) | ECHO_F_TEST,
    queues: [
      { index: 0, size: 64, ...q0.addrs },
      { index: 1, size: 16, ...q1.addrs },
    ],
  });
  await r.fe.sync();
  t.ok(r.session().core.isActive, 'device active after DRIVER_OK');
  t.equal(r.device.activations, 1);
  t.equal(await r.fe.getStatus(), 0xf, 'GET_STATUS: ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK');

  const request = new TextEncoder().encode('hello, backend');
  const { head, responseAddr } = q0.post(alloc, request, 64);
  r.fe.kick(0);
  t.ok((await r.fe.waitCall(0)) > 0n, 'call eventfd fired');
  t.same(q0.readUsed(), [{ id: head, len: request.length }]);
  const back = new Uint8Array(request.length);
  ram.memory.read(responseAddr, back);
  t.same(back, request, 'the answer is in guest RAM');

  // Queue 1 too, twice, to see the kick eventfd re-armed.
  for (const word of ['one', 'two']) {
    const p = q1.post(alloc, new TextEncoder().encode(word), 8);
    r.fe.kick(1);
    t.ok((await r.fe.waitCall(1)) > 0n);
    t.same(q1.readUsed(), [{ id: p.head, len: word.length }]);
  }

  const bases = await r.fe.stop([0, 1]);

  await r.fe.sync();
  t.same(bases, [1, 2], 'GET_VRING_BASE returns the next available index of each ring');
  t.notOk(r.session().core.isActive, 'SET_STATUS 0 reset the device');
  t.same(r.session().describe().rings.map((x) => x.started), [false, false], 'rings stopped');

  const left = await r.finish();
  t.same(left, { watchers: 0, mappings: 0 }, 'every mapping and watcher released');
});
