// What a command handler may use of the device (RdmaDevice implements it). Handlers are grouped by object in this
// folder (query, pd, cq, qp, mr, ah) and gathered into one table in index.ts; each checks its request in the
// spec's order and throws a CommandError (errors.ts) for a refusal.

import type { AliasMapper } from '../../memory/alias.ts';
import type { GuestMemory } from '../../memory/guest-memory.ts';
import type { Logger } from '../../util/log.ts';
import type { DeviceHandle, HostVerbs } from '../../verbs/host-verbs.ts';
import type { AddressResolver, VirtualAddress } from '../address-resolver.ts';
import type { DataPath } from '../data-path.ts';
import type { HandleTable } from '../handle-table.ts';
import type { DeviceConfigValue, DeviceQuotas } from '../limits.ts';
import type { Ah, Cq, Mr, Pd, Qp } from '../objects.ts';
import type { MappingManager } from '../mapped/manager.ts';

/** Host port behind the guest's port 1. */
export const HOST_PORT = 1;

export interface CommandContext {
  readonly verbs: HostVerbs;
  readonly hostDevice: DeviceHandle;
  /** The host GID index programmed into every host QP and AH (the guest never chooses it). */
  readonly sourceGidIndex: number;
  readonly vmId: string;
  readonly resolver: AddressResolver;
  readonly address: VirtualAddress;
  readonly config: DeviceConfigValue;
  readonly quotas: DeviceQuotas;
  readonly log: Logger;
  readonly counters: { hostErrors: number };
  readonly aliases: AliasMapper;
  /** The current guest memory map. */
  readonly memory: GuestMemory;
  /** Bumped by every reset: compare after each await (checkGeneration). */
  readonly generation: number;
  readonly pds: HandleTable<Pd>;
  readonly cqs: HandleTable<Cq>;
  readonly qps: HandleTable<Qp>;
  readonly mrs: HandleTable<Mr>;
  readonly ahs: HandleTable<Ah>;
  /** Registered bytes, pending MRs included (the MR_BYTES quota). */
  mrBytes: bigint;
  readonly data: DataPath;
  /** Host queue mapping (spec 13): present when the device offers HOST_QUEUE_MAPPING (hasFeature says if negotiated). */
  readonly mapping: MappingManager | undefined;
  hasFeature(bit: number): boolean;
  /** Throws ResetDuringRequest (after releasing `undo`) when a reset happened since `gen`. */
  checkGeneration(gen: number, undo?: () => Promise<unknown>): void;
  /** Runs a host allocation; its refusal is NO_RESOURCES HOST (the guest's request was valid). */
  hostCall<T>(fn: () => Promise<T>): Promise<T>;
  /** Destroys a host object whose guest handle is already gone: a host refusal is logged, never answered. */
  destroyHost(fn: () => Promise<void>): Promise<void>;
  /** Tracks a host release in the background (settled() waits for it). */
  release(p: Promise<unknown>): void;
  /** Drops the waiting events of a destroyed object (section 9.3). */
  discardEvents(handle: number, types: readonly number[]): void;
  /** A host CQ's completion event handler, guarded (an unexpected error is the device's failure). */
  cqEventHandler(cq: () => Cq | undefined): () => void;
  /** Spec 11.4: the QP to ERR, then QP_POLICY_TEARDOWN. */
  policyTeardownQp(qp: Qp, reason: number): Promise<void>;
  /** Spec 12.3: later UD sends to the AH fail. */
  revokeAh(ah: Ah, reason: number): void;
}

export type CommandHandler = (ctx: CommandContext, body: Uint8Array) => Promise<Uint8Array> | Uint8Array;
/** Handlers by command code. */
export type CommandGroup = Readonly<Record<number, CommandHandler>>;
