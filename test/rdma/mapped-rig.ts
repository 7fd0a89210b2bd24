// The rig of the host queue mapping tests (spec 13) over the verbs test double: a HostPageMapper that plays the
// VMM (it really maps each fd range it is asked to, as QEMU would, so a test reads the rxe header the "host" wrote),
// records every request into the verbs double's call log (so one list orders SHMEM_MAP/UNMAP against the host
// verbs), and can refuse or hold back an answer; and the guest's requests with MAP.

import {
  Command,
  CreateCqMappedResponse,
  CreateCqRequest,
  CreateCqResponse,
  CreateQpMappedResponse,
  CreateQpRequest,
  CreateQpResponse,
  FeatureBit,
  MapFlag,
  QueueMapping,
} from '../../vmm-device/abi/rdma/index.ts';
import * as sys from '../../vmm-device/native/sys.ts';
import type { HostPageCapabilities, HostPageMapper, SharedMapping } from '../../vmm-device/virtio/device.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { ALL_FEATURES, TestGuest, type Answer } from './guest.ts';

export const MAPPING = 1n << BigInt(FeatureBit.HOST_QUEUE_MAPPING);
export const MAPPED_FEATURES = ALL_FEATURES | MAPPING;

interface Live {
  length: bigint;
  view: ArrayBuffer;
}

/** The VMM's side of SHMEM_MAP / SHMEM_UNMAP, recorded into `calls`. */
export class RecordingMapper implements HostPageMapper {
  readonly live = new Map<bigint, Live>();
  /** Maps to refuse: each entry is the number of further maps to let through before refusing one. */
  refuseMapAfter: number[] = [];
  refuseUnmaps = 0;
  /** While set, unmaps never answer (a VMM that stopped answering). */
  hangUnmaps = false;
  maps = 0;
  unmaps = 0;

  constructor(
    readonly calls: string[],
    readonly regionSize: bigint,
  ) {}

  capabilities(): HostPageCapabilities {
    return { queueNotifier: false, sharedMemory: new Map([[0, this.regionSize]]), missing: [] };
  }
  mapQueueNotifier(): Promise<void> {
    return Promise.reject(new Error('not in this rig'));
  }
  unmapQueueNotifier(): Promise<void> {
    return Promise.reject(new Error('not in this rig'));
  }

  async mapShared(m: SharedMapping): Promise<void> {
    this.calls.push(`shmem_map ${m.shmOffset}`);
    await new Promise((r) => setImmediate(r));
    if (this.refuseMapAfter.length > 0 && this.refuseMapAfter[0]!-- === 0) {
      this.refuseMapAfter.shift();
      throw new Error('SHMEM_MAP refused (REPLY_ACK 1)');
    }
    if (m.shmid !== 0 || m.shmOffset % 4096n !== 0n || m.length % 4096n !== 0n || m.shmOffset + m.length > this.regionSize) {
      throw new Error(`SHMEM_MAP outside the region: ${m.shmOffset}+${m.length}`);
    }
    for (const [off, l] of this.live) {
      if (m.shmOffset < off + l.length && off < m.shmOffset + m.length) throw new Error(`SHMEM_MAP overlaps the mapping at ${off}`);
    }
    this.maps++;
    this.live.set(m.shmOffset, { length: m.length, view: sys.mmap(m.fd, Number(m.fdOffset), Number(m.length), m.writable) });
  }

  async unmapShared(shmid: number, shmOffset: bigint, length: bigint): Promise<void> {
    this.calls.push(`shmem_unmap ${shmOffset}`);
    if (this.hangUnmaps) return new Promise<void>(() => undefined);
    await new Promise((r) => setImmediate(r));
    if (this.refuseUnmaps > 0) {
      this.refuseUnmaps--;
      throw new Error('SHMEM_UNMAP refused (REPLY_ACK 1)');
    }
    const l = this.live.get(shmOffset);
    if (shmid !== 0 || l === undefined || l.length !== length) throw new Error(`SHMEM_UNMAP names no mapping: ${shmOffset}+${length}`);
    sys.munmap(l.view);
    this.live.delete(shmOffset);
    this.unmaps++;
  }

  /** What the guest reads at `offset` of the region (a live mapping's bytes). */
  read(offset: bigint, length: number): Uint8Array {
    for (const [off, l] of this.live) {
      if (offset >= off && offset + BigInt(length) <= off + l.length) return new Uint8Array(l.view, Number(offset - off), length).slice();
    }
    throw new Error(`nothing mapped at ${offset}`);
  }

  write(offset: bigint, bytes: Uint8Array): void {
    for (const [off, l] of this.live) {
      if (offset >= off && offset + BigInt(bytes.length) <= off + l.length) {
        new Uint8Array(l.view, Number(offset - off), bytes.length).set(bytes);
        return;
      }
    }
    throw new Error(`nothing mapped at ${offset}`);
  }

  /** Unmaps whatever is left (a test's teardown; the VMM would at disconnect). */
  dropAll(): void {
    for (const l of this.live.values()) sys.munmap(l.view);
    this.live.clear();
  }
}

export interface MappedRig {
  verbs: FakeVerbs;
  mapper: RecordingMapper;
  g: TestGuest;
}

