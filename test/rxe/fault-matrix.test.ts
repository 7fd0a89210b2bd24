// Fault matrix on rxe0 (issue 12 item 8), the cases that run inside one test process: four VMs, each a
// virtio-rdma device instance over NativeVerbs on the shared rxe0 with its own guest memory (memfd RAM). A and B carry
// RC traffic when the fault strikes (B takes half of A's SENDs; RNR retries hold the rest in flight on the host);
// C and D are the bystanders, exchanging messages after every case.
// For each case, with counts:
//   - every work request a surviving guest posted completes exactly once (success, or a flush/error status): no
//     completion lost, none duplicated (counted by wr_id per QP);
//   - once the guests destroyed what they made (or the faulted device was reset), `rdma resource show` lists exactly
//     the bystanders' objects for this process: no host object left;
//   - C and D exchange their messages, every one completing once with SUCCESS: the other VMs are unaffected.
// Cases here: a host QP forced into error behind the device's back (ibv_modify_qp on the host QP, as a host-side
// error does); the guest stopping event buffers while traffic and thousands of events flow; the VMM's connection
// lost mid-traffic (the device reset the vhost-user session performs when QEMU dies; QEMU itself SIGKILLed with
// live objects is test/driver/rxe-qemu-two-vms.test.ts). Budget: well under 5 minutes in the test host.
//
//   bash scripts/rxe/run.sh --timeout 900 -- npx tap --jobs=1 test/rxe/fault-matrix.test.ts

import t from 'tap';
import { Command, DoorbellType, QpAttrMask as S, QpState, WcStatus } from '../../vmm-device/abi/rdma/index.ts';
import { ALL_FEATURES } from '../rdma/guest.ts';
import { requireTestHost } from './fixture/harness.ts';
import { hostObjectsOf, type HostObjects } from '../driver/rxe-helpers.ts';
import {
  BURST,
  EVENT_BOUND,
  FLUSHED,
  RECORDS_PER_RING,
  RNR_FOREVER,
  STARVED_DOORBELLS,
  bystanders,
  completionsOf,
  exactlyOnce,
  fourVmResolver,
  hostObjectsSettle,
  ok,
  openVm,
  postRecvs,
  postSends,
  rcPair,
  verbs,
  type Cqe,
} from './fixture/fault-rig.ts';

requireTestHost();
t.setTimeout(600_000);

const resolver = await fourVmResolver();
const a = await openVm('a', resolver, 1);
const b = await openVm('b', resolver, 2);
const c = await openVm('c', resolver, 3);
const d = await openVm('d', resolver, 4);
t.teardown(async () => {
  for (const vm of [a, b, c, d]) await vm.g.device.close().catch(() => undefined);
});
/** Each VM holds one PD, CQ and MR between cases. */
const BETWEEN_CASES: HostObjects = { qp: 0, cq: 4, mr: 4, pd: 4 };

t.test('a host QP forced into error mid-traffic', async (t) => {
  t.same(hostObjectsOf(process.pid), BETWEEN_CASES, 'before: one PD, CQ and MR per VM');
  // RNR retries for ever: the sends past B's receives stay in flight on the host until the error.
  const [qa, qb] = await rcPair(a, b, RNR_FOREVER);
  const recvs = await postRecvs(b, qb, BURST / 2);
  const sends = await postSends(a, qa, BURST);
  // Behind the device's back, as a host-side error would: the host QP of A's connection to ERR.
  await verbs.modifyQp(a.g.device.qps.get(qa.handle)!.host, { qpState: QpState.ERR });
  const late = await postSends(a, qa, BURST / 2); // posted to a host QP already in ERR
  const as: Cqe[] = [];
  const aDone = await completionsOf(a, qa, [...sends, ...late], as);
  exactlyOnce(t, "A's sends (half before, half after the error)", [...sends, ...late], aDone, FLUSHED);
  t.ok(aDone.filter((x) => x.status === WcStatus.WR_FLUSH_ERR).length >= BURST, `the fault struck mid-traffic: at least ${BURST} sends flushed`);
  // B's receives that got no message are flushed when B's guest moves its QP to ERR.
  await ok(b.g.modifyQp(qb.handle, S.STATE, { qp_state: QpState.ERR }), 'B to ERR');
  const bs: Cqe[] = [];
  const bDone = await completionsOf(b, qb, recvs, bs);
  exactlyOnce(t, "B's receives", recvs, bDone, [WcStatus.SUCCESS, WcStatus.WR_FLUSH_ERR]);
  t.equal(bDone.filter((x) => x.status === WcStatus.SUCCESS).length, as.filter((x) => x.status === WcStatus.SUCCESS).length, 'every message A saw delivered, B received (and no other)');
  await ok(a.g.destroy(Command.DESTROY_QP, qa.handle), 'DESTROY_QP A');
  await ok(b.g.destroy(Command.DESTROY_QP, qb.handle), 'DESTROY_QP B');
  t.same(await hostObjectsSettle(BETWEEN_CASES), BETWEEN_CASES, 'rdma resource show: no QP left, nothing else changed');
  t.equal(a.g.failures.length + a.g.broken.length, 0, 'A: no device failure, no NEEDS_RESET');
  await bystanders(t, c, d, 'after');
  t.same(await hostObjectsSettle(BETWEEN_CASES), BETWEEN_CASES, 'bystanders released their QPs');
});

