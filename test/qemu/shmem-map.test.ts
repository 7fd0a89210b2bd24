// VIRTIO shared memory regions through the project's QEMU (scripts/qemu/patches/vhost-user-shmem.patch): a small
// vhost-user back-end in this file answers GET_SHMEM_CONFIG, maps ranges of a memfd with SHMEM_MAP on the back-end
// channel (BackendChannel.shmemMap, the sender the device uses), and the test, as the guest, finds the regions in
// PCI configuration space and reads and writes them through the BAR with qtest. Bad requests get a failure answer
// and QEMU keeps running.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { QemuQtest, VirtioPciDevice, sharedMemoryRegions, type SharedMemoryRegion } from '../../guest-driver-spec/qtest/index.ts';
import { close, memfdCreate, mmap, munmap, pageSize } from '../../vmm-device/native/sys.ts';
import { BackendChannel, ShmemRefusedError } from '../../vmm-device/transport/vhost-user/backend-channel.ts';
import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FrontendRequest,
  HEADER_SIZE,
  ProtocolFeature,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_VERSION,
  VRING_NOFD_MASK,
  bit,
  decodeHeader,
  encodeMessage,
  encodeU64,
} from '../../vmm-device/transport/vhost-user/messages.ts';
import {
  SHMEM_MAP_SIZE,
  checkGetShmemConfig,
  decodeShmemMap,
  encodeShmemConfig,
  encodeShmemMap,
  type ShmemMapRequest,
} from '../../vmm-device/transport/vhost-user/shmem-messages.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';

const host = new SysHost();
const PAGE = pageSize();
/** The regions the back-end declares: id 0 of 1 MiB and id 2 of 64 KiB (ids may be sparse). */
const REGIONS = new Map<number, bigint>([
  [0, 1n << 20n],
  [2, 64n << 10n],
]);
const MEMFD_SIZE = 16 * PAGE;
const VIRTIO_ID = 42;
const VIRTIO_F_VERSION_1 = 32;
/** What the test back-end offers: enough to get mappings confirmed (REPLY_ACK) over the back-end channel. */
const PROTOCOL_FEATURES =
  bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.BACKEND_SEND_FD) | bit(ProtocolFeature.SHMEM);
const READ_BUFFER = 4096;
const MAX_FDS = 8;

/**
 * A vhost-user back-end reduced to what QEMU asks of the generic device before a driver sets DRIVER_OK, plus
 * GET_SHMEM_CONFIG. Every request it does not know is acknowledged (REPLY_ACK) and recorded, so the test sees it.
 */
class ShmemBackend {
  readonly requests: number[] = [];
  channel: BackendChannel | undefined;
  private listenFd: number;
  private connFd: number | undefined;
  private buffered = new Uint8Array(0);
  private fds: number[] = [];
  private readonly stops: (() => void)[] = [];
  private protocol = 0n;
  readonly log = new RecordingLogger('shmem-backend');

  constructor(
    readonly socketPath: string,
    /** The GET_SHMEM_CONFIG reply (default: REGIONS), to send malformed ones. */
    private readonly shmemConfig: Uint8Array = encodeShmemConfig(REGIONS),
  ) {
    this.listenFd = host.listenUnix(socketPath, 1);
    const w = host.watchReadable(this.listenFd, () => {
      const fd = host.accept(this.listenFd);
      if (fd === undefined || this.connFd !== undefined) {
        if (fd !== undefined) host.close(fd);
        return;
      }
      this.connFd = fd;
      const cw = host.watchReadable(fd, () => this.onReadable(fd));
      this.stops.push(() => cw.stop());
    });
    this.stops.push(() => w.stop());
  }

  private onReadable(fd: number): void {
    for (;;) {
      const r = host.recv(fd, READ_BUFFER, MAX_FDS);
      if (r.kind === 'again') return;
      if (r.kind === 'eof') {
        this.disconnect();
        return;
      }
      this.fds.push(...r.fds);
      const joined = new Uint8Array(this.buffered.length + r.bytes.length);
      joined.set(this.buffered);
      joined.set(r.bytes, this.buffered.length);
      this.buffered = joined;
      while (this.buffered.length >= HEADER_SIZE) {
        const h = decodeHeader(this.buffered);
        if (this.buffered.length < HEADER_SIZE + h.size) break;
        const payload = this.buffered.slice(HEADER_SIZE, HEADER_SIZE + h.size);
        this.buffered = this.buffered.slice(HEADER_SIZE + h.size);
        this.serve(fd, h.request, h.flags, payload);
      }
    }
  }

