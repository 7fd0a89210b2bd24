// The host-page mapping service over vhost-user (virtio/device.ts HostPageMapper), on the back-end channel:
//
// - a queue's notify area: VRING_HOST_NOTIFIER_MSG (backend request 3) with one page of an fd; needs the protocol
//   features HOST_NOTIFIER, BACKEND_REQ and BACKEND_SEND_FD, and is valid only after DRIVER_OK. QEMU overlays the
//   page on that queue's notify page (modern virtio-pci, page-per-vq=on); with REPLY_ACK its answer is checked.
// - ranges of a shared memory region: SHMEM_MAP / SHMEM_UNMAP (backend requests 9 and 10, protocol feature SHMEM,
//   bit 22, offered when the device model declares sharedMemoryRegions), kept account of by shmem.ts.

import type { HostPageCapabilities, HostPageMapper, SharedMapping } from '../../virtio/device.ts';
import type { BackendChannel } from './backend-channel.ts';
import { BackendRequest, ProtocolFeature, VRING_NOFD_MASK, encodeVringArea } from './messages.ts';
import { VhostUserShmem, type ShmemEnv } from './shmem.ts';

/** The protocol features a host notifier needs (vhost-user.rst, VRING_HOST_NOTIFIER_MSG). */
export const HOST_NOTIFIER_FEATURES = ['HOST_NOTIFIER', 'BACKEND_REQ', 'BACKEND_SEND_FD'] as const;

/** What the service needs from the session. */
export interface HostPagesEnv extends ShmemEnv {
  /** DRIVER_OK seen (SET_STATUS) or the device started. */
  readonly driverOk: boolean;
  readonly queueCount: number;
  readonly pageSize: number;
}

/**
 * Sends VRING_HOST_NOTIFIER_MSG: maps `size` bytes at `offset` of `fd` over queue `index`'s notify page, or with
 * `fd` undefined removes the mapping. Resolves to the front-end's answer (0 = done) with REPLY_ACK, else undefined.
 */
export function sendHostNotifier(env: HostPagesEnv, index: number, fd: number | undefined, size: number, offset: bigint): Promise<bigint | undefined> {
  for (const f of HOST_NOTIFIER_FEATURES) {
    if (!env.hasProtocol(ProtocolFeature[f])) return Promise.reject(new Error(`host notifier: protocol feature ${f} was not negotiated`));
  }
  if (!env.driverOk) return Promise.reject(new Error('host notifier: only valid after DRIVER_OK'));
  if (!Number.isInteger(index) || index < 0 || index >= env.queueCount) {
    return Promise.reject(new RangeError(`host notifier: queue ${index} is not below ${env.queueCount}`));
  }
  const ch = env.channel;
  if (ch === undefined) return Promise.reject(new Error('host notifier: no back-end channel (SET_BACKEND_REQ_FD was not received)'));
  const u64 = BigInt(index) | (fd === undefined ? BigInt(VRING_NOFD_MASK) : 0n);
  const payload = encodeVringArea({ u64, size: BigInt(size), offset });
  return ch.request(BackendRequest.VRING_HOST_NOTIFIER_MSG, payload, fd === undefined ? [] : [fd]);
}

export class VhostUserHostPages implements HostPageMapper {
  /** SHMEM_MAP / SHMEM_UNMAP and the account of what is mapped (shmem.ts). */
  readonly shmem: VhostUserShmem;

  constructor(private readonly env: HostPagesEnv) {
    this.shmem = new VhostUserShmem(env);
  }

  /** Why the queue notifier is unavailable, or undefined when it is available. */
  private notifierMissing(): string | undefined {
    const absent = HOST_NOTIFIER_FEATURES.filter((f) => !this.env.hasProtocol(ProtocolFeature[f]));
    if (absent.length > 0) return `queue notifier (VRING_HOST_NOTIFIER_MSG): protocol feature${absent.length > 1 ? 's' : ''} ${absent.join(', ')} not negotiated`;
    if (this.env.channel === undefined) return 'queue notifier (VRING_HOST_NOTIFIER_MSG): no back-end channel (SET_BACKEND_REQ_FD was not received)';
    return undefined;
  }

  capabilities(): HostPageCapabilities {
    const notifier = this.notifierMissing();
    const shared = this.shmem.capabilities();
    return {
      queueNotifier: notifier === undefined,
      sharedMemory: shared.sharedMemory,
      missing: [notifier, shared.missing].filter((m): m is string => m !== undefined),
    };
  }

  async mapQueueNotifier(index: number, fd: number, offset: bigint, size: number): Promise<void> {
    // QEMU maps exactly one host page per queue and refuses any other size; say so here rather than as its -1.
    if (size !== this.env.pageSize) throw new RangeError(`host notifier: size ${size} is not the page size ${this.env.pageSize}`);
    if (offset < 0n || offset % BigInt(this.env.pageSize) !== 0n) throw new RangeError(`host notifier: offset ${offset} is not page aligned`);
    const answer = await sendHostNotifier(this.env, index, fd, size, offset);
    if (answer !== undefined && answer !== 0n) throw new Error(`host notifier: the front-end refused queue ${index}'s page (answer ${answer})`);
  }

  async unmapQueueNotifier(index: number): Promise<void> {
    const answer = await sendHostNotifier(this.env, index, undefined, this.env.pageSize, 0n);
    if (answer !== undefined && answer !== 0n) throw new Error(`host notifier: the front-end refused to unmap queue ${index}'s page (answer ${answer})`);
  }

  mapShared(map: SharedMapping): Promise<void> {
    return this.shmem.mapShared(map);
  }

  unmapShared(shmid: number, shmOffset: bigint, length: bigint): Promise<void> {
    return this.shmem.unmapShared(shmid, shmOffset, length);
  }
}
