// Developer tool for recorded virtqueue fixtures (fixtures/README.md describes the format):
//
//   npm run fixture -- decode <file>...   the queue configuration, the rings as the driver laid them out (initially
//                                        and after the driver's writes), indirect tables, and every step with its
//                                        expectation, readably
//   npm run fixture -- replay <file>...   runs the fixture through our device-side queues and prints the differences
//                                        a recorded session (vrdma-session/1: --record, flight-recorder dumps) is
//                                        replayed against the device model over the verbs test double; every
//                                        answer that differs from the recording is printed
//
// Exit status: 0 when everything decoded (and replayed as recorded), 1 otherwise, 2 for a usage error.

import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import {
  DESC_SIZE,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_USED,
  VIRTQ_USED_F_NO_NOTIFY,
} from '../vmm-device/abi/virtqueue.ts';
import { decodeDescriptor, describeFlags, type Layout } from '../guest-driver-spec/testkit/descriptors.ts';
import { fromHex, loadFixtureMemory, parseFixture, type Fixture, type FixtureStep } from '../guest-driver-spec/testkit/fixture-format.ts';
import { ringAreaSizes } from '../guest-driver-spec/testkit/fixture-recorder.ts';
import { readEvent } from '../guest-driver-spec/testkit/packed-driver.ts';
import type { TestGuestMemory } from '../guest-driver-spec/testkit/test-memory.ts';

/** At most this many entries of a ring or table are printed (the rest are summarised). */
const MAX_LISTED = 64;

const hex = (n: number | bigint): string => '0x' + n.toString(16);

function eventFlagName(flags: number): string {
  if (flags === RING_EVENT_FLAGS_ENABLE) return 'ENABLE';
  if (flags === RING_EVENT_FLAGS_DISABLE) return 'DISABLE';
  if (flags === RING_EVENT_FLAGS_DESC) return 'DESC';
  return `reserved(${flags})`;
}

function describeDesc(layout: Layout, bytes: Uint8Array, inRing = true): string {
  const d = decodeDescriptor(layout, bytes);
  const tail = layout === 'split' ? `next ${d.nextOrId}` : `id ${d.nextOrId}`;
  let state = '';
  if (layout === 'packed' && inRing) {
    const a = (d.flags & VIRTQ_DESC_F_AVAIL) !== 0 ? 1 : 0;
    const u = (d.flags & VIRTQ_DESC_F_USED) !== 0 ? 1 : 0;
    state = a !== u ? `  (available in a lap with wrap ${a})` : `  (used in a lap with wrap ${a})`;
  }
  return `addr ${hex(d.addr).padEnd(12)} len ${String(d.len).padEnd(10)} flags ${describeFlags(d.flags).padEnd(22)} ${tail}${state}`;
}

/** The indirect tables that descriptors point at, decoded when they are inside guest memory. */
function describeIndirect(layout: Layout, mem: TestGuestMemory, addr: bigint, len: number, out: string[], indent: string): void {
  const a = Number(addr);
  if (len === 0 || len % DESC_SIZE !== 0 || addr > BigInt(Number.MAX_SAFE_INTEGER) || !mem.memory.isValidRange(a, len)) {
    out.push(`${indent}(table not decodable: ${len} bytes at ${hex(addr)})`);
    return;
  }
  const table = new Uint8Array(len);
  mem.memory.read(a, table);
  const n = len / DESC_SIZE;
  for (let i = 0; i < Math.min(n, MAX_LISTED); i++) {
    out.push(`${indent}[${String(i).padStart(3)}] ${describeDesc(layout, table.subarray(i * DESC_SIZE, (i + 1) * DESC_SIZE), false)}`);
  }
  if (n > MAX_LISTED) out.push(`${indent}... ${n - MAX_LISTED} more entries`);
}

