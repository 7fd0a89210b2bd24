// Fuzz target: send and receive WQEs (guest input, spec section 9: 128-byte send WQEs, 64-byte receive WQEs in the
// QP's ring pages) through the relay to FakeVerbs. Each input starts from a valid state (PD, CQ, an RC QP at RTS,
// an MR of two pages: rdma-rig connectedQp), then writes WQEs whose bytes come from the input into the rings, with
// the SGEs optionally pointed at the MR (its lkey, an address inside or around it) so that the relay's checks past
// the first ones are reached, moves the producer index and rings the SQ or RQ doorbell.
// Input: per WQE: kind byte (bit 0: receive; bit 1: patch SGE 0 to the MR; bit 2: producer jumps by the next u32),
// the WQE's bytes, then (if bit 1) an offset u16 and length u16 for SGE 0.
// Checked as in every RDMA target (rdma-rig.ts), plus: completions never outnumber the WQEs posted, and the
// consumer indices the device publishes never pass the producer indices.
import { DoorbellRecord, DoorbellType, Limits } from '../../../vmm-device/abi/rdma/index.ts';
import { ByteReader, HEAP_CHECK_EVERY_SLOW, countInput, invariant } from './harness.ts';
import { Rig } from './rdma-rig.ts';

const NAME = 'wqe';
export const MAX_WQES = 12;
/** Offsets of the first SGE inside a WQE (after the fixed part: spec section 9.2 and 9.3). */
const SEND_SGE0 = Limits.SQ_WQE_SIZE - Limits.SQ_WQE_MAX_SGE * 16;
const RECV_SGE0 = Limits.RQ_WQE_SIZE - Limits.RQ_WQE_MAX_SGE * 16;

export async function fuzz(data: Buffer): Promise<void> {
  countInput(NAME, HEAP_CHECK_EVERY_SLOW);
  const rig = await Rig.open();
  try {
    const { cq, qp, mr } = await rig.connectedQp();
    const { mem } = rig.g;
    const r = new ByteReader(data);
    let posted = 0;
    let completed = 0;
    let jumped = false;
    for (let i = 0; i < MAX_WQES && r.remaining > 0; i++) {
      const kind = r.u8();
      const recv = (kind & 1) !== 0;
      const size = recv ? Limits.RQ_WQE_SIZE : Limits.SQ_WQE_SIZE;
      const wqe = r.bytes(size);
      if (kind & 2) {
        const at = recv ? RECV_SGE0 : SEND_SGE0;
        const dv = new DataView(wqe.buffer, wqe.byteOffset);
        dv.setBigUint64(at, mr.iova + BigInt(r.u16() % (mr.length + 64)), true);
        dv.setUint32(at + 8, r.u16(), true);
        dv.setUint32(at + 12, mr.lkey, true);
      }
      const producer = recv ? qp.rqProducer : qp.sqProducer;
      const ring = recv ? qp.rq : qp.sq;
      mem.write(ring + (producer % qp.depth) * size, wqe);
      const step = kind & 4 ? r.u32() : 1;
      // Indices start at 0 and only a jump can wrap them: without one, consumer <= producer holds as plain numbers.
      if (step !== 1) jumped = true;
      const next = (producer + step) >>> 0;
      if (recv) qp.rqProducer = next;
      else qp.sqProducer = next;
      mem.writeU32(recv ? qp.rqIndex : qp.sqIndex, next);
      posted += Math.min(step, qp.depth);
      const bell = new Uint8Array(Limits.DOORBELL_RECORD_SIZE);
      DoorbellRecord.encode({ handle: qp.handle, type: recv ? DoorbellType.RQ : DoorbellType.SQ }, bell, 0);
      await rig.ring(bell);
      await rig.idle();
      completed += cq.poll().length;
      invariant(completed <= posted, `${NAME}: ${completed} completions for ${posted} WQEs posted`);
      if (!jumped) {
        invariant(qp.sqConsumer <= qp.sqProducer, `${NAME}: SQ consumer index ${qp.sqConsumer} passed the producer ${qp.sqProducer}`);
        invariant(qp.rqConsumer <= qp.rqProducer, `${NAME}: RQ consumer index ${qp.rqConsumer} passed the producer ${qp.rqProducer}`);
      }
    }
    rig.assertNoReset(NAME, 'bad WQEs complete with a status (spec 7.5, 10.8)');
  } finally {
    await rig.finish(NAME);
  }
}
