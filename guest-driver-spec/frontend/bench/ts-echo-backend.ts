// The TypeScript side of `npm run bench:vhost-user`: this project's vhost-user back-end serving the echo test
// device on one queue, in its own process (as a back-end runs next to QEMU). Prints "ready" once listening and
// exits when its front-end hangs up.
import { EchoDevice } from '../conformance/echo-device.ts';
import { VhostUserServer } from '../../../vmm-device/transport/vhost-user/server.ts';
import { SysHost } from '../../../vmm-device/host/sys-host.ts';
import { StderrLogger } from '../../../vmm-device/util/log.ts';

const socketPath = process.argv[2];
if (socketPath === undefined) {
  process.stderr.write('usage: ts-echo-backend.ts SOCKET_PATH\n');
  process.exit(1);
}
const server = new VhostUserServer({ path: socketPath, host: new SysHost(), model: new EchoDevice(1), log: new StderrLogger('bench-backend', 'warn') });
server.onClose = () => {
  server.close();
  process.exit(0);
};
server.listen();
process.stdout.write('ready\n');
