// Fuzz target: event queue buffers (guest input, spec section 10: the driver posts buffers the device writes
// 32-byte events into). Each input starts from a valid state (PD, CQ, an RC QP at RTS, an MR: rdma-rig
// connectedQp) and then posts event chains of any shape (one to three descriptors, any lengths, readable or
// writable, in any order) between actions that make the device write events: a doorbell naming no object
// (DOORBELL_ERROR), ARM_CQ then a signaled send (COMPLETION), a QP moved to ERR, or just a notification.
// Input: op byte (0 post, 1 bad doorbell, 2 arm + send, 3 QP to ERR, 4 notify), then for a post: descriptor
// count, and per descriptor a length byte (times 4 bytes) and a flag byte (bit 0: writable).
// Checked as in every RDMA target (rdma-rig.ts), plus: the device never says it wrote more bytes into a chain
// than the chain's writable descriptors hold.
import {
  ArmCqRequest,
  Command,
  DoorbellRecord,
  DoorbellType,
  Limits,
  ModifyQpRequest,
  QpAttr,
  QpAttrMask,
  QpState,
} from '../../../vmm-device/abi/rdma/index.ts';
import { ByteReader, HEAP_CHECK_EVERY_SLOW, countInput, invariant } from './harness.ts';
import { Rig, qpAttr } from './rdma-rig.ts';

const NAME = 'eventq';
export const MAX_OPS = 16;
/** The event queue the kit lays out has 64 descriptors: at most this many chains are outstanding. */
export const MAX_CHAINS = 20;

export async function fuzz(data: Buffer): Promise<void> {
  countInput(NAME, HEAP_CHECK_EVERY_SLOW);
  const rig = await Rig.open();
  try {
    const { cq, qp } = await rig.connectedQp();
    const { g } = rig;
    const writable = new Map<number, number>();
    const r = new ByteReader(data);
    let mayBreak = false;
    for (let i = 0; i < MAX_OPS && r.remaining > 0; i++) {
      const op = r.u8() % 5;
      if (op === 0) {
        const n = 1 + (r.u8() % 3);
        const buffers = Array.from({ length: n }, () => ({ len: r.u8() * 4, write: (r.u8() & 1) === 1 }));
        if (writable.size < MAX_CHAINS) {
          // Spec 7.5 case 3: a readable part, or a writable part under 32 bytes, may make the device need a reset.
          const room = buffers.filter((b) => b.write).reduce((a, b) => a + b.len, 0);
          if (buffers.some((b) => !b.write) || room < Limits.EVENT_SIZE) mayBreak = true;
          const built = g.eventq.add({ buffers });
          writable.set(built.id, buffers.filter((b) => b.write).reduce((a, b) => a + b.len, 0));
        }
        g.device.queueNotify(1);
      } else if (op === 1) {
        const bell = new Uint8Array(Limits.DOORBELL_RECORD_SIZE);
        DoorbellRecord.encode({ handle: 0x1000 + r.u8(), type: DoorbellType.SQ }, bell, 0);
        await rig.ring(bell);
      } else if (op === 2) {
        await rig.cmd(Command.ARM_CQ, ArmCqRequest.encode({ cq_handle: cq.handle, solicited_only: r.u8() & 1 }), [], 0);
        qp.writeSend({ flags: 1 });
        const bell = new Uint8Array(Limits.DOORBELL_RECORD_SIZE);
        DoorbellRecord.encode({ handle: qp.handle, type: DoorbellType.SQ }, bell, 0);
        await rig.ring(bell);
      } else if (op === 3) {
        await rig.cmd(Command.MODIFY_QP, ModifyQpRequest.encode({ qp_handle: qp.handle, attr_mask: QpAttrMask.STATE, attr: QpAttr.encode(qpAttr({ qp_state: QpState.ERR })) }), [], 0);
      } else {
        g.device.queueNotify(1);
      }
      await rig.idle();
      for (const u of g.eventq.readUsed()) {
        const room = writable.get(u.id);
        invariant(room !== undefined, `${NAME}: used element ${u.id} names no chain the driver posted`);
        invariant(u.len <= room, `${NAME}: device wrote ${u.len} bytes into a chain with ${room} writable`);
        writable.delete(u.id);
      }
      cq.poll();
    }
    if (!mayBreak) rig.assertNoReset(NAME, 'every event buffer was writable only and at least 32 bytes (spec 7.5)');
  } finally {
    await rig.finish(NAME);
  }
}
