// Writes the committed seed corpora, fuzz/corpus/<target>/, from the project's fixtures (deterministic: re-running
// writes identical files). Run with `npm run fuzz:seeds`.
//   policy      fixtures/vpc/*.json as they are
//   vhost-user  each fixtures/vhost-user/*.json exchange, every front-end message with its fds in the target's
//               input encoding (test/fuzz/targets/vhost-user.ts), one seed per fixture and one per message prefix
//               up to the first ring start
//   control, pages, doorbell, wqe, eventq: programs that a conforming driver would send (every command with a
//               well-formed body), in each target's encoding
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { readFixture, unhex, type FdSpec } from '../../guest-driver-spec/frontend/exchange-fixture.ts';
import { COMMANDS, Command, Limits } from '../../vmm-device/abi/rdma/index.ts';

const root = path.resolve(import.meta.dirname, '../..');
const out = path.join(root, 'fuzz/corpus');

function write(target: string, bytes: Uint8Array): void {
  const dir = path.join(out, target);
  fs.mkdirSync(dir, { recursive: true });
  const name = crypto.createHash('sha1').update(bytes).digest('hex').slice(0, 16);
  fs.writeFileSync(path.join(dir, name), bytes);
}

function reset(target: string): void {
  fs.rmSync(path.join(out, target), { recursive: true, force: true });
}

// ---------------------------------------------------------------------------------------------- policy
reset('policy');
for (const f of fs.readdirSync(path.join(root, 'fixtures/vpc')).filter((f) => f.endsWith('.json')).sort()) {
  write('policy', fs.readFileSync(path.join(root, 'fixtures/vpc', f)));
}

// ------------------------------------------------------------------------------------------ vhost-user
const FD_KIND = { eventfd: 0, memfd: 1, socket: 2 } as const;
const MEMFD_UNIT = 64 << 10;
function fdBytes(fds: FdSpec[]): number[] {
  const outBytes = [Math.min(fds.length, 3)];
  for (const fd of fds.slice(0, 3)) {
    outBytes.push(FD_KIND[fd.kind]);
    if (fd.kind === 'memfd') outBytes.push(Math.max(0, Math.min(255, Math.ceil(fd.size / MEMFD_UNIT) - 1)));
  }
  return outBytes;
}
reset('vhost-user');
for (const f of fs.readdirSync(path.join(root, 'fixtures/vhost-user')).filter((f) => f.endsWith('.json')).sort()) {
  const fixture = readFixture(path.join(root, 'fixtures/vhost-user', f));
  const messages: number[][] = [];
  for (const step of fixture.steps) {
    if (step.dir !== 'frontend->backend') continue;
    messages.push([...unhex(step.hex), ...fdBytes(step.fds)]);
  }
  write('vhost-user', Uint8Array.from(messages.flat()));
  for (let n = 1; n < messages.length; n += 4) write('vhost-user', Uint8Array.from(messages.slice(0, n).flat()));
}

// --------------------------------------------------------------------------------------------- control
const u16 = (v: number) => [v & 0xff, (v >> 8) & 0xff];
const u32 = (v: number) => [...u16(v & 0xffff), ...u16(v >>> 16)];
const CODES = [...COMMANDS.keys()];
reset('control');
{
  // One typed request per command (op 0: command index, size delta 0 (= 8), zeroed body, no pages), then a
  // sequence a driver sends: CREATE_PD, QUERY_DEVICE, QUERY_PORT, DESTROY_PD on handle 1.
  const typed = (code: number, body: number[] = [], pages = 0) => {
    const spec = COMMANDS.get(code)!;
    const b = [...body, ...new Array(Math.max(0, spec.request.size - body.length)).fill(0)].slice(0, spec.request.size);
    return [0, CODES.indexOf(code), 8, ...b, pages];
  };
  for (const code of CODES) write('control', Uint8Array.from(typed(code)));
  write('control', Uint8Array.from([...typed(Command.CREATE_PD), ...typed(Command.QUERY_DEVICE), ...typed(Command.QUERY_PORT, u32(1)), ...typed(Command.DESTROY_PD, u32(1))]));
  // Raw framing (op 1): a header alone, a header with a length past the buffer, an empty request.
  const header = (command: number, length: number) => [...u16(command), 0, 0, ...u32(length), ...new Array(8).fill(1)];
  for (const [cmd, len] of [[Command.CREATE_PD, 0], [Command.QUERY_PORT, 64], [0xffff, 0], [Command.CREATE_CQ, 1 << 20]] as const) {
    const h = header(cmd, len);
    write('control', Uint8Array.from([1, ...u16(h.length), ...h, ...u16(64)]));
  }
}

// ----------------------------------------------------------------------------------------------- pages
reset('pages');
{
  // op, entries, claimed (= entries), shift 12, page selectors (0 = fresh page), then the op's own fields.
  const valid = (op: number, entries: number, extra: number[]) => [op, entries, 0, 0, ...new Array(entries).fill(0), ...extra];
  write('pages', Uint8Array.from(valid(0, 1, [...u16(16), 0])));
  write('pages', Uint8Array.from([...valid(0, 1, [...u16(16), 0]), ...valid(1, 2, [1, 0, 0, ...u16(16), ...u16(16), 4, 3, 0, 0])]));
  write('pages', Uint8Array.from(valid(2, 2, [0, 7, ...new Array(8).fill(0), 0, 0])));
  write('pages', Uint8Array.from(valid(2, 4, [0, 7, ...new Array(8).fill(0), 0, 2])));
  write('pages', Uint8Array.from([...valid(2, 2, [0, 7, ...new Array(8).fill(0), 0, 2]), ...valid(3, 2, [1, ...u32(2)])]));
  // Every page selector once.
  write('pages', Uint8Array.from([2, 6, 0, 0, 0, 2, ...u16(5), 6, 7, 8, 9, 10, 11, ...u64le(0x1_0000_0000_0000n)]));
}
function u64le(v: bigint): number[] {
  return Array.from({ length: 8 }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
}

// ---------------------------------------------------------- doorbell, wqe, eventq: see each target's header
reset('doorbell');
reset('wqe');
reset('eventq');
{
  const record = (sel: number, type: number) => [sel, type, 0, 0, 0];
  // doorbell: count, records (handle selector: 0 QP, 1 CQ, 2 raw; type), then index moves.
  write('doorbell', Uint8Array.from([1, 0, ...record(0, 1), 0]));
  write('doorbell', Uint8Array.from([2, 0, ...record(0, 1), ...record(0, 2), 0]));
  write('doorbell', Uint8Array.from([1, 0, ...record(1, 3), 0, 1, 0, ...record(1, 4), 0]));
  write('doorbell', Uint8Array.from([1, 0, ...record(2, 9), 0]));
  // wqe: kind (0 send, 1 recv), WQE bytes, producer step, then the doorbell.
  const send = new Array(Limits.SQ_WQE_SIZE).fill(0);
  send[8] = 2; // opcode SEND
  send[9] = 1; // flags SIGNALED
  write('wqe', Uint8Array.from([0, ...send, 1]));
  write('wqe', Uint8Array.from([1, ...new Array(Limits.RQ_WQE_SIZE).fill(0), 1, 0, ...send, 1]));
  // eventq: post buffers (count, shape) then trigger kinds.
  write('eventq', Uint8Array.from([0, 4, 0, 1, 0, 2, 0]));
  write('eventq', Uint8Array.from([0, 2, 1, 2, 3, 0, 1, 2]));
}
console.log(`seed corpora written under ${path.relative(process.cwd(), out) || out}`);
