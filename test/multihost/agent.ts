// Host 2's program in the multi-host test (scripts/multihost/test.sh runs it there, host 1 runs the test): serves
// host 2's side to the test over the link (agent-protocol.ts) until the test is done with it.
//   node --import tsx/esm test/multihost/agent.ts      (inside host 2 of scripts/rxe/multi-host.sh)

import { serveHost } from './agent-protocol.ts';

const hostId = process.env['VRDMA_MULTIHOST_HOST'];
if (hostId !== 'host-2') {
  process.stderr.write(`test/multihost/agent.ts runs on host 2 of a multi-host run (scripts/multihost/test.sh), not on '${hostId ?? 'this machine'}'\n`);
  process.exitCode = 2;
} else {
  // Exit as soon as the host is stopped: a handle left open somewhere must not keep host 2 (and the run) waiting.
  process.exit(await serveHost(hostId));
}
