// Fuzz target: doorbell records (guest input, spec section 9: the doorbell queue's buffers of 8-byte records
// {handle, type, reserved}) and the ring indices they make the device read. Each input starts from a valid state
// (PD, CQ, an RC QP at RTS, an MR: rdma-rig connectedQp) and then rings buffers whose records name that QP, that CQ,
// or any handle, with any type and reserved bytes, in buffers of any length (not a multiple of 8 included), after
// moving the QP's producer indices by any amount (the device must bound what it takes from a ring).
// Input: per buffer: count byte, length slack byte, then per record: handle selector (0 QP, 1 CQ, else raw u32 next),
// type, 3 reserved bytes; then an index byte (bit 0: move the SQ producer by the next u32, bit 1: the RQ's).
// Checked as in every RDMA target (rdma-rig.ts), plus: the CQ's producer index only moves forward by at most its
// depth per buffer.
import { DoorbellRecord, Limits } from '../../../vmm-device/abi/rdma/index.ts';
import { ByteReader, HEAP_CHECK_EVERY_SLOW, countInput, invariant } from './harness.ts';
import { Rig } from './rdma-rig.ts';

const NAME = 'doorbell';
export const MAX_BUFFERS = 8;
export const MAX_RECORDS = 16;

export async function fuzz(data: Buffer): Promise<void> {
  countInput(NAME, HEAP_CHECK_EVERY_SLOW);
  const rig = await Rig.open();
  try {
    const { cq, qp } = await rig.connectedQp();
    const r = new ByteReader(data);
    for (let b = 0; b < MAX_BUFFERS && r.remaining > 0; b++) {
      const count = r.u8() % (MAX_RECORDS + 1);
      const slack = r.u8() % 8;
      const bytes = new Uint8Array(count * Limits.DOORBELL_RECORD_SIZE + slack);
      for (let i = 0; i < count; i++) {
        const sel = r.u8();
        const handle = sel === 0 ? qp.handle : sel === 1 ? cq.handle : r.u32();
        const at = i * Limits.DOORBELL_RECORD_SIZE;
        DoorbellRecord.encode({ handle, type: r.u8() }, bytes, at);
        bytes.set(r.bytes(3), at + 5);
      }
      const idx = r.u8();
      if (idx & 1) rig.g.mem.writeU32(qp.sqIndex, r.u32());
      if (idx & 2) rig.g.mem.writeU32(qp.rqIndex, r.u32());
      const before = cq.producer;
      await rig.ring(bytes);
      await rig.idle();
      const moved = (cq.producer - before) >>> 0;
      invariant(moved <= cq.depth, `${NAME}: CQ producer moved by ${moved} (> depth ${cq.depth}) for one doorbell buffer`);
      cq.poll();
    }
    rig.assertNoReset(NAME, 'doorbell buffers here are readable only and a bad record must not cause it (spec 10.11)');
  } finally {
    await rig.finish(NAME);
  }
}
