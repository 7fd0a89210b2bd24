// The VIRTIO shared memory codec (GET_SHMEM_CONFIG reply, SHMEM_MAP/UNMAP payload) and the back-end channel's
// SHMEM_MAP/UNMAP sender, against a real socket pair and a real memfd: the front-end side here reads what the
// channel sent (bytes and the passed fd) and answers as QEMU does. test/qemu/shmem-map.test.ts runs the same sender
// against the project's QEMU.
import t from 'tap';
import { close, fdSize, memfdCreate, socketPair } from '../../../vmm-device/native/sys.ts';
import { BackendChannel, ShmemRefusedError } from '../../../vmm-device/transport/vhost-user/backend-channel.ts';
import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FrontendRequest,
  HEADER_SIZE,
  ProtocolFeature,
  VHOST_USER_VERSION,
  VhostUserProtocolError,
  decodeHeader,
  encodeMessage,
  encodeU64,
} from '../../../vmm-device/transport/vhost-user/messages.ts';
import {
  MAX_SHMEM_REGIONS,
  SHMEM_CONFIG_SIZE,
  SHMEM_MAP_SIZE,
  checkGetShmemConfig,
  decodeShmemConfig,
  decodeShmemMap,
  encodeShmemConfig,
  encodeShmemMap,
  type ShmemMapRequest,
} from '../../../vmm-device/transport/vhost-user/shmem-messages.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';

const host = new SysHost();

t.test('SHMEM is protocol feature 22, as QEMU 11.1 numbers it', async (t) => {
  t.equal(ProtocolFeature.SHMEM, 22);
  t.equal(FrontendRequest.GET_SHMEM_CONFIG, 44);
  t.equal(BackendRequest.SHMEM_MAP, 9);
  t.equal(BackendRequest.SHMEM_UNMAP, 10);
});

t.test('GET_SHMEM_CONFIG reply: nregions, then sizes indexed by shmid', async (t) => {
  const b = encodeShmemConfig(new Map([[0, 0x10_0000n], [7, 0x1000n], [255, 1n << 40n]]));
  t.equal(b.length, SHMEM_CONFIG_SIZE);
  t.equal(SHMEM_CONFIG_SIZE, 2056);
  const dv = new DataView(b.buffer);
  t.equal(dv.getUint32(0, true), 3, 'nregions counts the regions');
  t.equal(dv.getUint32(4, true), 0, 'padding');
  t.equal(dv.getBigUint64(8 + 8 * 7, true), 0x1000n, 'region 7 at index 7');
  t.equal(dv.getBigUint64(8 + 8 * 1, true), 0n, 'an absent id is 0');
  t.same(decodeShmemConfig(b), new Map([[0, 0x10_0000n], [7, 0x1000n], [255, 1n << 40n]]), 'round trip');
  dv.setUint32(0, 2, true);
  t.equal(decodeShmemConfig(b), undefined, 'nregions that disagrees with the sizes');
  t.equal(decodeShmemConfig(b.subarray(0, 2048)), undefined, 'a short reply');
  t.throws(() => encodeShmemConfig(new Map([[MAX_SHMEM_REGIONS, 1n]])), RangeError, 'id 256');
  t.throws(() => encodeShmemConfig(new Map([[1, 0n]])), RangeError, 'a region of size 0');
  t.same(decodeShmemConfig(encodeShmemConfig(new Map())), new Map(), 'no region at all');
});

t.test('GET_SHMEM_CONFIG request: no payload, no fds', async (t) => {
  const h = { request: FrontendRequest.GET_SHMEM_CONFIG, flags: VHOST_USER_VERSION, size: 0 };
  t.doesNotThrow(() => checkGetShmemConfig(h, new Uint8Array(0), 0));
  t.throws(() => checkGetShmemConfig({ ...h, size: 8 }, new Uint8Array(8), 0), VhostUserProtocolError, 'a payload');
  t.throws(() => checkGetShmemConfig(h, new Uint8Array(0), 1), VhostUserProtocolError, 'an fd');
  t.throws(() => checkGetShmemConfig({ ...h, request: FrontendRequest.GET_CONFIG }, new Uint8Array(0), 0), VhostUserProtocolError, 'another request');
});

