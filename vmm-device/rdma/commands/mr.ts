// REG_MR, REG_MR_CONTINUE, DEREG_MR (spec 8.14, 8.15). The host registers one contiguous range of this process's
// memory at the guest's iova; scattered guest pages are first aliased into one range (AliasMapper).

import {
  AccessFlag,
  Command,
  DEFINED_ACCESS_FLAGS,
  FeatureBit,
  HandleRequest,
  RegMrContinueRequest,
  RegMrRequest,
  RegMrResponse,
  ResourceKind,
  mrPageCount,
} from '../../abi/rdma/index.ts';
import type { AliasMapper, AliasPiece } from '../../memory/alias.ts';
import type { GuestMemory } from '../../memory/guest-memory.ts';
import type { HostVerbs } from '../../verbs/host-verbs.ts';
import type { Mr } from '../objects.ts';
import type { CommandContext, CommandGroup } from './context.ts';
import { fail } from './errors.ts';
import { pageShiftOk, readPages } from './pages.ts';

async function regMr(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const r = RegMrRequest.decode(body);
  const o = (f: string): number => RegMrRequest.offsetOf(f);
  const pd = ctx.pds.get(r.pd_handle);
  if (pd === undefined) fail('INVALID_HANDLE', o('pd_handle'));
  const acc = r.access_flags;
  if ((acc & ~DEFINED_ACCESS_FLAGS) !== 0) fail('INVALID_ARGUMENT', o('access_flags'));
  if ((acc & (AccessFlag.REMOTE_WRITE | AccessFlag.REMOTE_ATOMIC)) !== 0 && (acc & AccessFlag.LOCAL_WRITE) === 0) fail('INVALID_ARGUMENT', o('access_flags'));
  if ((acc & AccessFlag.REMOTE_ATOMIC) !== 0 && !ctx.hasFeature(FeatureBit.ATOMIC)) fail('NOT_SUPPORTED', o('access_flags'));
  if (r.length === 0n || r.length > ctx.config.max_mr_size) fail('INVALID_ARGUMENT', o('length'));
  if (r.iova + r.length > 1n << 64n) fail('OUT_OF_RANGE', o('iova'));
  if (!pageShiftOk(ctx, r.page_shift)) fail('INVALID_ARGUMENT', o('page_shift'));
  const need = mrPageCount(r.iova, r.length, r.page_shift);
  if (BigInt(r.total_pages) !== need || r.total_pages > ctx.config.max_mr_pages) fail('INVALID_ARGUMENT', o('total_pages'));
  if (r.num_pages === 0 || r.num_pages > r.total_pages) fail('INVALID_ARGUMENT', o('num_pages'));
  if (ctx.mrs.full) fail('NO_RESOURCES', ResourceKind.MR);
  if (ctx.mrBytes + r.length > ctx.quotas.maxMrBytes) fail('NO_RESOURCES', ResourceKind.MR_BYTES);
  const pages = readPages(ctx, body, RegMrRequest.size, 0, r.num_pages, r.page_shift, RegMrRequest.size);
  const mr: Mr = { handle: 0, pd, access: acc, iova: r.iova, length: r.length, pageShift: r.page_shift, totalPages: r.total_pages, pages: [] };
  appendMrPages(mr, pages);
  if (mr.pages.length === mr.totalPages) await registerMr(ctx, mr);
  // Only now is anything kept: a failed REG_MR leaves no pending MR behind (spec 7.8).
  mr.handle = ctx.mrs.add(mr);
  pd.mrs++;
  ctx.mrBytes += mr.length;
  return mrResponse(mr);
}

async function regMrContinue(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const r = RegMrContinueRequest.decode(body);
  const o = (f: string): number => RegMrContinueRequest.offsetOf(f);
  const mr = ctx.mrs.get(r.mr_handle);
  if (mr === undefined) fail('INVALID_HANDLE', 0);
  if (mr.host !== undefined || mr.lost === true) fail('WRONG_STATE', 0); // registered, or its memory left (10.8)
  if (r.start_index !== mr.pages.length) fail('INVALID_ARGUMENT', o('start_index'));
  if (r.num_pages === 0 || r.start_index + r.num_pages > mr.totalPages) fail('INVALID_ARGUMENT', o('num_pages'));
  const pages = readPages(ctx, body, RegMrContinueRequest.size, 0, r.num_pages, mr.pageShift, RegMrContinueRequest.size);
  const before = mr.pages.length;
  appendMrPages(mr, pages);
  if (mr.pages.length === mr.totalPages) {
    try {
      await registerMr(ctx, mr);
    } catch (e) {
      mr.pages.length = before; // a failed REG_MR_CONTINUE adds no page (spec 8.14)
      throw e;
    }
  }
  return mrResponse(mr);
}

/**
 * Adds checked pages to an MR (readPages checked each inside guest RAM). A page may lie across two adjacent
 * regions of guest RAM: its pieces become separate runs, stitched into one range by the alias mapper
 * (registerMr); where the pages sit relative to each other does not matter either.
 */
function appendMrPages(mr: Mr, pages: number[]): void {
  mr.pages.push(...pages);
}

/**
 * The runs of contiguous bytes of the backend's mapping of guest RAM that hold an MR's pages, in order (a page
 * across two regions gives two pieces). Undefined when some page is no longer entirely in guest RAM.
 */