  private takeFd(): number {
    const fd = this.fds.shift();
    if (fd === undefined) throw new Error('a request that carries an fd came without one');
    return fd;
  }

  private reply(fd: number, request: number, payload: Uint8Array): void {
    host.sendMessage(fd, encodeMessage(request, VHOST_USER_VERSION | FLAG_REPLY, payload), []);
  }

  private serve(fd: number, request: number, flags: number, payload: Uint8Array): void {
    this.requests.push(request);
    const u64 = (): bigint => new DataView(payload.buffer, payload.byteOffset, 8).getBigUint64(0, true);
    switch (request) {
      case FrontendRequest.GET_FEATURES:
        this.reply(fd, request, encodeU64(bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VIRTIO_F_VERSION_1)));
        return;
      case FrontendRequest.GET_PROTOCOL_FEATURES:
        this.reply(fd, request, encodeU64(PROTOCOL_FEATURES));
        return;
      case FrontendRequest.SET_PROTOCOL_FEATURES:
        this.protocol = u64();
        break;
      case FrontendRequest.GET_SHMEM_CONFIG:
        checkGetShmemConfig({ request, flags, size: payload.length }, payload, 0);
        this.reply(fd, request, this.shmemConfig);
        return;
      case FrontendRequest.SET_BACKEND_REQ_FD:
        this.channel = new BackendChannel(host, this.takeFd(), (this.protocol & bit(ProtocolFeature.REPLY_ACK)) !== 0n, this.log);
        break;
      case FrontendRequest.SET_VRING_CALL:
      case FrontendRequest.SET_VRING_ERR:
      case FrontendRequest.SET_VRING_KICK:
        if ((u64() & BigInt(VRING_NOFD_MASK)) === 0n) host.close(this.takeFd());
        break;
      default:
        for (const extra of this.fds.splice(0)) host.close(extra);
    }
    if ((flags & FLAG_NEED_REPLY) !== 0) this.reply(fd, request, encodeU64(0n));
  }

  /** Closes the front-end connection (QEMU then drops what the back-end mapped). */
  disconnect(): void {
    this.channel?.close();
    this.channel = undefined;
    if (this.connFd !== undefined) {
      host.close(this.connFd);
      this.connFd = undefined;
    }
    for (const fd of this.fds.splice(0)) host.close(fd);
  }

  close(): void {
    this.disconnect();
    for (const stop of this.stops.splice(0)) stop();
    host.close(this.listenFd);
  }
}

interface Rig {
  backend: ShmemBackend;
  qemu: QemuQtest;
  dev: VirtioPciDevice;
  regions: SharedMemoryRegion[];
  finish(): Promise<void>;
}

const deviceArgs = (socketPath: string, extra = ''): string[] => [
  '-chardev',
  `socket,id=vu,path=${socketPath}`,
  '-device',
  `vhost-user-device-pci,chardev=vu,virtio-id=${VIRTIO_ID},num_vqs=3${extra}`,
];

async function startRig(): Promise<Rig> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-shmem-test-'));
  const socketPath = path.join(dir, 'vu.sock');
  const backend = new ShmemBackend(socketPath);
  let qemu: QemuQtest;
  try {
    qemu = await QemuQtest.start({ workDir: dir, args: deviceArgs(socketPath) });
  } catch (error) {
    backend.close();
    fs.rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  const finish = async (): Promise<void> => {
    await qemu.stop();
    backend.close();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    const dev = await VirtioPciDevice.probe(qemu.qtest, { virtioId: VIRTIO_ID, intxIrq: false });
    return { backend, qemu, dev, regions: await sharedMemoryRegions(dev), finish };
  } catch (error) {
    const stderr = qemu.stderr;
    await finish();
    throw new Error(`${(error as Error).message}\nQEMU stderr:\n${stderr}`);
  }
}

/** The mappings of `name` in QEMU's address space (lines of /proc/PID/maps). */
function qemuMappingsOf(pid: number, name: string): string[] {
  return fs
    .readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => l.includes(name));
}

async function until(done: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!done()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);

