// The recorded virtqueue fixture format (fixtures/README.md is the normative description; this is its schema).
// A fixture is guest memory (regions with sparse non-zero chunks), a queue configuration, and a script of steps:
// device operations with the result a conforming device must give, and driver writes between them.

import { z } from 'zod';
import { VIRTQUEUE_ERROR_KINDS } from '../../vmm-device/virtqueue/errors.ts';
import { TestGuestMemory } from './test-memory.ts';

export const FIXTURE_FORMAT = 'vrdma-virtqueue-fixture/1';
/** Largest region a fixture may declare (bytes): replayers allocate it. */
export const MAX_FIXTURE_REGION_SIZE = 64 * 1024 * 1024;
/** Zero runs shorter than this inside a chunk are kept in it (fewer, longer chunks). */
export const CHUNK_MERGE_GAP = 16;

const u16 = z.number().int().min(0).max(0xffff);
const u32 = z.number().int().min(0).max(0xffff_ffff);
const addr = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const hexBytes = z.string().regex(/^([0-9a-f]{2})*$/, 'lower-case hex, two digits a byte');

export const errorKindSchema = z.enum(VIRTQUEUE_ERROR_KINDS);

export const segmentSchema = z.object({ addr, len: u32, write: z.boolean() }).strict();

export const chainSchema = z
  .object({ id: u16, ringSlots: z.number().int().min(1).max(32768), segments: z.array(segmentSchema) })
  .strict();

const splitPosition = z.object({ idx: u16 }).strict();
const packedPosition = z.object({ pos: z.number().int().min(0).max(32767), wrap: z.boolean() }).strict();
const position = z.union([splitPosition, packedPosition]);

export const stepSchema = z.discriminatedUnion('op', [
  z
    .object({
      op: z.literal('pop'),
      expect: z.union([
        z.object({ chain: chainSchema }).strict(),
        z.object({ error: errorKindSchema }).strict(),
        z.object({ empty: z.literal(true) }).strict(),
      ]),
    })
    .strict(),
  z.object({ op: z.literal('broken'), expect: errorKindSchema.nullable() }).strict(),
  z.object({ op: z.literal('hasAvailable'), expect: z.boolean() }).strict(),
  z.object({ op: z.literal('inFlight'), expect: z.number().int().min(0) }).strict(),
  z.object({ op: z.literal('pushUsed'), chain: z.number().int().min(0), len: u32 }).strict(),
  z.object({ op: z.literal('needsNotification'), expect: z.boolean() }).strict(),
  z
    .object({
      op: z.literal('disableNotifications'),
      driverKick: z.object({ at: position, expect: z.boolean() }).strict().optional(),
    })
    .strict(),
  z
    .object({
      op: z.literal('enableNotifications'),
      expect: z.boolean(),
      driverKick: z.object({ at: position, expect: z.boolean() }).strict().optional(),
    })
    .strict(),
  z
    .object({
      op: z.literal('checkUsed'),
      from: position,
      expect: z.array(z.object({ id: u16, len: u32, slots: z.number().int().min(1).optional() }).strict()),
    })
    .strict(),
  z.object({ op: z.literal('write'), gpa: addr, hex: hexBytes }).strict(),
]);

export const regionSchema = z
  .object({
    gpa: addr,
    size: z.number().int().min(8).max(MAX_FIXTURE_REGION_SIZE),
    chunks: z.array(z.object({ offset: z.number().int().min(0), hex: hexBytes }).strict()),
  })
  .strict();

export const queueConfigSchema = z
  .object({
    layout: z.enum(['split', 'packed']),
    size: z.number().int().min(1).max(32768),
    desc: addr,
    driver: addr,
    device: addr,
    eventIdx: z.boolean(),
    indirect: z.boolean(),
    state: z
      .object({
        nextAvail: u16,
        nextUsed: u16,
        availWrap: z.boolean().optional(),
        usedWrap: z.boolean().optional(),
      })
      .strict(),
  })
  .strict();

export const fixtureSchema = z
  .object({
    format: z.literal(FIXTURE_FORMAT),
    name: z.string().min(1),
    description: z.string(),
    seed: z.number().int(),
    queue: queueConfigSchema,
    memory: z.array(regionSchema).min(1),
    steps: z.array(stepSchema),
  })
  .strict();

export type Fixture = z.infer<typeof fixtureSchema>;
export type FixtureStep = z.infer<typeof stepSchema>;
export type FixtureRegion = z.infer<typeof regionSchema>;
export type FixturePosition = z.infer<typeof position>;

/** Parses and validates a fixture (throws a ZodError naming the bad field). */
export function parseFixture(json: unknown): Fixture {
  return fixtureSchema.parse(json);
}

export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
}

export function fromHex(hex: string): Uint8Array {
  return new Uint8Array(Buffer.from(hex, 'hex'));
}

/** Sparse chunks of a region: runs of non-zero bytes (zero runs shorter than CHUNK_MERGE_GAP stay inside a run). */
export function chunksOf(bytes: Uint8Array): { offset: number; hex: string }[] {
  const chunks: { offset: number; hex: string }[] = [];
  let i = 0;
  while (i < bytes.length) {
    if (bytes[i] === 0) {
      i++;
      continue;
    }
    const start = i;
    let end = i + 1; // exclusive end of the last non-zero byte seen
    let j = end;
    while (j < bytes.length && j - end < CHUNK_MERGE_GAP) {
      if (bytes[j] !== 0) end = j + 1;
      j++;
    }
    chunks.push({ offset: start, hex: toHex(bytes.subarray(start, end)) });
    i = end;
  }
  return chunks;
}

/** Builds the fixture's guest memory (with guard bytes around each region) from its regions and chunks. */
export function loadFixtureMemory(f: Fixture): TestGuestMemory {
  const mem = new TestGuestMemory({ regions: f.memory.map((r) => ({ gpa: r.gpa, size: r.size })), rng: f.seed, maxGap: 0 });
  f.memory.forEach((r, i) => {
    const bytes = mem.regionBytes(i);
    for (const c of r.chunks) {
      const data = fromHex(c.hex);
      if (c.offset + data.length > r.size) throw new RangeError(`region ${i}: chunk at ${c.offset} runs past the region`);
      bytes.set(data, c.offset);
    }
  });
  return mem;
}
