// End to end through two REAL QEMU processes inside the soft-RoCE test host: each VM is the project's patched QEMU
// under qtest (vhost-user-device-pci, virtio ID 42) in front of its own vhost-user server and virtio-rdma device
// instance over NativeVerbs on the one shared rxe0; the reference driver reaches the device through QEMU's PCI,
// virtio-pci registers, notifications and INTx, and guest RAM through QEMU's own memfd. One QEMU pair serves the
// whole file (TCG is slow to start them).
//
// RC SEND/RECV, SEND with immediate, RDMA WRITE (with immediate), RDMA READ, CAS, FAA and UD SEND between VM A and
// VM B, every byte verified; the data-path and control-path negative cases; after each test the guest destroyed
// everything and `rdma resource show` lists nothing of this process. Last, QEMU A is killed with SIGKILL with live
// objects: every host object of A is released, B's stay and B goes on. (A guest's device reset through QEMU 10
// reaches the back-end only as GET_VRING_BASE, so reset-time release is tested over the front-end and the device
// directly: test/rxe/device-exchange.test.ts.)
//
// MUST run inside the soft-RoCE test host (about 6 minutes there, 1 of them starting the two QEMUs):
//   bash scripts/rxe/run.sh --timeout 2400 -- npx tap --jobs=1 test/driver/rxe-qemu-two-vms.test.ts
import t from 'tap';
import { requireTestHost } from './rxe-helpers.ts';
import {
  filePair,
  registerControlErrorTests,
  registerDataErrorTests,
  registerExchangeTests,
  registerVmmKilledTest,
  SUBTEST_TIMEOUT_MS,
  TEST_QP_QUOTA,
} from './two-vms-suite.ts';

requireTestHost();
t.setTimeout(12 * SUBTEST_TIMEOUT_MS);
const pairOf = filePair(t, 'qemu', { quotas: { maxQp: TEST_QP_QUOTA } });
registerExchangeTests(t, pairOf);
registerDataErrorTests(t, pairOf);
registerControlErrorTests(t, pairOf);
registerVmmKilledTest(t, pairOf);