export function mrRuns(memory: GuestMemory, mr: Mr): AliasPiece[] | undefined {
  const pageSize = 2 ** mr.pageShift;
  const runs: AliasPiece[] = [];
  for (const gpa of mr.pages) {
    // A page is at most 2^max_page_shift bytes and every piece ends a region, so this loop is bounded by the
    // regions the page crosses (at most MAX_MEMORY_REGIONS).
    for (let at = gpa, left = pageSize; left > 0; ) {
      const slice = memory.translate(at, left);
      if (slice === undefined) return undefined;
      const pos = slice.region.bufferOffset + slice.offset;
      const last = runs[runs.length - 1];
      if (last !== undefined && last.buffer === slice.region.buffer && last.offset + last.length === pos) last.length += slice.length;
      else runs.push({ buffer: slice.region.buffer, offset: pos, length: slice.length });
      at += slice.length;
      left -= slice.length;
    }
  }
  return runs;
}

/** True when a memory map still has the MR's pages exactly where its host registration has them. */
export function mrStillMapped(memory: GuestMemory, mr: Mr): boolean {
  const now = mrRuns(memory, mr);
  const then = mr.runs;
  if (now === undefined || then === undefined || now.length !== then.length) return false;
  return now.every((r, i) => r.buffer === then[i]!.buffer && r.offset === then[i]!.offset && r.length === then[i]!.length);
}

/**
 * The host registers one contiguous range of this process's memory with the guest's iova. The MR's pages are
 * runs of contiguous bytes in the backend's mapping of guest RAM: one run is registered where it is; several
 * (a guest's scattered pages, a page across two regions) are first mapped back to back into one new range (the
 * AliasMapper: the same pages, no copy), which the MR keeps until its host registration is gone. Guest RAM that
 * cannot be aliased (not a shared mapping, a region boundary inside a host page) is refused as the host's
 * refusal (NO_RESOURCES HOST, spec 8.14).
 */
function backingOf(ctx: CommandContext, mr: Mr): { buffer: ArrayBuffer; offset: number; alias?: ArrayBuffer; runs: AliasPiece[] } {
  const pageSize = 2 ** mr.pageShift;
  // readPages checked every page against the map of its request; a memory map change since then (a pending
  // MR, REG_MR_CONTINUE) may have taken one away.
  const runs = mrRuns(ctx.memory, mr);
  if (runs === undefined) fail('OUT_OF_RANGE', 0);
  const within = Number(mr.iova % BigInt(pageSize));
  if (runs.length === 1) return { buffer: runs[0]!.buffer, offset: runs[0]!.offset + within, runs };
  try {
    const alias = ctx.aliases.map(runs);
    return { buffer: alias, offset: within, alias, runs };
  } catch (e) {
    ctx.counters.hostErrors++;
    ctx.log.log('warn', 'scattered MR pages could not be mapped contiguously', { runs: runs.length, error: (e as Error).message });
    fail('NO_RESOURCES', ResourceKind.HOST);
  }
}

async function registerMr(ctx: CommandContext, mr: Mr): Promise<void> {
  const gen = ctx.generation;
  const b = backingOf(ctx, mr);
  let host;
  try {
    host = await ctx.hostCall(() => ctx.verbs.regMr(mr.pd.host, b.buffer, { offset: b.offset, length: Number(mr.length), access: mr.access, iova: mr.iova }));
  } catch (e) {
    if (b.alias !== undefined) ctx.aliases.unmap(b.alias);
    throw e;
  }
  const registered = host;
  ctx.checkGeneration(gen, () => releaseMr(ctx.verbs, ctx.aliases, registered, b.alias));
  if (mr.lost === true || !mrStillMapped(ctx.memory, { ...mr, runs: b.runs })) {
    // The memory map changed while the host registered: the range it pinned is leaving (spec 10.8).
    ctx.release(releaseMr(ctx.verbs, ctx.aliases, registered, b.alias));
    mr.lost = true;
    fail('OUT_OF_RANGE', 0);
  }
  mr.host = host;
  mr.backing = { buffer: b.buffer, offset: b.offset };
  mr.runs = b.runs;
  if (b.alias !== undefined) mr.alias = b.alias;
  ctx.data.addMr(mr);
}

/** Deregisters a host MR, then unmaps the contiguous view its registration used, if any. */
export async function releaseMr(verbs: HostVerbs, aliases: AliasMapper, host: NonNullable<Mr['host']>, alias: ArrayBuffer | undefined): Promise<void> {
  try {
    await verbs.deregMr(host);
  } finally {
    if (alias !== undefined) aliases.unmap(alias);
  }
}

function mrResponse(mr: Mr): Uint8Array {
  return RegMrResponse.encode({
    mr_handle: mr.handle,
    lkey: mr.host?.lkey ?? 0,
    rkey: mr.host?.rkey ?? 0,
    pages_received: mr.pages.length,
  });
}

async function deregMr(ctx: CommandContext, body: Uint8Array): Promise<Uint8Array> {
  const { handle } = HandleRequest.decode(body);
  const mr = ctx.mrs.get(handle);
  if (mr === undefined) fail('INVALID_HANDLE', 0);
  ctx.mrs.delete(handle);
  mr.pd.mrs--;
  ctx.mrBytes -= mr.length;
  if (mr.host !== undefined) {
    ctx.data.removeMr(mr);
    const host = mr.host;
    await ctx.destroyHost(() => releaseMr(ctx.verbs, ctx.aliases, host, mr.alias));
  }
  return new Uint8Array(0);
}

export const mrCommands: CommandGroup = {
  [Command.REG_MR]: regMr,
  [Command.REG_MR_CONTINUE]: regMrContinue,
  [Command.DEREG_MR]: deregMr,
};