/** Ring contents as the driver (and, for the used side, a previous device) left them in `mem`. */
export function describeRings(f: Fixture, mem: TestGuestMemory): string[] {
  const q = f.queue;
  const out: string[] = [];
  const descs = mem.view(q.desc, DESC_SIZE * q.size);
  const indirects: { at: string; addr: bigint; len: number }[] = [];
  let listed = 0;
  let skipped = 0;
  out.push(`  ${q.layout === 'split' ? 'descriptor table' : 'descriptor ring'} (entries that are not all zero):`);
  for (let i = 0; i < q.size; i++) {
    const bytes = descs.subarray(i * DESC_SIZE, (i + 1) * DESC_SIZE);
    if (bytes.every((b) => b === 0)) continue;
    const d = decodeDescriptor(q.layout, bytes);
    if (q.layout === 'packed' && d.addr === 0n && d.len === 0) {
      skipped++; // a slot primed as used in an earlier lap: nothing to show
      continue;
    }
    if (d.flags & VIRTQ_DESC_F_INDIRECT) indirects.push({ at: `${q.layout === 'split' ? 'descriptor' : 'slot'} ${i}`, addr: d.addr, len: d.len });
    if (listed++ < MAX_LISTED) out.push(`    [${String(i).padStart(5)}] ${describeDesc(q.layout, bytes)}`);
  }
  if (listed > MAX_LISTED) out.push(`    ... ${listed - MAX_LISTED} more`);
  if (skipped > 0) out.push(`    (${skipped} slots hold only the used flags of an earlier lap)`);
  if (listed === 0) out.push('    (empty)');
  for (const ind of indirects.slice(0, MAX_LISTED)) {
    out.push(`  indirect table of ${ind.at}: ${ind.len} bytes at ${hex(ind.addr)}`);
    describeIndirect(q.layout, mem, ind.addr, ind.len, out, '    ');
  }
  if (q.layout === 'split') {
    const flags = mem.readU16(q.driver);
    const idx = mem.readU16(q.driver + 2);
    const usedEvent = mem.readU16(q.driver + 4 + 2 * q.size);
    out.push(`  avail ring: flags ${hex(flags)}${flags & VIRTQ_AVAIL_F_NO_INTERRUPT ? ' (NO_INTERRUPT)' : ''}, idx ${idx}, used_event ${usedEvent}${q.eventIdx ? '' : ' (EVENT_IDX off: unused)'}`);
    const pending = (idx - q.state.nextAvail) & 0xffff;
    const shown = Math.min(pending, q.size, MAX_LISTED);
    const entries: string[] = [];
    for (let k = 0; k < shown; k++) {
      const pos = (q.state.nextAvail + k) & 0xffff;
      entries.push(`[${pos % q.size}]=${mem.readU16(q.driver + 4 + 2 * (pos % q.size))}`);
    }
    out.push(`    ${pending} entries from the device's start index ${q.state.nextAvail}${pending > q.size ? ' (MORE THAN THE QUEUE SIZE)' : ''}: ${entries.join(' ') || '-'}${pending > shown && shown === MAX_LISTED ? ' ...' : ''}`);
    const uflags = mem.readU16(q.device);
    const uidx = mem.readU16(q.device + 2);
    const availEvent = mem.readU16(q.device + 4 + 8 * q.size);
    out.push(`  used ring: flags ${hex(uflags)}${uflags & VIRTQ_USED_F_NO_NOTIFY ? ' (NO_NOTIFY)' : ''}, idx ${uidx}, avail_event ${availEvent}${q.eventIdx ? '' : ' (EVENT_IDX off: unused)'}`);
    const usedCount = (uidx - q.state.nextUsed) & 0xffff;
    for (let k = 0; k < Math.min(usedCount, q.size, MAX_LISTED); k++) {
      const at = q.device + 4 + 8 * ((q.state.nextUsed + k) % q.size);
      out.push(`    [${(q.state.nextUsed + k) % q.size}] id ${mem.readU32(at)} len ${mem.readU32(at + 4)}`);
    }
  } else {
    const de = readEvent(mem.view(q.driver, 4));
    const ve = readEvent(mem.view(q.device, 4));
    out.push(`  driver event suppression: flags ${eventFlagName(de.flags)}, off ${de.off}, wrap ${de.wrap ? 1 : 0}`);
    out.push(`  device event suppression: flags ${eventFlagName(ve.flags)}, off ${ve.off}, wrap ${ve.wrap ? 1 : 0}`);
  }
  return out;
}