t.test('QEMU asks GET_SHMEM_CONFIG and shows each region as a shared memory capability of a 64-bit BAR', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  t.ok(rig.backend.requests.includes(FrontendRequest.GET_SHMEM_CONFIG), 'GET_SHMEM_CONFIG was asked at realize');
  t.same(
    rig.regions.map((r) => [r.id, r.length]).sort((a, b) => Number(a[0]) - Number(b[0])),
    [...REGIONS.entries()],
    'one capability per region, with its id and size',
  );
  const bar = rig.dev.pci.bar(rig.regions[0]!.bar)!;
  t.equal(bar.kind, 'mem64', 'the regions sit in a 64-bit memory BAR');
  t.ok(bar.prefetchable, 'prefetchable');
  t.ok(rig.regions.every((r) => r.bar === bar.index), 'both regions in the same BAR');
  t.notOk(
    rig.regions[0]!.offset < rig.regions[1]!.offset + rig.regions[1]!.length && rig.regions[1]!.offset < rig.regions[0]!.offset + rig.regions[0]!.length,
    'the regions do not overlap',
  );
  t.equal(await rig.qemu.qtest.readl(rig.regions[0]!.address), 0, 'an unmapped range reads as zero');
});

t.test('SHMEM_MAP shows a memfd range to the guest both ways; SHMEM_UNMAP takes it away', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const channel = rig.backend.channel!;
  t.ok(channel, 'QEMU gave the back-end its channel');
  const memfd = memfdCreate('vrdma-shmem-test', MEMFD_SIZE);
  const view = mmap(memfd, 0, MEMFD_SIZE, true);
  t.teardown(() => {
    munmap(view);
    close(memfd);
  });
  const bytes = new Uint8Array(view);
  const region = rig.regions.find((r) => r.id === 0)!;
  const map: ShmemMapRequest = { shmid: 0, fdOffset: BigInt(PAGE), shmOffset: 16n * BigInt(PAGE), len: 2n * BigInt(PAGE), writable: true };
  const guest = region.address + map.shmOffset;

  bytes.set(pattern(2 * PAGE, 3), PAGE);
  await channel.shmemMap(map, memfd);
  t.same([...(await rig.qemu.qtest.read(guest, 64))], [...pattern(64, 3)], 'the guest reads the memfd bytes at fd offset one page');
  t.same(
    [...(await rig.qemu.qtest.read(guest + BigInt(PAGE) + 4000n, 96))],
    [...pattern(PAGE + 4096, 3).subarray(PAGE + 4000, PAGE + 4096)],
    'across the whole length (second page)',
  );
  await rig.qemu.qtest.writel(guest + 8n, 0xdeadbeef);
  await rig.qemu.qtest.write(guest + BigInt(PAGE) + 100n, Uint8Array.of(1, 2, 3, 4, 5));
  t.equal(new DataView(view).getUint32(PAGE + 8, true), 0xdeadbeef, 'the back-end sees the guest store');
  t.same([...bytes.subarray(2 * PAGE + 100, 2 * PAGE + 105)], [1, 2, 3, 4, 5], 'and a byte write in the second page');
  t.equal(qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-test').length, 1, 'QEMU holds one mapping of the memfd');

  await channel.shmemUnmap(map);
  await until(() => qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-test').length === 0, 'QEMU to munmap the memfd');
  t.pass('QEMU unmapped the memfd');
  t.equal(await rig.qemu.qtest.readl(guest + 8n), 0, 'the range reads as zero again');
  await rig.qemu.qtest.writel(guest + 12n, 0x12345678);
  t.equal(new DataView(view).getUint32(PAGE + 12, true), new DataView(pattern(16, 3).buffer).getUint32(12, true), 'a guest store no longer reaches the memfd');
  t.ok(rig.qemu.running, 'QEMU is running');
});

t.test('a read-only mapping: the guest reads, its stores are dropped', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const memfd = memfdCreate('vrdma-shmem-ro', MEMFD_SIZE);
  const view = mmap(memfd, 0, MEMFD_SIZE, true);
  t.teardown(() => {
    munmap(view);
    close(memfd);
  });
  new Uint8Array(view).set(pattern(PAGE, 9));
  const region = rig.regions.find((r) => r.id === 2)!;
  await rig.backend.channel!.shmemMap({ shmid: 2, fdOffset: 0n, shmOffset: 0n, len: BigInt(PAGE), writable: false }, memfd);
  t.same([...(await rig.qemu.qtest.read(region.address, 32))], [...pattern(32, 9)], 'the guest reads region 2');
  t.equal(await rig.qemu.qtest.readq(region.address + 8n), new DataView(pattern(16, 9).buffer).getBigUint64(8, true), 'an 8-byte load');
  await rig.qemu.qtest.writel(region.address, 0xffffffff);
  t.same([...new Uint8Array(view, 0, 4)], [...pattern(4, 9)], 'the guest store was dropped');
  t.ok(rig.qemu.running, 'QEMU is running (no store hit a read-only page)');
});

