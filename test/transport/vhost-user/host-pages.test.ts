// The host-page mapping service over vhost-user (virtio/device.ts HostPageMapper, transport/vhost-user/host-pages.ts)
// as the device model sees it in its activation context: a queue's notify page over VRING_HOST_NOTIFIER_MSG on the
// back-end channel (the front-end's answer checked), and shared memory refused with the reason when the model
// declares no region (shmem.test.ts covers SHMEM_MAP). Real sockets, memfds and the reference front-end.
import t from 'tap';
import { GuestAllocator } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { host, rig, startRing, type Rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';
import { BackendRequest, ProtocolFeature as P, SUPPORTED_PROTOCOL_FEATURES, bit, decodeVringArea } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ShmemRefusedError } from '../../../vmm-device/transport/vhost-user/backend-channel.ts';
import type { HostPageMapper } from '../../../vmm-device/virtio/device.ts';

async function running(opts: { channel?: boolean } = {}): Promise<{ r: Rig; pages: HostPageMapper }> {
  const r = await rig({ queues: 2 });
  await r.fe.init({ queues: 2, backendChannel: opts.channel ?? true });
  const ram = r.ram();
  await r.fe.setFeatures(bit(32) | bit(30));
  await r.fe.setMemTable(ram.regions);
  await startRing(r, ram, new GuestAllocator(ram), 0, 16);
  await r.fe.addStatus(0xf);
  await r.fe.sync();
  const pages = r.device.ctx?.hostPages;
  if (pages === undefined) throw new Error('the activation context carries no host-page mapper');
  return { r, pages };
}

const NO_REGIONS = /^shared memory \(SHMEM_MAP\/SHMEM_UNMAP\): the device model declares no shared memory regions$/;

t.test('capabilities: the queue notifier is there, shared memory is not (and says why)', async (t) => {
  const { r, pages } = await running();
  const caps = pages.capabilities();
  t.equal(caps.queueNotifier, true);
  t.equal(caps.sharedMemory.size, 0);
  t.equal(caps.missing.length, 1);
  t.match(caps.missing[0], NO_REGIONS);
  t.notOk(r.fe.protocolFeatures & bit(P.SHMEM), 'SHMEM was not offered to the front-end');
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('mapQueueNotifier sends VRING_HOST_NOTIFIER_MSG with the page and resolves on the front-end\'s 0', async (t) => {
  const { r, pages } = await running();
  const page = host.memfd('doorbell', host.pageSize);
  const mapped = pages.mapQueueNotifier(1, page, 0n, host.pageSize);
  const req = await r.fe.nextBackendRequest();
  t.equal(req?.header.request, BackendRequest.VRING_HOST_NOTIFIER_MSG);
  t.same(decodeVringArea(req!.payload), { u64: 1n, size: BigInt(host.pageSize), offset: 0n });
  t.equal(req!.fds.length, 1, 'the page travelled');
  // The front-end maps it as QEMU does: a store there lands in the back-end's page.
  const theirs = host.mmapShared(req!.fds[0]!, host.pageSize, 0);
  new Uint32Array(theirs)[0] = 0x1234;
  const ours = host.mmapShared(page, host.pageSize, 0);
  t.equal(new Uint32Array(ours)[0], 0x1234);
  host.munmap(theirs);
  host.munmap(ours);
  host.close(req!.fds[0]!);
  r.fe.answerBackendRequest(BackendRequest.VRING_HOST_NOTIFIER_MSG, 0n);
  await t.resolves(mapped);

  const unmapped = pages.unmapQueueNotifier(1);
  const req2 = await r.fe.nextBackendRequest();
  t.equal(decodeVringArea(req2!.payload)!.u64, 0x101n, 'queue 1 with NOFD');
  t.equal(req2!.fds.length, 0);
  r.fe.answerBackendRequest(BackendRequest.VRING_HOST_NOTIFIER_MSG, 0n);
  await t.resolves(unmapped);
  host.close(page);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('a front-end that refuses: mapQueueNotifier rejects with its answer', async (t) => {
  const { r, pages } = await running();
  const page = host.memfd('doorbell', host.pageSize);
  const mapped = pages.mapQueueNotifier(0, page, 0n, host.pageSize);
  const req = await r.fe.nextBackendRequest();
  for (const fd of req!.fds) host.close(fd);
  r.fe.answerBackendRequest(BackendRequest.VRING_HOST_NOTIFIER_MSG, 1n);
  await t.rejects(mapped, /the front-end refused queue 0's page \(answer 1\)/);
  host.close(page);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('bad arguments are refused before anything is sent', async (t) => {
  const { r, pages } = await running();
  const page = host.memfd('doorbell', 2 * host.pageSize);
  await t.rejects(pages.mapQueueNotifier(0, page, 0n, 2 * host.pageSize), /is not the page size/);
  await t.rejects(pages.mapQueueNotifier(0, page, 100n, host.pageSize), /not page aligned/);
  await t.rejects(pages.mapQueueNotifier(2, page, 0n, host.pageSize), /queue 2 is not below 2/);
  t.equal(await r.fe.nextBackendRequest(200), undefined, 'nothing reached the front-end');
  host.close(page);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('shared memory without regions: mapShared and unmapShared reject with the reason', async (t) => {
  const { r, pages } = await running();
  const fd = host.memfd('queue-pages', host.pageSize);
  await t.rejects(pages.mapShared({ shmid: 0, shmOffset: 0n, fd, fdOffset: 0n, length: BigInt(host.pageSize), writable: true }), ShmemRefusedError);
  await t.rejects(pages.mapShared({ shmid: 0, shmOffset: 0n, fd, fdOffset: 0n, length: BigInt(host.pageSize), writable: true }), { message: /declares no shared memory regions/ });
  await t.rejects(pages.unmapShared(0, 0n, BigInt(host.pageSize)), { message: /SHMEM_UNMAP .*declares no shared memory regions/ });
  t.equal(await r.fe.nextBackendRequest(200), undefined, 'nothing reached the front-end');
  host.close(fd);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without HOST_NOTIFIER, or without the back-end channel, the capability is missing and says why', async (t) => {
  const r = await rig({ queues: 1 });
  await r.fe.getFeatures();
  await r.fe.getProtocolFeatures();
  await r.fe.setProtocolFeatures(SUPPORTED_PROTOCOL_FEATURES & ~bit(P.HOST_NOTIFIER));
  await r.fe.sync();
  const pages = r.session().hostPages;
  const caps = pages.capabilities();
  t.equal(caps.queueNotifier, false);
  t.match(caps.missing[0], /queue notifier \(VRING_HOST_NOTIFIER_MSG\): protocol feature HOST_NOTIFIER not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });

  const { r: r2, pages: p2 } = await running({ channel: false });
  t.match(p2.capabilities().missing[0], /no back-end channel/);
  const page = host.memfd('doorbell', host.pageSize);
  await t.rejects(p2.mapQueueNotifier(0, page, 0n, host.pageSize), /no back-end channel/);
  host.close(page);
  t.same(await r2.finish(), { watchers: 0, mappings: 0 });
});
