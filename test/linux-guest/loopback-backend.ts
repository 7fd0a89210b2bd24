// `vrdma-backend` over a verbs double whose RC SENDs reach their peer QP in the same double: a SEND (or SEND with
// immediate) on an RTS QP completes the oldest receive posted on the QP whose number is its destination, with the
// SEND's length. So two processes of one guest can run a two-sided exchange (ibv_rc_pingpong) through the whole
// stack: provider, module, virtqueues, the backend's relay of both rings and both CQE rings. It still moves NO
// payload (FakeVerbs has no memory of its own): ibv_rc_pingpong runs without its buffer check (-c). Real payload
// movement is what rxe0 in the test host is for. scripts/linux-guest/boot.sh starts it with the same arguments as
// test/cli/fake-backend.ts.

import { run } from '../../vmm-device/cli/main.ts';
import { QpState, QpType, SendFlags, WrOpcode } from '../../vmm-device/verbs/constants.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import type { QpHandle } from '../../vmm-device/verbs/host-verbs.ts';
import { decodeSendWrs } from '../../vmm-device/verbs/layout.ts';
import type { SendWrList } from '../../vmm-device/verbs/layout.ts';

class LoopbackVerbs extends FakeVerbs {
  override postSend(qp: QpHandle, wrs: SendWrList): void {
    super.postSend(qp, wrs); // every check and the sender's own completion
    const sender = this.qpConnection(qp);
    if (qp.qpType !== QpType.RC || sender?.state !== QpState.RTS || sender.destQpNum === undefined) return;
    for (const wr of decodeSendWrs(wrs.bytes, wrs.count)) {
      if (wr.opcode !== WrOpcode.SEND && wr.opcode !== WrOpcode.SEND_WITH_IMM) continue;
      const bytes = wr.inline?.length ?? wr.sgList.reduce((s, g) => s + g.length, 0);
      this.deliverSend(sender.destQpNum, qp.qpNum, bytes, (wr.sendFlags & SendFlags.SOLICITED) !== 0);
    }
  }
}

const code = await run(process.argv.slice(2), {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
  verbs: async () => new LoopbackVerbs({}),
});
process.exit(code);