t.test('SHMEM_MAP payload: 40 bytes, checked both ways', async (t) => {
  const m: ShmemMapRequest = { shmid: 3, fdOffset: 0x2000n, shmOffset: 0x10_0000n, len: 0x3000n, writable: true };
  const b = encodeShmemMap(m);
  t.equal(b.length, SHMEM_MAP_SIZE);
  t.same(
    [...b],
    // shmid, padding[7], fd_offset, shm_offset, len, flags (little-endian)
    [3, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
  );
  t.same(decodeShmemMap(b), m, 'round trip');
  t.equal(decodeShmemMap(encodeShmemMap({ ...m, writable: false }))?.writable, false, 'read-only: flags 0');
  const badPad = b.slice();
  badPad[1] = 1;
  t.equal(decodeShmemMap(badPad), undefined, 'non-zero padding');
  const badFlags = b.slice();
  badFlags[32] = 3;
  t.equal(decodeShmemMap(badFlags), undefined, 'unknown flag bits');
  t.equal(decodeShmemMap(b.subarray(0, 39)), undefined, 'a short payload');
  t.throws(() => encodeShmemMap({ ...m, shmid: 256 }), RangeError, 'shmid 256');
  t.throws(() => encodeShmemMap({ ...m, len: 0n }), RangeError, 'length 0');
  t.throws(() => encodeShmemMap({ ...m, shmOffset: (1n << 64n) - 0x1000n }), RangeError, 'a range wrapping 2^64');
  t.throws(() => encodeShmemMap({ ...m, fdOffset: -1n }), RangeError, 'a negative offset');
});

/** A front-end end of the back-end channel: reads one request (with its fds) and answers `answer` if asked. */
function frontEnd(fd: number): { next(answer: bigint): Promise<{ request: number; flags: number; payload: Uint8Array; fds: number[] }> } {
  return {
    next: (answer) =>
      new Promise((resolve) => {
        const w = host.watchReadable(fd, () => {
          const r = host.recv(fd, 256, 4);
          if (r.kind !== 'data') return;
          w.stop();
          const h = decodeHeader(r.bytes);
          const payload = r.bytes.slice(HEADER_SIZE, HEADER_SIZE + h.size);
          if ((h.flags & FLAG_NEED_REPLY) !== 0) host.sendMessage(fd, encodeMessage(h.request, VHOST_USER_VERSION | FLAG_REPLY, encodeU64(answer)), []);
          resolve({ request: h.request, flags: h.flags, payload, fds: r.fds });
        });
      }),
  };
}

t.test('BackendChannel.shmemMap/shmemUnmap: the request, the fd, and the answer', async (t) => {
  const [ours, theirs] = socketPair();
  const channel = new BackendChannel(host, ours, true, new RecordingLogger('test'));
  t.teardown(() => {
    channel.close();
    close(theirs);
  });
  const fe = frontEnd(theirs);
  const memfd = memfdCreate('shmem-channel-test', 8192);
  t.teardown(() => close(memfd));
  const m: ShmemMapRequest = { shmid: 0, fdOffset: 4096n, shmOffset: 0n, len: 4096n, writable: true };

  const [sent] = await Promise.all([fe.next(0n), channel.shmemMap(m, memfd)]);
  t.equal(sent.request, BackendRequest.SHMEM_MAP);
  t.ok(sent.flags & FLAG_NEED_REPLY, 'asks for an answer');
  t.same(decodeShmemMap(sent.payload), m, 'the payload names the mapping');
  t.equal(sent.fds.length, 1, 'one fd passed');
  t.equal(fdSize(sent.fds[0]!), 8192, 'and it is the memfd');
  for (const fd of sent.fds) close(fd);

  const [refusedMap] = await Promise.all([fe.next(1n), t.rejects(channel.shmemMap(m, memfd), ShmemRefusedError, 'a non-zero answer rejects')]);
  for (const fd of refusedMap.fds) close(fd);

  const [unmap] = await Promise.all([fe.next(0n), channel.shmemUnmap(m)]);
  t.equal(unmap.request, BackendRequest.SHMEM_UNMAP);
  t.equal(unmap.fds.length, 0, 'SHMEM_UNMAP carries no fd');
  t.same(decodeShmemMap(unmap.payload), m);
  await Promise.all([fe.next(5n), t.rejects(channel.shmemUnmap(m), ShmemRefusedError, 'a refused unmap rejects')]);
});

t.test('without REPLY_ACK nothing would confirm a mapping: refused before sending', async (t) => {
  const [ours, theirs] = socketPair();
  const channel = new BackendChannel(host, ours, false, new RecordingLogger('test'));
  t.teardown(() => {
    channel.close();
    close(theirs);
  });
  const memfd = memfdCreate('shmem-channel-noack', 4096);
  t.teardown(() => close(memfd));
  await t.rejects(channel.shmemMap({ shmid: 0, fdOffset: 0n, shmOffset: 0n, len: 4096n, writable: true }, memfd), ShmemRefusedError);
  t.equal(host.recv(theirs, 64, 1).kind, 'again', 'nothing was sent');
});
