// One flush deadline: destroying a QP waits for its flush at most FLUSH_LIMIT_MS (vmm-device/verbs/constants.ts),
// which NativeVerbs passes to the addon on every destroyQp; the addon has no deadline of its own and refuses a
// call without one. (The flush itself, on rxe0: test/rxe/errors.test.ts.)
import t from 'tap';
import { FLUSH_LIMIT_MS } from '../../vmm-device/verbs/constants.ts';
import { NativeVerbs, loadRawVerbs } from '../../vmm-device/verbs/native-verbs.ts';

const raw = loadRawVerbs();
const NEVER_CREATED = 4242;

t.test('the addon takes the flush limit from its caller, checked', async (t) => {
  t.throws(() => raw.destroyQp(NEVER_CREATED, undefined as unknown as number), {
    verb: 'ibv_destroy_qp',
    errno: 'EINVAL',
    message: 'ibv_destroy_qp: EINVAL (flushLimitMs must be a number)',
  });
  t.throws(() => raw.destroyQp(NEVER_CREATED, -1), { errno: 'EINVAL', message: /flushLimitMs must be an integer in 0\.\.600000/ });
  t.throws(() => raw.destroyQp(NEVER_CREATED, 600_001), { errno: 'EINVAL', message: /flushLimitMs must be an integer in 0\.\.600000/ });
  t.throws(() => raw.destroyQp(NEVER_CREATED, 1.5), { verb: 'ibv_destroy_qp', errno: 'EINVAL', message: /flushLimitMs must be an integer/ });
  // A valid limit gets as far as the handle.
  t.throws(() => raw.destroyQp(NEVER_CREATED, FLUSH_LIMIT_MS), { verb: 'ibv_destroy_qp', errno: 'EBADF', message: /qp handle 4242 does not exist/ });
});

t.test('NativeVerbs passes FLUSH_LIMIT_MS on every destroyQp', async (t) => {
  const limits: unknown[] = [];
  // The real addon underneath; only destroyQp's arguments are recorded on the way.
  const recording = Object.create(raw, {
    destroyQp: { value: (qp: number, limit: number) => (limits.push(limit), raw.destroyQp(qp, limit)) },
  }) as typeof raw;
  const verbs = new NativeVerbs(recording);
  const qp = { kind: 'qp', id: NEVER_CREATED, qpNum: 1, qpType: 2, cap: { maxSendWr: 1, maxRecvWr: 1, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 } } as const;
  await t.rejects(verbs.destroyQp(qp), { name: 'VerbsError', verb: 'ibv_destroy_qp', errno: 'EBADF' });
  t.same(limits, [FLUSH_LIMIT_MS]);
});