t.test('bad SHMEM_MAP and SHMEM_UNMAP requests are refused and change nothing; QEMU keeps running', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const channel = rig.backend.channel!;
  const memfd = memfdCreate('vrdma-shmem-bad', MEMFD_SIZE);
  const view = mmap(memfd, 0, MEMFD_SIZE, true);
  t.teardown(() => {
    munmap(view);
    close(memfd);
  });
  new Uint8Array(view).set(pattern(MEMFD_SIZE, 5));
  const P = BigInt(PAGE);
  const size0 = REGIONS.get(0)!;
  const good: ShmemMapRequest = { shmid: 0, fdOffset: 0n, shmOffset: 4n * P, len: 4n * P, writable: true };
  await channel.shmemMap(good, memfd);

  const refused = async (what: string, m: ShmemMapRequest, fds = [memfd]): Promise<void> => {
    await t.rejects(channel.shmemMap(m, fds[0]!), ShmemRefusedError, `${what}: refused`);
  };
  await refused('offset past the region', { ...good, shmOffset: size0 });
  await refused('range ends past the region', { ...good, shmOffset: size0 - P, len: 2n * P });
  await refused('range wrapping 2^64 inside QEMU', { ...good, shmOffset: (1n << 64n) - 2n * P, len: P });
  await refused('overlapping a live mapping', { ...good, shmOffset: 6n * P });
  await refused('containing a live mapping', { ...good, shmOffset: 0n, len: 16n * P });
  await refused('an unknown shmid', { ...good, shmid: 1 });
  await refused('shmid 255', { ...good, shmid: 255 });
  await refused('an offset that is not page aligned', { ...good, shmOffset: 64n * P + 8n });
  await refused('a length that is not page aligned', { ...good, shmOffset: 64n * P, len: 100n });
  await refused('an fd offset that is not page aligned', { ...good, shmOffset: 64n * P, fdOffset: 12n });
  await refused('an fd range past the end of the file (mmap fails)', { ...good, shmOffset: 64n * P, fdOffset: 1n << 40n });
  await t.rejects(channel.shmemUnmap({ ...good, len: P }), ShmemRefusedError, 'an unmap naming part of a mapping: refused');
  await t.rejects(channel.shmemUnmap({ ...good, shmOffset: 32n * P }), ShmemRefusedError, 'an unmap naming no mapping: refused');

  // Malformed at the protocol level, sent raw (the encoder refuses to build them).
  const raw = encodeShmemMap({ ...good, shmOffset: 64n * P });
  new DataView(raw.buffer).setBigUint64(32, 2n, true);
  t.not(await channel.request(BackendRequest.SHMEM_MAP, raw, [memfd]), 0n, 'unknown flag bits: a failure answer');
  t.not(await channel.request(BackendRequest.SHMEM_MAP, encodeShmemMap({ ...good, shmOffset: 64n * P }), []), 0n, 'SHMEM_MAP without an fd: a failure answer');
  t.not(await channel.request(BackendRequest.SHMEM_MAP, new Uint8Array(SHMEM_MAP_SIZE - 8), [memfd]), 0n, 'a short payload: a failure answer');
  const zeroLen = encodeShmemMap({ ...good, shmOffset: 64n * P });
  new DataView(zeroLen.buffer).setBigUint64(24, 0n, true);
  t.equal(decodeShmemMap(zeroLen)?.len, 0n, 'the raw payload names length 0');
  t.not(await channel.request(BackendRequest.SHMEM_MAP, zeroLen, [memfd]), 0n, 'length 0: a failure answer');

  t.ok(rig.qemu.running, 'QEMU is running after every bad request');
  const region = rig.regions.find((r) => r.id === 0)!;
  t.same([...(await rig.qemu.qtest.read(region.address + 4n * P, 16))], [...pattern(16, 5)], 'the good mapping still works');
  t.equal(await rig.qemu.qtest.readl(region.address + 64n * P), 0, 'no refused request left a mapping behind');
  t.equal(qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-bad').length, 1, 'QEMU holds exactly the one good mapping of the memfd');
  await channel.shmemUnmap(good);
  await t.rejects(channel.shmemUnmap(good), ShmemRefusedError, 'a second unmap of the same mapping: refused');
  await channel.shmemMap(good, memfd);
  t.pass('the range can be mapped again after its unmap');
});