function describeStep(s: FixtureStep, f: Fixture): string {
  switch (s.op) {
    case 'pop': {
      const e = s.expect;
      if ('chain' in e) {
        const segs = e.chain.segments.map((g) => `${g.write ? 'W' : 'R'} ${hex(g.addr)}+${g.len}`).join(', ');
        return `pop -> chain id ${e.chain.id} (${e.chain.ringSlots} ring slot${e.chain.ringSlots > 1 ? 's' : ''}): ${segs}`;
      }
      if ('error' in e) return `pop -> error ${e.error}`;
      return 'pop -> nothing available';
    }
    case 'broken':
      return `broken -> ${s.expect ?? 'no (queue healthy)'}`;
    case 'hasAvailable':
      return `hasAvailable -> ${s.expect}`;
    case 'inFlight':
      return `inFlight -> ${s.expect}`;
    case 'pushUsed':
      return `pushUsed popped chain #${s.chain} with len ${s.len}`;
    case 'needsNotification':
      return `needsNotification -> ${s.expect}`;
    case 'disableNotifications':
      return `disableNotifications${s.driverKick ? `; then a driver adding at ${JSON.stringify(s.driverKick.at)} must ${s.driverKick.expect ? '' : 'NOT '}kick` : ''}`;
    case 'enableNotifications':
      return `enableNotifications -> ${s.expect}${s.driverKick ? `; then a driver adding at ${JSON.stringify(s.driverKick.at)} must ${s.driverKick.expect ? '' : 'NOT '}kick` : ''}`;
    case 'checkUsed': {
      const els = s.expect.map((e) => `{id ${e.id} len ${e.len}${e.slots !== undefined ? ` slots ${e.slots}` : ''}}`).join(' ');
      return `checkUsed from ${JSON.stringify(s.from)} -> ${s.expect.length} element(s) ${els}`;
    }
    case 'write': {
      const n = s.hex.length / 2;
      return `driver writes ${n} byte${n === 1 ? '' : 's'} at ${hex(s.gpa)} (${whereIs(f, s.gpa)})${n <= 16 ? `: ${s.hex}` : ''}`;
    }
  }
}

/** Which ring area (or buffer) an address is in. */
function whereIs(f: Fixture, gpa: number): string {
  const q = f.queue;
  const sizes = ringAreaSizes(q.layout, q.size);
  if (gpa >= q.desc && gpa < q.desc + sizes.desc) return `${q.layout === 'split' ? 'descriptor' : 'slot'} ${Math.floor((gpa - q.desc) / DESC_SIZE)} byte ${(gpa - q.desc) % DESC_SIZE}`;
  if (gpa >= q.driver && gpa < q.driver + sizes.driver) {
    if (q.layout === 'packed') return 'driver event area';
    const off = gpa - q.driver;
    if (off < 2) return 'avail.flags';
    if (off < 4) return 'avail.idx';
    if (off < 4 + 2 * q.size) return `avail.ring[${(off - 4) >> 1}]`;
    return 'used_event';
  }
  if (gpa >= q.device && gpa < q.device + sizes.device) return q.layout === 'packed' ? 'device event area' : 'used ring';
  return 'buffer or indirect table';
}

