// Page lists and index blocks (spec section 8.2): checked entry by entry against the current memory map before use.

import { Limits, decodePageList } from '../../abi/rdma/index.ts';
import { MAX_GUEST_ADDRESS } from '../../memory/guest-memory.ts';
import type { CommandContext } from './context.ts';
import { fail } from './errors.ts';

/** Reads and checks a page list (section 8.2): alignment and guest RAM, entry by entry, before any use. */
export function readPages(ctx: CommandContext, body: Uint8Array, fixedSize: number, first: number, count: number, pageShift: number, detailBase: number): number[] {
  const entries = decodePageList(body, fixedSize + first * Limits.PAGE_ADDR_SIZE, count);
  const pageSize = 2 ** pageShift;
  const mask = BigInt(pageSize - 1);
  const out: number[] = [];
  entries.forEach((e, i) => {
    const at = detailBase + (first + i) * Limits.PAGE_ADDR_SIZE;
    if ((e & mask) !== 0n) fail('INVALID_ARGUMENT', at);
    if (e + BigInt(pageSize) > BigInt(MAX_GUEST_ADDRESS) || !ctx.memory.isValidRange(Number(e), pageSize)) fail('OUT_OF_RANGE', at);
    out.push(Number(e));
  });
  return out;
}

export function pageShiftOk(ctx: CommandContext, shift: number): boolean {
  return shift < 64 && (ctx.config.page_size_mask & (1n << BigInt(shift))) !== 0n;
}

/** An index block: 8-byte aligned and inside guest RAM (section 8.7, 8.10). */
export function checkIndexBlock(ctx: CommandContext, gpa: bigint, offset: number): number {
  if (gpa % 8n !== 0n) fail('INVALID_ARGUMENT', offset);
  if (gpa + 8n > BigInt(MAX_GUEST_ADDRESS) || !ctx.memory.isValidRange(Number(gpa), Limits.QUEUE_INDEX_SIZE)) fail('OUT_OF_RANGE', offset);
  return Number(gpa);
}

