// Mapped mode (spec section 13) between two REAL QEMU processes on soft-RoCE: the project's QEMU under qtest
// exposes the device's shared memory region (SHMEM_MAP of the host rxe queues into a BAR), and the reference
// driver reaches the mapped SQ/RQ/CQ and doorbell slots with qtest reads and writes of that BAR. The same tests as
// rxe-mapped.test.ts (mapped-suite.ts): every byte verified, the backend's relay counters at zero, UD on the relay
// in the same VM, the hostile guest's moves (a reset through QEMU reaches the back-end only as GET_VRING_BASE: the reset test runs over the front-end).
//
// MUST run inside the soft-RoCE test host:
//   bash scripts/rxe/run.sh --timeout 2400 -- npx tap --jobs=1 test/driver/rxe-qemu-mapped.test.ts
import t from 'tap';
import { requireTestHost } from './rxe-helpers.ts';
import { filePair, SUBTEST_TIMEOUT_MS } from './two-vms-suite.ts';
import { registerMappedExchangeTests, registerMappedHostileTests } from './mapped-suite.ts';

requireTestHost();
t.setTimeout(10 * SUBTEST_TIMEOUT_MS);
const pairOf = filePair(t, 'qemu', { hostQueueMapping: 'polled' });
registerMappedExchangeTests(t, pairOf);
registerMappedHostileTests(t, pairOf);
