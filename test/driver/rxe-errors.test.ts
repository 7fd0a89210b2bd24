// Errors between two VMs on real soft-RoCE through the reference vhost-user front-end (same set-up as
// rxe-two-vms.test.ts): a remote access error reported by the peer's host RNIC comes back as the spec's completion
// status, the QP goes to ERR and later work is flushed; the device's own checks of SGEs; control-path refusals
// (a page outside guest RAM, a page count over the limit, handles of the other VM or destroyed, the QP limit).
// The device stays usable and, after each test, nothing is left on the host. The same tests run through real QEMU
// in rxe-qemu-two-vms.test.ts (test bodies in two-vms-suite.ts).
//
// MUST run inside the soft-RoCE test host: bash scripts/rxe/run.sh -- npx tap test/driver/rxe-errors.test.ts
import t from 'tap';
import { requireTestHost } from './rxe-helpers.ts';
import { filePair, registerControlErrorTests, registerDataErrorTests, SUBTEST_TIMEOUT_MS, TEST_QP_QUOTA } from './two-vms-suite.ts';

requireTestHost();
t.setTimeout(5 * SUBTEST_TIMEOUT_MS);
const pairOf = filePair(t, 'frontend', { quotas: { maxQp: TEST_QP_QUOTA } });
registerDataErrorTests(t, pairOf);
registerControlErrorTests(t, pairOf);