t.test('the guest stops posting event buffers while traffic and thousands of events flow', async (t) => {
  const [qa, qb] = await rcPair(a, b);
  const eventsBefore = a.g.device.counters.eventsWritten;
  const recvs = await postRecvs(b, qb, BURST);
  const sends = await postSends(a, qa, BURST);
  // No event buffer posted: every DOORBELL_ERROR (unknown handles) and CQ event waits in the device.
  for (let rung = 0; rung < STARVED_DOORBELLS; rung += RECORDS_PER_RING) {
    await a.g.ring(Array.from({ length: RECORDS_PER_RING }, (_, i) => ({ handle: 0x10000 + rung + i, type: DoorbellType.SQ })));
  }
  const as: Cqe[] = [];
  const bs: Cqe[] = [];
  exactlyOnce(t, "A's sends during the event storm", sends, await completionsOf(a, qa, sends, as), [WcStatus.SUCCESS]);
  exactlyOnce(t, "B's receives during the event storm", recvs, await completionsOf(b, qb, recvs, bs), [WcStatus.SUCCESS]);
  const waiting = a.g.device.waitingEvents;
  t.ok(waiting >= 1 && waiting <= EVENT_BOUND, `events waiting in the device: ${waiting} (bound ${EVENT_BOUND}) after ${STARVED_DOORBELLS} bad doorbell records`);
  t.equal(a.g.device.counters.eventsWritten, eventsBefore, 'nothing written without buffers');
  t.equal(a.g.device.counters.doorbellErrors >= STARVED_DOORBELLS, true, `every bad record counted (${a.g.device.counters.doorbellErrors})`);
  a.g.postEventBuffers(EVENT_BOUND);
  const events = await a.g.waitEvents(waiting);
  t.equal(events.length, waiting, `the ${waiting} waiting events delivered once buffers came`);
  t.equal(a.g.device.waitingEvents, 0, 'none left waiting');
  t.equal(a.g.failures.length + a.g.broken.length, 0, 'A: no device failure, no NEEDS_RESET');
  await ok(a.g.destroy(Command.DESTROY_QP, qa.handle), 'DESTROY_QP A');
  await ok(b.g.destroy(Command.DESTROY_QP, qb.handle), 'DESTROY_QP B');
  t.same(await hostObjectsSettle(BETWEEN_CASES), BETWEEN_CASES, 'rdma resource show: no QP left');
  await bystanders(t, c, d, 'after');
});

t.test("the VMM's connection lost mid-traffic: A's device reset with live objects", async (t) => {
  // B takes half: A's other sends are held in flight (RNR retries for ever) when the reset strikes.
  const [qa, qb] = await rcPair(a, b, RNR_FOREVER);
  const recvs = await postRecvs(b, qb, BURST / 2);
  await postSends(a, qa, BURST);
  const bs: Cqe[] = [];
  await completionsOf(b, qb, recvs, bs); // the first half delivered: the rest is in flight
  const producerAtReset = a.cq.producer;
  a.g.device.reset(); // what the vhost-user session does when the front-end's socket closes
  await a.g.device.settled();
  t.equal(a.cq.producer, producerAtReset, "nothing written into A's CQ after the reset (no late or duplicated completion)");
  const aGone: HostObjects = { qp: 1, cq: 3, mr: 3, pd: 3 };
  t.same(await hostObjectsSettle(aGone), aGone, "rdma resource show: every host object of A released (B's QP stays)");
  // B: its receives either got A's messages or are flushed when B's guest gives up on the connection.
  await new Promise((r) => setTimeout(r, 200));
  await ok(b.g.modifyQp(qb.handle, S.STATE, { qp_state: QpState.ERR }), 'B to ERR');
  exactlyOnce(t, "B's receives", recvs, await completionsOf(b, qb, recvs, bs), [WcStatus.SUCCESS, WcStatus.WR_FLUSH_ERR]);
  t.equal(b.cq.poll().length, 0, 'B: no completion beyond its receives');
  await ok(b.g.destroy(Command.DESTROY_QP, qb.handle), 'DESTROY_QP B');
  t.same(await hostObjectsSettle({ qp: 0, cq: 3, mr: 3, pd: 3 }), { qp: 0, cq: 3, mr: 3, pd: 3 }, 'B released its QP: only B, C, D objects left');
  t.equal(b.g.failures.length + b.g.broken.length, 0, 'B: no device failure');
  await bystanders(t, c, d, 'after');
  // A's next driver session on the same device works.
  a.g.ctrl.readUsed();
  a.g.activate(ALL_FEATURES);
  const pd = await a.g.createPd();
  await ok(a.g.destroy(Command.DESTROY_PD, pd), 'a new session: CREATE_PD and DESTROY_PD');
});