/** A device over FakeVerbs offering HOST_QUEUE_MAPPING, activated with it and the recording mapper. */
export async function mappedRig(opts: { maxMappedQueues?: number; quotas?: object; mode?: 'polled' | 'notify'; unmapTimeoutMs?: number; features?: bigint } = {}): Promise<MappedRig> {
  const verbs = new FakeVerbs();
  const calls = verbs.calls;
  // The region size is the device's own declaration; the mapper is built with it after open.
  const holder: { mapper?: RecordingMapper } = {};
  const lazy: HostPageMapper = {
    capabilities: () => holder.mapper!.capabilities(),
    mapQueueNotifier: () => holder.mapper!.mapQueueNotifier(),
    unmapQueueNotifier: () => holder.mapper!.unmapQueueNotifier(),
    mapShared: (m) => holder.mapper!.mapShared(m),
    unmapShared: (...a) => holder.mapper!.unmapShared(...a),
  };
  const g = await TestGuest.open({
    verbs,
    features: opts.features ?? MAPPED_FEATURES,
    hostPages: lazy,
    ...(opts.quotas !== undefined ? { quotas: opts.quotas } : {}),
    device: {
      hostQueueMapping: opts.mode ?? 'polled',
      unmapTimeoutMs: opts.unmapTimeoutMs ?? 200,
      closeFd: (fd) => sys.close(fd),
      ...(opts.maxMappedQueues !== undefined ? { maxMappedQueues: opts.maxMappedQueues } : {}),
    },
  });
  holder.mapper = new RecordingMapper(calls, g.device.sharedMemoryRegions!.get(0)!);
  return { verbs, mapper: holder.mapper, g };
}

export type CqReq = Parameters<typeof CreateCqRequest.encode>[0];
export type QpReq = Parameters<typeof CreateQpRequest.encode>[0];

export function mappedCqRequest(v: Partial<CqReq> = {}): Uint8Array {
  return CreateCqRequest.encode({ cqe_count: 16, page_shift: 0, num_pages: 0, index_gpa: 0n, map_flags: MapFlag.MAP, ...v });
}

export function mappedQpRequest(v: Partial<QpReq>): Uint8Array {
  return CreateQpRequest.encode({
    pd_handle: 0,
    send_cq_handle: 0,
    recv_cq_handle: 0,
    qp_type: 2,
    sq_sig_all: 0,
    sq_page_shift: 0,
    rq_page_shift: 0,
    max_send_wr: 16,
    max_recv_wr: 16,
    max_send_sge: 1,
    max_recv_sge: 1,
    max_inline_data: 0,
    sq_num_pages: 0,
    rq_num_pages: 0,
    sq_index_gpa: 0n,
    rq_index_gpa: 0n,
    map_flags: MapFlag.MAP,
    ...v,
  });
}

export interface MappedCqAnswer {
  handle: number;
  queue: ReturnType<typeof QueueMapping.decode>;
  mapped: number;
  cqe: number;
}

export async function createMappedCq(g: TestGuest, v: Partial<CqReq> = {}): Promise<MappedCqAnswer> {
  const a = await g.cmd(Command.CREATE_CQ, mappedCqRequest(v), [], CreateCqMappedResponse.size);
  if (a.status !== 0) throw new Error(`CREATE_CQ with MAP: status ${a.status} detail ${a.detail} (${g.log.lines.concat((g.device as unknown as { log: typeof g.log }).log.lines).slice(-3).map((l) => JSON.stringify(l)).join('; ')})`);
  const r = CreateCqMappedResponse.decode(a.body);
  const cq = CreateCqResponse.decode(r.cq);
  return { handle: cq.cq_handle, cqe: cq.cqe_count, queue: QueueMapping.decode(r.queue), mapped: r.mapped };
}

export interface MappedQpAnswer {
  handle: number;
  qpn: number;
  sq: ReturnType<typeof QueueMapping.decode>;
  rq: ReturnType<typeof QueueMapping.decode>;
  doorbellOffset: bigint;
  doorbellShmid: number;
  mapped: number;
}

export function decodeQpAnswer(a: Answer): MappedQpAnswer {
  const r = CreateQpMappedResponse.decode(a.body);
  const qp = CreateQpResponse.decode(r.qp);
  return { handle: qp.qp_handle, qpn: qp.qp_num, sq: QueueMapping.decode(r.sq), rq: QueueMapping.decode(r.rq), doorbellOffset: r.doorbell_offset, doorbellShmid: r.doorbell_shmid, mapped: r.mapped };
}

export async function createMappedQp(g: TestGuest, v: Partial<QpReq>): Promise<MappedQpAnswer> {
  const a = await qpCmd(g, v);
  if (a.status !== 0) throw new Error(`CREATE_QP with MAP: status ${a.status} detail ${a.detail}`);
  return decodeQpAnswer(a);
}

/** A page list of `n` zero entries: framing (spec 7.2 check 4) passes, so the command's own checks are reached. */
const zeros = (n: number): bigint[] => Array.from({ length: n }, () => 0n);

export function qpCmd(g: TestGuest, v: Partial<QpReq>): Promise<Answer> {
  return g.cmd(Command.CREATE_QP, mappedQpRequest(v), zeros((v.sq_num_pages ?? 0) + (v.rq_num_pages ?? 0)), CreateQpMappedResponse.size);
}

export function cqCmd(g: TestGuest, v: Partial<CqReq>): Promise<Answer> {
  return g.cmd(Command.CREATE_CQ, mappedCqRequest(v), zeros(v.num_pages ?? 0), CreateCqMappedResponse.size);
}