t.test('the back-end disconnecting drops its mappings; QEMU keeps running', async (t) => {
  const rig = await startRig();
  t.teardown(() => rig.finish());
  const memfd = memfdCreate('vrdma-shmem-gone', MEMFD_SIZE);
  const view = mmap(memfd, 0, MEMFD_SIZE, true);
  t.teardown(() => {
    munmap(view);
    close(memfd);
  });
  new Uint8Array(view).set(pattern(PAGE, 1));
  const region = rig.regions.find((r) => r.id === 0)!;
  await rig.backend.channel!.shmemMap({ shmid: 0, fdOffset: 0n, shmOffset: 0n, len: BigInt(PAGE), writable: true }, memfd);
  await rig.backend.channel!.shmemMap({ shmid: 2, fdOffset: BigInt(PAGE), shmOffset: 0n, len: BigInt(PAGE), writable: false }, memfd);
  t.equal(qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-gone').length, 2, 'two mappings in QEMU');
  rig.backend.disconnect();
  await until(() => qemuMappingsOf(rig.qemu.pid, 'vrdma-shmem-gone').length === 0, 'QEMU to drop the mappings');
  t.pass('QEMU unmapped both when the back-end went away');
  t.equal(await rig.qemu.qtest.readl(region.address), 0, 'the range reads as zero');
  t.ok(rig.qemu.running, 'QEMU is running');
});

/** Starts QEMU against a back-end that answers GET_SHMEM_CONFIG with `config`; returns QEMU's stderr once it exited. */
async function refusedAtStart(config: Uint8Array, extra = ''): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-shmem-bad-'));
  const backend = new ShmemBackend(path.join(dir, 'vu.sock'), config);
  try {
    const qemu = await QemuQtest.start({ workDir: dir, args: deviceArgs(backend.socketPath, extra) });
    // qtest may connect before the device is realized: then QEMU exits right after.
    const exited = await Promise.race([qemu.exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 10_000))]);
    // The exit can be reported before the last of stderr is read.
    await until(() => !exited || /qemu-system/.test(qemu.stderr), 'the error message of QEMU', 2000).catch(() => undefined);
    const stderr = qemu.stderr;
    const info = await qemu.stop();
    if (!exited) throw new Error(`QEMU accepted the device:\n${stderr}`);
    return `exit code ${info.code}, signal ${info.signal}: ${stderr}`;
  } catch (error) {
    return (error as Error).message;
  } finally {
    backend.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

t.test('a GET_SHMEM_CONFIG reply QEMU cannot use, or a BAR it cannot place, stops the device at creation with an error', async (t) => {
  const mismatch = encodeShmemConfig(REGIONS);
  new DataView(mismatch.buffer).setUint32(0, 5, true);
  t.match(await refusedAtStart(mismatch), /^exit code 1, signal null: .*GET_SHMEM_CONFIG: nregions 5, but 2 non-zero sizes/s, 'nregions disagreeing with the sizes (exit code 1, no crash)');
  t.match(await refusedAtStart(encodeShmemConfig(new Map([[1, 100n]]))), /shared memory region 1: size 0x64 is not a page multiple/, 'a size that is not a page multiple');
  t.match(await refusedAtStart(encodeShmemConfig(new Map([[1, 1n << 41n]]))), /shared memory region 1: size 0x20000000000 .* at most 0x10000000000/, 'a region above 1 TiB');
  t.match(await refusedAtStart(encodeShmemConfig(REGIONS).subarray(0, 2048)), /GET_SHMEM_CONFIG: reply of request 44, 2048 bytes/, 'a short reply');
  t.match(await refusedAtStart(encodeShmemConfig(REGIONS), ',modern-pio-notify=on'), /shared memory regions use BAR 2, which modern-pio-notify takes/, 'modern-pio-notify with regions');
});
