// Two VMs talking RDMA on real soft-RoCE, through everything but QEMU: for each VM the reference driver <->
// reference vhost-user front-end <-> vhost-user server <-> virtio-rdma device <-> NativeVerbs on rxe0 (one rxe0
// shared by both devices, as one host RNIC would be). RC SEND/RECV, SEND with immediate, RDMA WRITE (with
// immediate), RDMA READ, atomics and UD SEND, every byte checked; after each test the guest has destroyed all it
// made and `rdma resource show` shows nothing of this process left on the host. The same tests run through two
// real QEMU processes in rxe-qemu-two-vms.test.ts (test bodies in two-vms-suite.ts).
//
// MUST run inside the soft-RoCE test host: bash scripts/rxe/run.sh -- npx tap test/driver/rxe-two-vms.test.ts
import t from 'tap';
import { requireTestHost } from './rxe-helpers.ts';
import { filePair, registerExchangeTests, SUBTEST_TIMEOUT_MS } from './two-vms-suite.ts';

requireTestHost();
t.setTimeout(6 * SUBTEST_TIMEOUT_MS);
registerExchangeTests(t, filePair(t, 'frontend'));
