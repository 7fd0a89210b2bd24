// Mapped mode (spec section 13) between two VMs on real soft-RoCE through the reference vhost-user front-end: for
// each VM the reference driver <-> front-end (which maps what the backend SHMEM_MAPs) <-> vhost-user server <->
// virtio-rdma device with HOST_QUEUE_MAPPING (POLLED) <-> NativeVerbs on rxe0. RC SEND/RECV, SEND_WITH_IMM, inline,
// WRITE, WRITE_WITH_IMM, READ, CAS and FAA through the mapped host queues, every byte verified, the backend's
// per-QP relay counters at zero; UD on the relay in the same VM; a hostile guest's moves on its own queues; a reset
// while mapped. After each test the guest destroyed all it made and `rdma resource show` lists nothing of it.
//
// MUST run inside the soft-RoCE test host: bash scripts/rxe/run.sh --timeout 1800 -- npx tap test/driver/rxe-mapped.test.ts
import t from 'tap';
import { requireTestHost } from './rxe-helpers.ts';
import { filePair, SUBTEST_TIMEOUT_MS } from './two-vms-suite.ts';
import { registerMappedExchangeTests, registerMappedHostileTests, registerMappedResetTest } from './mapped-suite.ts';

requireTestHost();
t.setTimeout(8 * SUBTEST_TIMEOUT_MS);
const pairOf = filePair(t, 'frontend', { hostQueueMapping: 'polled' });
registerMappedExchangeTests(t, pairOf);
registerMappedHostileTests(t, pairOf);
registerMappedResetTest(t, pairOf);
