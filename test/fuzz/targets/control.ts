// Fuzz target: control requests (guest input, spec sections 7 and 8) on the control queue of an RdmaDevice over
// FakeVerbs. An input is a short program of requests against one fresh device, so sequences reach state (handles
// are small integers: CREATE_PD answers 1, and a later raw body naming handle 1 hits it):
//   op & 1 == 0: a framed request: command (one of the spec's, or a raw number), its body as raw bytes (the
//                fixed part's size plus or minus a few bytes), a page list of raw u64s, a response size;
//   op & 1 == 1: raw framing: any readable bytes and any writable size, header included (spec 7.2).
// Checked per answer (rdma-rig): tag echoed, status of the spec's set, no body on failure, used <= writable; per
// input: no device failure, every host object released by reset, nothing read or written outside guest memory.
import { COMMANDS } from '../../../vmm-device/abi/rdma/index.ts';
import { ByteReader, HEAP_CHECK_EVERY_SLOW, countInput } from './harness.ts';
import { MAX_PART, Rig } from './rdma-rig.ts';

const NAME = 'control';
/** Most requests one input sends. */
export const MAX_OPS = 12;
const CODES = [...COMMANDS.keys()];

export async function fuzz(data: Buffer): Promise<void> {
  countInput(NAME, HEAP_CHECK_EVERY_SLOW);
  const rig = await Rig.open();
  try {
    const r = new ByteReader(data);
    let mayBreak = false;
    for (let i = 0; i < MAX_OPS && r.remaining > 0; i++) {
      const op = r.u8();
      if ((op & 1) === 0) {
        const pick = r.u8();
        const command = pick < 0xf0 ? CODES[pick % CODES.length]! : r.u16();
        const spec = COMMANDS.get(command);
        const size = Math.max(0, (spec?.request.size ?? 0) + ((r.u8() % 17) - 8));
        const body = r.bytes(size);
        const pages = Array.from({ length: r.u8() % 5 }, () => r.u64());
        const responseSize = (op & 2) === 0 ? (spec?.response.size ?? 0) : r.u16() % MAX_PART;
        // cmd() always adds the 16-byte response header: a typed request is framed.
        const a = await rig.cmd(command, body, pages, responseSize);
        if (a === undefined) break;
      } else {
        const readable = r.bytes(r.u16() % 512);
        const writable = r.u16() % MAX_PART;
        // Spec 7.5 case 2: only a part shorter than the 16-byte header may make the device need a reset.
        if (readable.length < 16 || writable < 16) mayBreak = true;
        if ((await rig.raw(readable, writable)) === undefined) break;
      }
    }
    if (!mayBreak) rig.assertNoReset(NAME, 'every request had a readable and a writable part of 16 bytes or more (spec 7.5)');
  } finally {
    await rig.finish(NAME);
  }
}
