// `vrdma-backend` over a verbs double whose RC SENDs reach their peer QP in the same double: a SEND (or SEND with
// immediate) on an RTS QP completes the oldest receive posted on the QP whose number is its destination, with the
// SEND's length. So two processes of one guest can run a two-sided exchange (ibv_rc_pingpong) through the whole
// stack: provider, module, virtqueues, the backend's relay of both rings and both CQE rings. It still moves NO
// payload (FakeVerbs has no memory of its own): ibv_rc_pingpong runs without its buffer check (-c). Real payload
// movement is what rxe0 in the test host is for. scripts/linux-guest/boot.sh starts it with the same arguments as
// test/cli/fake-backend.ts.

import { run } from '../../vmm-device/cli/main.ts';
import { QpState, QpType, SendFlags, WcOpcode, WcStatus, WrOpcode } from '../../vmm-device/verbs/constants.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import type { QpAttr, QpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { decodeSendWrs } from '../../vmm-device/verbs/layout.ts';
import type { SendWrList, WorkCompletion } from '../../vmm-device/verbs/layout.ts';

/** What this double reads of FakeVerbs' private bookkeeping (kept structural: FakeVerbs is not this file's). */
interface DoubleQp {
  kind: string;
  handle: QpHandle;
  state: number;
  attr: QpAttr;
  recvCq: number;
  recvQueue: bigint[];
}
interface DoubleInternals {
  objects: Map<number, { kind: string }>;
  pushCompletion(cqId: number, wc: WorkCompletion, solicited: boolean): void;
  wc(qp: DoubleQp, wrId: bigint, status: number, opcode: number, byteLen?: number): WorkCompletion;
}

class LoopbackVerbs extends FakeVerbs {
  override postSend(qp: QpHandle, wrs: SendWrList): void {
    super.postSend(qp, wrs); // every check and the sender's own completion
    const self = this as unknown as DoubleInternals;
    const q = self.objects.get(qp.id) as DoubleQp | undefined;
    if (q === undefined || q.handle.qpType !== QpType.RC || q.state !== QpState.RTS) return;
    let peer: DoubleQp | undefined;
    for (const o of self.objects.values()) {
      const c = o as DoubleQp;
      if (c.kind === 'qp' && c.handle.qpNum === q.attr.destQpNum) peer = c;
    }
    if (peer === undefined || (peer.state !== QpState.RTR && peer.state !== QpState.RTS)) return;
    for (const wr of decodeSendWrs(wrs.bytes, wrs.count)) {
      if (wr.opcode !== WrOpcode.SEND && wr.opcode !== WrOpcode.SEND_WITH_IMM) continue;
      const wrId = peer.recvQueue.shift();
      if (wrId === undefined) continue; // no receive posted: real RC would retry (RNR); the double drops it
      const bytes = wr.inline?.length ?? wr.sgList.reduce((s, g) => s + g.length, 0);
      const wc = self.wc(peer, wrId, WcStatus.SUCCESS, WcOpcode.RECV, bytes);
      self.pushCompletion(peer.recvCq, { ...wc, srcQp: q.handle.qpNum }, (wr.sendFlags & SendFlags.SOLICITED) !== 0);
    }
  }
}

const code = await run(process.argv.slice(2), {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
  verbs: async () => new LoopbackVerbs({}),
});
process.exit(code);
