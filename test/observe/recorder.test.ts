// The flight recorder's bounds: the window keeps the last N events (ringbufferjs evicts the oldest) and says how
// many it lost; a whole-session recording keeps everything; capacities out of range are refused; a dump is written
// atomically in the session format with bytes as hex.

import t from 'tap';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { FlightRecorder, MAX_FLIGHT_EVENTS, readSessionFixture } from '../../vmm-device/observe/recorder.ts';

t.test('the window keeps the last N events; a recording keeps all', async (t) => {
  let now = 1000;
  const r = new FlightRecorder({ capacity: 3, recordAll: true, device: { vm: 'vm-a' }, now: () => now++ });
  for (let q = 0; q < 5; q++) r.record({ kind: 'kick', queue: q });
  const w = r.window('w', 'SIGUSR1');
  t.same(w.events.map((e) => e.seq), [2, 3, 4], 'the three newest, oldest first');
  t.same(w.events.map((e) => (e as { queue: number }).queue), [2, 3, 4]);
  t.equal(w.dropped, 2, 'says what it lost');
  t.equal(w.events[0]!.t, 1002, 'stamped when recorded');
  const all = r.session('s')!;
  t.equal(all.events.length, 5, 'the session has everything');
  t.equal(all.dropped, 0);
  t.equal(new FlightRecorder({ device: {} }).session('x'), undefined, 'no session without recordAll');
  t.throws(() => new FlightRecorder({ capacity: 0, device: {} }), RangeError);
  t.throws(() => new FlightRecorder({ capacity: MAX_FLIGHT_EVENTS + 1, device: {} }), RangeError);
});

t.test('a dump: session format, bytes as hex, segments as objects, no temporary file left', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'vrdma-recorder-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const r = new FlightRecorder({ capacity: 8, device: { vm: 'vm-a' } });
  r.record({ kind: 'chain', queue: 0, id: 3, segments: { flat: [0x1000, 4, 0x2000, 16], readable: 1 }, readable: new Uint8Array([1, 2, 3, 4]) });
  r.record({ kind: 'used', queue: 0, id: 3, len: 2, written: new Uint8Array([0xab, 0xcd]) });
  // GET_FEATURES (1), no payload: a message is described in the exchange too.
  r.record({ kind: 'message', dir: 'in', request: 'GET_FEATURES (1)', hex: new Uint8Array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]), fdCount: 0 });
  const file = r.dumpTo(path.join(dir, 'd.json'), 'status --dump');
  t.same(readdirSync(dir), ['d.json']);
  const f = readSessionFixture(file);
  t.equal(f.name, 'd');
  t.match(f.events[0], { kind: 'chain', segments: [{ addr: 0x1000, len: 4, write: false }, { addr: 0x2000, len: 16, write: true }], readable: '01020304' });
  t.match(f.events[1], { kind: 'used', written: 'abcd' });
  t.same(f.exchange.steps, [{ dir: 'frontend->backend', request: 'GET_FEATURES (1)', hex: '010000000100000000000000', fds: [] }]);
  t.equal(r.dumps, 1);
});
