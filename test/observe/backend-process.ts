// A real `vrdma-backend` process over the verbs test double: the same run() as bin/vrdma-backend.js, with
// FakeVerbs instead of NativeVerbs (the host has no RDMA device). Tests spawn it with `node --import tsx`.
import { run } from '../../vmm-device/cli/main.ts';
import { FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';

process.exitCode = await run(process.argv.slice(2), {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
  verbs: async () => new FakeVerbs(),
});
