// Control-queue framing (spec 7.2, 7.5): malformed requests get INVALID_COMMAND / INVALID_LENGTH and leave the
// device usable; only a request without room for the headers is fatal (NEEDS_RESET), as are event buffers with a
// readable part or fewer than 32 bytes and doorbell buffers with a writable part.

import t from 'tap';
import {
  Command,
  CreateCqRequest,
  CtrlRequestHeader,
  CtrlResponseHeader,
  HandleRequest,
  QueryDeviceResponse,
  Status,
  encodeRequest,
} from '../../vmm-device/abi/rdma/index.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { TestGuest } from './guest.ts';

async function open(t: { teardown(fn: () => unknown): void }): Promise<TestGuest> {
  const g = await TestGuest.open({ verbs: new FakeVerbs() });
  t.teardown(() => g.device.close());
  return g;
}

function header(command: number, length: number, tag = 7n): Uint8Array {
  return CtrlRequestHeader.encode({ command, length, tag });
}

t.test('status errors of the framing checks, in order, and the device stays usable', async (t) => {
  const g = await open(t);
  const answer = async (readable: Uint8Array, writable: number) => {
    const { used, written } = await g.raw(readable, writable);
    return { used, ...CtrlResponseHeader.decode(written) };
  };
  t.same(await answer(header(0x99, 0), 16), { used: 16, status: Status.INVALID_COMMAND, detail: 0, tag: 7n }, 'unknown command, tag echoed');
  t.same(await answer(header(0x100, 0), 16), { used: 16, status: Status.INVALID_COMMAND, detail: 0, tag: 7n }, 'reserved 0x100 (section 13)');
  t.same(await answer(header(Command.DESTROY_PD, 8), 16), { used: 16, status: Status.INVALID_LENGTH, detail: 0, tag: 7n }, 'length beyond the readable part');
  const short = new Uint8Array(16 + 4);
  short.set(header(Command.DESTROY_PD, 4));
  t.same(await answer(short, 16), { used: 16, status: Status.INVALID_LENGTH, detail: 0, tag: 7n }, 'length below the fixed size');
  const long = new Uint8Array(16 + 16);
  long.set(header(Command.DESTROY_PD, 16));
  t.same(await answer(long, 16), { used: 16, status: Status.INVALID_LENGTH, detail: 0, tag: 7n }, 'no page list: length must equal the fixed size');
  t.same(await answer(encodeRequest(Command.QUERY_DEVICE, 9n, new Uint8Array(0)), 16 + QueryDeviceResponse.size - 1), { used: 16, status: Status.INVALID_LENGTH, detail: 1, tag: 9n }, 'response buffer one byte short');
  const trailing = new Uint8Array(16 + 8 + 100);
  trailing.set(encodeRequest(Command.DESTROY_PD, 3n, HandleRequest.encode({ handle: 5 })));
  t.same(await answer(trailing, 16), { used: 16, status: Status.INVALID_HANDLE, detail: 0, tag: 3n }, 'bytes beyond 16 + length are ignored');
  // A CREATE_CQ claiming a 2^32-entry page list in a 64 KiB request: refused by count, never read.
  const big = new Uint8Array(65536);
  big.set(header(Command.CREATE_CQ, 65536 - 16));
  big.set(CreateCqRequest.encode({ cqe_count: 16, page_shift: 12, num_pages: 0xffff_ffff, index_gpa: 0n }), 16);
  t.same(await answer(big, 16 + 8), { used: 16, status: Status.INVALID_ARGUMENT, detail: 8, tag: 7n }, 'huge count in a huge request');
  big.set(CreateCqRequest.encode({ cqe_count: 16, page_shift: 12, num_pages: 1, index_gpa: 0n }), 16);
  t.same(await answer(big, 16 + 8), { used: 16, status: Status.INVALID_LENGTH, detail: 0, tag: 7n }, 'small count in a huge request');
  t.equal(g.broken.length, 0, 'no NEEDS_RESET for any of these');
  t.equal(g.device.counters.errors['0x99:INVALID_COMMAND'], 1, 'counted');
  const ok = await g.cmd(Command.QUERY_DEVICE);
  t.equal(ok.status, Status.OK, 'still usable');
});

t.test('a request without room for a header is fatal (NEEDS_RESET), and nothing is answered', async (t) => {
  for (const [readable, writable, what] of [
    [8, 16, 'readable part of 8 bytes'],
    [16, 8, 'writable part of 8 bytes'],
    [16, 0, 'no writable part'],
  ] as const) {
    const g = await open(t);
    await t.rejects(
      Promise.race([g.raw(header(Command.QUERY_DEVICE, 0).subarray(0, readable), writable), new Promise((_, rej) => setTimeout(() => rej(new Error('no answer')), 300))]),
      /no answer/,
      what,
    );
    t.equal(g.broken.length, 1, `${what}: NEEDS_RESET`);
    t.equal(g.broken[0]!.queue, 0);
  }
});

t.test('event buffers with a readable part or fewer than 32 bytes are fatal', async (t) => {
  const g = await open(t);
  g.postEventBuffers(1, 16);
  await g.ring([{ handle: 77, type: 1 }]); // a doorbell error event needs a buffer
  t.equal(g.broken.length, 1);
  t.equal(g.broken[0]!.queue, 1);
  t.equal(g.readEvents().length, 0, 'nothing written');
});

t.test('a doorbell buffer with a writable part is fatal', async (t) => {
  const g = await open(t);
  g.doorbell.add({ buffers: [{ len: 8 }, { len: 8, write: true }] });
  g.device.queueNotify(2);
  t.equal(g.broken.length, 1);
  t.equal(g.broken[0]!.queue, 2);
  const after = g.cmd(Command.QUERY_DEVICE);
  await t.rejects(Promise.race([after, new Promise((_, rej) => setTimeout(() => rej(new Error('no answer')), 300))]), /no answer/, 'a broken device answers nothing more');
});
