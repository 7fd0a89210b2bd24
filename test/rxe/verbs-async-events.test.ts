// Asynchronous events from real rxe0, through HostVerbs' onAsyncEvent.
//
// Which events rxe raises (Linux 6.1, the test host's kernel, drivers/infiniband/sw/rxe): CQ_ERR when a completion
// finds its CQ full (rxe_cq_post), SRQ_LIMIT_REACHED and QP_LAST_WQE_REACHED (SRQs only, which HostVerbs does not
// offer), and PORT_ACTIVE / PORT_ERR when the netdev goes up or down. A QP moved to ERR by a remote access error
// raises none on 6.1 (the QP_ACCESS_ERR / QP_REQ_ERR / QP_FATAL events came to rxe in later kernels), so the
// event a test can provoke here without disturbing the other tests sharing rxe0 is CQ_ERR: an affiliated event that
// names a CQ, which must come back as the very handle createCq returned.
import t from 'tap';
import { requireTestHost, withRxe } from './fixture/harness.ts';
import { SendWrList } from '../../vmm-device/verbs/layout.ts';
import { QpType, SendFlags, WcStatus, WrOpcode } from '../../vmm-device/verbs/constants.ts';
import type { AsyncEvent } from '../../vmm-device/verbs/host-verbs.ts';

requireTestHost();

/** How long the event may take to arrive (it is raised by rxe's completer, a tasklet, under TCG). */
const ASYNC_EVENT_TIMEOUT_MS = 10_000;
/** ibv_event_type's value of IBV_EVENT_CQ_ERR. */
const IBV_EVENT_CQ_ERR = 0;
/** WRITEs posted beyond what the CQ holds: one is enough to overflow it, a second makes sure. */
const OVERFLOW_BY = 2;

/** Events as they arrive, with a wait for the first one matching. */
class EventLog {
  readonly events: AsyncEvent[] = [];
  private waiter: { match: (e: AsyncEvent) => boolean; resolve: (e: AsyncEvent) => void } | undefined;

  readonly listener = (e: AsyncEvent): void => {
    this.events.push(e);
    if (this.waiter?.match(e) === true) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve(e);
    }
  };

  async waitFor(match: (e: AsyncEvent) => boolean, what: string): Promise<AsyncEvent> {
    const seen = this.events.find(match);
    if (seen !== undefined) return seen;
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        new Promise<AsyncEvent>((resolve) => (this.waiter = { match, resolve })),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`no ${what} within ${ASYNC_EVENT_TIMEOUT_MS} ms (events: ${JSON.stringify(this.events.map((e) => e.type))})`)),
            ASYNC_EVENT_TIMEOUT_MS,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
      this.waiter = undefined;
    }
  }
}

t.test('a full CQ raises CQ_ERR, naming that CQ by the handle createCq returned', async (t) => {
  const log = new EventLog();
  const watcherErrors: Error[] = [];
  await withRxe(
    t,
    async (f) => {
      const tiny = await f.cq(1);
      const roomy = await f.cq(64);
      t.ok(tiny.cq.cqe >= 1 && tiny.cq.cqe < 16, `the tiny CQ holds ${tiny.cq.cqe} completion(s)`);
      const depth = tiny.cq.cqe + OVERFLOW_BY;
      const a = await f.qp(QpType.RC, tiny, roomy, depth);
      const b = await f.qp(QpType.RC, roomy, roomy, depth);
      await f.connectRc(a, b);
      await f.connectRc(b, a);
      const mem = new ArrayBuffer(4096);
      const mr = await f.mr(mem);
      const writes = new SendWrList(depth);
      for (let i = 0; i < depth; i++)
        writes.push({
          wrId: 300 + i,
          opcode: WrOpcode.RDMA_WRITE,
          sendFlags: SendFlags.SIGNALED,
          remoteAddr: mr.addr + 2048n + BigInt(i * 8),
          rkey: mr.rkey,
          sgList: [{ addr: mr.addr + BigInt(i * 8), length: 8, lkey: mr.lkey }],
        });
      f.verbs.postSend(a, writes);

      const event = await log.waitFor((e) => e.type === 'CQ_ERR', 'CQ_ERR event');
      t.equal(event.typeNumber, IBV_EVENT_CQ_ERR, 'IBV_EVENT_CQ_ERR');
      t.equal(event.cq, tiny.cq, 'names the full CQ, as the same handle object');
      t.equal(event.qp, undefined, 'names no QP');
      t.equal(event.port, undefined, 'names no port');
      t.notOk(log.events.some((e) => e.type === 'CQ_ERR' && e.cq !== tiny.cq), 'no CQ_ERR for the CQ with room');
      // What the CQ did hold is intact: the first WRITEs, successful, in order.
      const held = tiny.pollNow();
      t.ok(held.length >= 1 && held.length <= tiny.cq.cqe, `the full CQ held ${held.length} completion(s)`);
      t.same(held.map((w) => [Number(w.wrId), w.status]), held.map((_, i) => [300 + i, WcStatus.SUCCESS]));
    },
    { onAsyncEvent: log.listener, onEventError: (e) => watcherErrors.push(e) },
  );
  t.same(watcherErrors, [], 'the event watchers never failed');
});
