// The vfio-user server on the raw protocol (raw-client.ts speaks the messages): the PCI function as a client sees
// it, register accesses, DMA_MAP of a memfd becoming fd-backed guest memory and DMA_UNMAP removing it, and every
// negative case answered with its exact errno (the errno libvfio-user's handlers set, named beside each case);
// the server survives malformed, hostile and silent clients and keeps serving the next one.
import t, { type Test } from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { InvertDevice } from '../../../guest-driver-spec/qtest/rig/invert-device.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { close, memfdCreate, mmap, munmap } from '../../../vmm-device/native/sys.ts';
import { STALL_TIMEOUT_MS } from '../../../vmm-device/native/vfio-user.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';
import { VfioUserServer } from '../../../vmm-device/transport/vfio-user/server.ts';
import { COMMON, NOTIFY_OFFSET, VIRTIO_BAR_SIZE } from '../../../vmm-device/transport/virtio-pci/layout.ts';
import { Cmd, HEADER_SIZE, RawClient, cat, message, u32s, u64 } from './raw-client.ts';

const EINVAL = 22;
const ENOENT = 2;
const CONFIG_REGION = 7;
const PROT_RW = 3;

function start(t: Test): { server: VfioUserServer; socketPath: string; log: RecordingLogger } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-vfu-raw-'));
  const socketPath = path.join(dir, 'vfu.sock');
  const log = new RecordingLogger('vfio-user');
  const server = new VfioUserServer({ path: socketPath, host: new SysHost(), model: new InvertDevice(2, 7n), log });
  server.listen();
  t.teardown(() => {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { server, socketPath, log };
}

/** REGION_READ/WRITE payload: offset u64, region u32, count u32 (+ data for a write). */
const access = (region: number, offset: number, count: number, data?: Uint8Array): Uint8Array => cat(u64(offset), u32s(region, count), data ?? new Uint8Array(0));

async function connected(socketPath: string): Promise<RawClient> {
  const c = RawClient.connect(socketPath);
  const r = await c.negotiate();
  if (r.errno !== 0) throw new Error(`VERSION refused: errno ${r.errno}`);
  return c;
}

async function until(done: () => boolean, ms = 5000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!done() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  return done();
}

t.test('negotiation: a first message other than VERSION, and a foreign major version, are EINVAL; the next client is served', async (t) => {
  const { server, socketPath } = start(t);
  const early = RawClient.connect(socketPath);
  early.send(message(1, Cmd.REGION_READ, access(CONFIG_REGION, 0, 4)));
  const r1 = await early.reply();
  t.equal(r1.errno, EINVAL, 'REGION_READ before VERSION: EINVAL (tran.c recv_version)');
  t.ok(await early.closedByServer(), 'and the connection is closed');
  early.close();

  const foreign = RawClient.connect(socketPath);
  const payload = new Uint8Array(4);
  new DataView(payload.buffer).setUint16(0, 1, true); // major 1
  foreign.send(message(2, Cmd.VERSION, payload));
  t.equal((await foreign.reply()).errno, EINVAL, 'major version 1: EINVAL');
  t.ok(await foreign.closedByServer());
  foreign.close();

  const good = await connected(socketPath);
  t.ok(await until(() => server.isAttached), 'a well-behaved client attaches after both');
  good.close();
});

t.test('the function on the wire: device info, regions, config space, registers; each bad request with its errno', async (t) => {
  const { server, socketPath } = start(t);
  const c = await connected(socketPath);
  t.teardown(() => c.close());

  const info = await c.request(Cmd.DEVICE_GET_INFO, u32s(16, 0, 0, 0));
  const iv = new DataView(info.payload.buffer);
  t.equal(info.errno, 0);
  t.ok(iv.getUint32(8, true) >= 9, `${iv.getUint32(8, true)} regions (BARs, ROM, config, ...)`);
  t.equal(iv.getUint32(12, true), 5, 'five irq types (INTx, MSI, MSI-X, ERR, REQ)');

  const bar0 = await c.request(Cmd.DEVICE_GET_REGION_INFO, cat(u32s(32, 0, 0, 0), u64(0), u64(0)));
  t.equal(new DataView(bar0.payload.buffer).getBigUint64(16, true), BigInt(VIRTIO_BAR_SIZE), 'BAR0 holds the virtio structures');

  const ids = await c.request(Cmd.REGION_READ, access(CONFIG_REGION, 0, 4));
  const idv = new DataView(ids.payload.buffer, 16);
  t.same([idv.getUint16(0, true), idv.getUint16(2, true)], [0x1af4, 0x1040 + 42], 'vendor and device ID from config space');

  const status = async (): Promise<number> => (await c.request(Cmd.REGION_READ, access(0, COMMON.deviceStatus, 1))).payload[16]!;
  t.equal(await status(), 0);
  const w = await c.request(Cmd.REGION_WRITE, access(0, COMMON.deviceStatus, 1, Uint8Array.of(1)));
  t.equal(w.errno, 0, 'a status write');
  t.equal(await status(), 1, 'reads back ACKNOWLEDGE');

  const cases: [string, Uint8Array, number][] = [
    ['a read past the end of BAR0 (is_valid_region_access)', message(0, Cmd.REGION_READ, access(0, VIRTIO_BAR_SIZE - 4, 8)), EINVAL],
    ['a read of a region that does not exist', message(0, Cmd.REGION_READ, access(42, 0, 4)), EINVAL],
    ['a write whose count is not its data', message(0, Cmd.REGION_WRITE, access(0, NOTIFY_OFFSET, 4, Uint8Array.of(0, 0))), EINVAL],
    ['an unknown command', message(0, 200, u32s(0)), EINVAL],
    ['a command without its payload (is_valid_header)', message(0, Cmd.REGION_READ, new Uint8Array(0)), EINVAL],
    ['DMA_MAP with an unknown flag', message(0, Cmd.DMA_MAP, cat(u32s(32, 0x10), u64(0), u64(0x10_0000), u64(0x1000))), EINVAL],
    ['DMA_UNMAP of a range never mapped (dma_controller_remove_region)', message(0, Cmd.DMA_UNMAP, cat(u32s(24, 0), u64(0x4000_0000), u64(0x1000))), ENOENT],
    ['SET_IRQS for an irq type beyond REQ', message(0, Cmd.DEVICE_SET_IRQS, u32s(20, 0x24, 9, 0, 0)), EINVAL],
  ];
  for (const [what, bytes, errno] of cases) {
    c.send(bytes);
    t.equal((await c.reply()).errno, errno, what);
  }
  t.ok(server.isAttached, 'the client is still attached after every refusal');
  t.equal(await status(), 1, 'and the device kept its state');
});

t.test('DMA_MAP of a memfd becomes fd-backed guest memory; DMA_UNMAP removes it; DEVICE_RESET resets', async (t) => {
  const { server, socketPath } = start(t);
  const c = await connected(socketPath);
  t.teardown(() => c.close());
  const size = 0x20_0000;
  const fd = memfdCreate('guest-ram', size);
  const ours = mmap(fd, 0, size, true);
  t.teardown(() => munmap(ours));
  const gpa = 0x10_0000;
  const fdOffset = 0x1000;
  const map = await c.request(Cmd.DMA_MAP, cat(u32s(32, PROT_RW), u64(fdOffset), u64(gpa), u64(size - fdOffset)), [fd]);
  close(fd);
  t.equal(map.errno, 0, 'DMA_MAP accepted');
  const mem = server.fn.guestMemory;
  t.same(mem.regionList.map((r) => [r.guestPhysAddr, r.size]), [[gpa, size - fdOffset]], 'one region at its guest address');
  new Uint8Array(ours).set([9, 8, 7], fdOffset + 0x10);
  const seen = new Uint8Array(3);
  mem.read(gpa + 0x10, seen);
  t.same([...seen], [9, 8, 7], 'the same pages: bytes the client wrote at the fd offset are the guest\'s');

  const overlap = await c.request(Cmd.DMA_MAP, cat(u32s(32, PROT_RW), u64(0), u64(gpa + 0x1000), u64(0x1000)));
  t.equal(overlap.errno, EINVAL, 'an overlapping DMA_MAP: EINVAL (dma_controller_add_region)');

  const unmap = await c.request(Cmd.DMA_UNMAP, cat(u32s(24, 0), u64(gpa), u64(size - fdOffset)));
  t.equal(unmap.errno, 0, 'DMA_UNMAP accepted');
  t.equal(server.fn.guestMemory.regionList.length, 0, 'guest memory is empty again');
  t.equal(server.counters.dmaMaps, 1);
  t.equal(server.counters.dmaUnmaps, 1);

  const resets = server.counters.resets;
  t.equal((await c.request(Cmd.DEVICE_RESET, new Uint8Array(0))).errno, 0, 'DEVICE_RESET');
  t.equal(server.counters.resets, resets + 1, 'reached the device');
});

t.test('a silent client is dropped after the stall timeout; a half-sent message is EINVAL; the server serves the next one', async (t) => {
  const { server, socketPath } = start(t);
  const silent = RawClient.connect(socketPath);
  t.ok(await silent.closedByServer(STALL_TIMEOUT_MS * 5), 'a client that never sends VERSION is dropped');
  silent.close();

  const half = await connected(socketPath);
  const whole = message(1, Cmd.REGION_READ, access(0, 0, 4), HEADER_SIZE + 16);
  half.send(whole.subarray(0, HEADER_SIZE + 4)); // the header announces 16 payload bytes; 4 come
  t.equal((await half.reply()).errno, EINVAL, 'a body shorter than its header says: EINVAL (tran_sock_recv_body, short read)');
  half.close();
  t.ok(await until(() => !server.isAttached), 'the server let it go');

  const next = await connected(socketPath);
  t.equal((await next.request(Cmd.DEVICE_GET_INFO, u32s(16, 0, 0, 0))).errno, 0, 'the next client is served');
  next.close();
});
