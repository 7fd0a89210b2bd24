// Back-end restart with the inflight area (vhost-user.rst "Inflight I/O tracking"): a real back-end process is
// killed with SIGKILL while it holds requests, a new process takes the socket over, and the reference front-end
// reconnects as the project's patched QEMU does (the same inflight area handed back with SET_INFLIGHT_FD, each
// ring's base set to the used index, QEMU's restore after a lost back-end). Every request must complete exactly
// once: what was in flight is resubmitted (oldest first), what was completed is not served again.
import t from 'tap';
import { SplitRingDriver } from '../../../guest-driver-spec/frontend/guest-driver.ts';
import { F_VERSION_1, bit } from '../../../vmm-device/abi/virtio.ts';
import { RESTART_QUEUE_SIZE, backendRestartScenario } from './restart-scenario.ts';

t.test('a back-end killed with SIGKILL mid-request: the next one resubmits what was in flight, each request completes once', (t) =>
  backendRestartScenario(t, {
    tmpPrefix: 'vhost-user-restart-',
    features: bit(F_VERSION_1),
    ring: (ram, alloc) => {
      const ring = new SplitRingDriver(ram, alloc, RESTART_QUEUE_SIZE);
      return { addrs: ring.addrs, postRequest: (a, w, n) => ring.post(a, w, n).head, readUsed: () => ring.readUsed() };
    },
    // QEMU's view after losing the back-end: last_avail_idx restored to used->idx (3), the same inflight area.
    restartBase: (completedBefore) => completedBefore,
    finalBase: 6,
  }));
