// A vhost-user back-end in its own process, for restart tests: a test kills it with SIGKILL in the middle of
// requests and starts another one on the same socket path. It serves the echo device, except that in `hold` mode
// a chain whose request starts with HOLD_PREFIX is kept by the device, never completed: it is still in flight
// when the process dies. Each event is one JSON line on stdout: {"event":"listening"}, {"event":"served",
// "queue":q,"head":h,"text":"..."} for a completed chain, {"event":"held","queue":q,"head":h,"text":"..."}.
//
//   node --import tsx backend-process.ts <socket path> <queues> <echo|hold>

import { VhostUserServer } from '../../../vmm-device/transport/vhost-user/server.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../../vmm-device/util/log.ts';
import { drainQueue } from '../../../vmm-device/virtio/core.ts';
import type { ActivationContext } from '../../../vmm-device/virtio/device.ts';
import type { DescriptorChain } from '../../../vmm-device/virtqueue/index.ts';
import { EchoDevice, HOLD_PREFIX } from './echo-device.ts';
/** The longest request text reported (requests in these tests are short words). */
const MAX_REPORTED_TEXT = 64;

class HoldingEchoDevice extends EchoDevice {
  /** Chains kept in `hold` mode (kept referenced so nothing completes them). */
  readonly held: DescriptorChain[] = [];

  constructor(
    queueCount: number,
    private readonly hold: boolean,
  ) {
    super(queueCount);
  }

  override activate(ctx: ActivationContext): void {
    super.activate(ctx);
    emit({ event: 'activated' });
  }

  override queueNotify(index: number): void {
    const ctx = this.ctx;
    const q = ctx?.queues[index];
    if (ctx === undefined || q === undefined) return;
    const err = drainQueue(q, (chain) => {
      const data = chain.reader().read(Math.min(chain.readableBytes, MAX_REPORTED_TEXT));
      const text = new TextDecoder().decode(data);
      if (this.hold && text.startsWith(HOLD_PREFIX)) {
        this.held.push(chain);
        emit({ event: 'held', queue: index, head: chain.id, text });
        return;
      }
      const n = Math.min(data.length, chain.writableBytes);
      chain.writer().write(data.subarray(0, n));
      q.pushUsed(chain, n);
      this.served++;
      emit({ event: 'served', queue: index, head: chain.id, text });
    });
    if (err !== undefined) ctx.queueBroken(index, err);
    if (q.needsNotification()) ctx.interrupt(index);
  }
}

function emit(event: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify(event) + '\n');
}

const [socketPath, queuesArg, mode] = process.argv.slice(2);
if (socketPath === undefined || queuesArg === undefined || (mode !== 'echo' && mode !== 'hold')) {
  process.stderr.write('usage: backend-process.ts <socket path> <queues> <echo|hold>\n');
  process.exit(2);
}
const device = new HoldingEchoDevice(Number(queuesArg), mode === 'hold');
const log = new RecordingLogger('backend-process');
const server = new VhostUserServer({ path: socketPath, host: new SysHost(), model: device, log });
server.listen();
emit({ event: 'listening' });
process.on('SIGTERM', () => {
  server.close();
  process.exit(0);
});