export function decodeFixture(f: Fixture): string {
  const q = f.queue;
  const out: string[] = [];
  out.push(`fixture ${f.name}   (${f.format}, seed ${f.seed})`);
  out.push(`  ${f.description}`);
  const st = q.state;
  const start = q.layout === 'split' ? `nextAvail ${st.nextAvail}, nextUsed ${st.nextUsed}` : `nextAvail ${st.nextAvail} wrap ${st.availWrap ? 1 : 0}, nextUsed ${st.nextUsed} wrap ${st.usedWrap ? 1 : 0}`;
  out.push(`queue: ${q.layout}, size ${q.size}, EVENT_IDX ${q.eventIdx ? 'on' : 'off'}, INDIRECT_DESC ${q.indirect ? 'on' : 'off'}; device starts at ${start}`);
  const sizes = ringAreaSizes(q.layout, q.size);
  const names = q.layout === 'split' ? ['descriptor table', 'avail ring', 'used ring'] : ['descriptor ring', 'driver event area', 'device event area'];
  out.push(`  ${names[0]} ${hex(q.desc)} (${sizes.desc} B), ${names[1]} ${hex(q.driver)} (${sizes.driver} B), ${names[2]} ${hex(q.device)} (${sizes.device} B)`);
  out.push(`memory: ${f.memory.length} region(s)`);
  for (const r of f.memory) {
    const nonZero = r.chunks.reduce((n, c) => n + c.hex.length / 2, 0);
    out.push(`  [${hex(r.gpa)}, ${hex(r.gpa + r.size)})  ${r.size} bytes, ${r.chunks.length} chunk(s), ${nonZero} bytes recorded`);
  }
  const mem = loadFixtureMemory(f);
  out.push('rings as recorded (before any step):');
  out.push(...describeRings(f, mem));
  const writes = f.steps.filter((s) => s.op === 'write');
  if (writes.length > 0) {
    for (const w of writes) mem.memory.write(w.gpa, fromHex(w.hex));
    out.push(`rings after all ${writes.length} driver write step(s) (what the driver made available over the whole script; no device writes):`);
    out.push(...describeRings(f, mem));
  }
  out.push(`steps (${f.steps.length}):`);
  f.steps.forEach((s, i) => out.push(`  ${String(i + 1).padStart(3)}. ${describeStep(s, f)}`));
  return out.join('\n');
}

export function loadFixtureFile(path: string): Fixture {
  return parseFixture(JSON.parse(readFileSync(path, 'utf8')));
}

/** A recorded backend session (format vrdma-session/1): replayed offline, every differing answer printed. */
export async function replaySessionFile(path: string, print: (s: string) => void = console.log): Promise<boolean> {
  const { readSessionFixture } = await import('../vmm-device/observe/recorder.ts');
  const { replaySession } = await import('../vmm-device/observe/replay.ts');
  const f = readSessionFixture(path);
  const r = await replaySession(f);
  const head = `${f.name}: ${r.chains} chains replayed, ${r.answersCompared} answers compared`;
  for (const s of r.skipped) print(`  skipped: ${s}`);
  if (r.differences.length === 0) {
    print(`${head}, all identical`);
    return true;
  }
  print(`${head}, ${r.differences.length} differ`);
  for (const d of r.differences) {
    print(d.queue < 0 ? `  ${d.what}: recorded ${d.expected}, replayed ${d.actual}` : `  queue ${d.queue} answer #${d.answer}: ${d.what}`);
    if (d.queue >= 0) {
      print(`    recorded ${d.expected}`);
      print(`    replayed ${d.actual}`);
    }
  }
  return false;
}

async function replay(path: string): Promise<boolean> {
  if ((JSON.parse(readFileSync(path, 'utf8')) as { format?: unknown }).format === 'vrdma-session/1') return replaySessionFile(path);
  const { createQueue } = await import('../vmm-device/virtqueue/index.ts');
  const { replayFixture } = await import('../guest-driver-spec/testkit/fixture-replay.ts');
  const f = loadFixtureFile(path);
  const r = replayFixture(f, createQueue);
  if (r.mismatches.length === 0 && r.guardErrors.length === 0) {
    console.log(`${f.name}: ok (${r.steps} steps)`);
    return true;
  }
  console.log(`${f.name}: ${r.mismatches.length} mismatch(es)`);
  for (const m of r.mismatches) {
    console.log(`  step ${m.step + 1} ${describeStep(f.steps[m.step]!, f)}`);
    console.log(`    expected ${JSON.stringify(m.expected)}`);
    console.log(`    actual   ${JSON.stringify(m.actual)}`);
  }
  for (const g of r.guardErrors) console.log(`  guard: ${g}`);
  return false;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...files] = argv;
  if ((command !== 'decode' && command !== 'replay') || files.length === 0) {
    console.error('usage: npm run fixture -- decode <file>...\n       npm run fixture -- replay <file>...');
    return 2;
  }
  let ok = true;
  for (const file of files) {
    try {
      if (command === 'decode') console.log(decodeFixture(loadFixtureFile(file)) + '\n');
      else ok = (await replay(file)) && ok;
    } catch (e) {
      console.error(`${file}: ${e instanceof Error ? e.message : String(e)}`);
      ok = false;
    }
  }
  return ok ? 0 : 1;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
