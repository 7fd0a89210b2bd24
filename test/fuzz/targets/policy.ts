// Fuzz target: the policy document (VMM/operator side input: a file or the etcd keys). The text goes through
// parsePolicyText (JSON + vpc/schema's zod validation) exactly as the file source reads it; a valid document is
// compiled and put in force by the VPC engine (vpc/compiled-policy), and a few decisions are asked of it.
// Invalid documents must come back as { ok: false, errors } with at least one precise message; nothing may throw.
import { parsePolicyText } from '../../../vmm-device/vpc/schema.ts';
import { VpcEngine } from '../../../vmm-device/vpc/engine.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';
import { countInput, invariant } from './harness.ts';

const NAME = 'policy';
const decoder = new TextDecoder('utf-8', { fatal: false });

export function fuzz(data: Buffer): void {
  countInput(NAME);
  const parsed = parsePolicyText(decoder.decode(data));
  if (!parsed.ok) {
    invariant(parsed.errors.length > 0 && parsed.errors.every((e) => typeof e === 'string' && e.length > 0), `${NAME}: refusal without a message`);
    return;
  }
  const engine = new VpcEngine({ log: new RecordingLogger('vpc') });
  engine.apply(parsed.policy, { source: 'fuzz' });
  // Every VM of the document: its own address, its quotas, a decision towards every other VM (bounded by the
  // schema's limits; the first few only, to keep an input fast).
  const vms = parsed.policy.vms.slice(0, 8);
  for (const vm of vms) {
    const own = engine.ownAddress(vm.id);
    engine.quotasOf(vm.id);
    engine.describeVm(vm.id);
    if (own === undefined) continue;
    for (const other of vms) {
      const peer = engine.ownAddress(other.id);
      if (peer === undefined) continue;
      engine.resolve(vm.id, peer.gid, 'RC');
      engine.resolve(vm.id, peer.gid, 'UD');
      engine.judge(vm.id, peer.gid, 'RC');
    }
    engine.charge(vm.id, 'qps');
  }
}
