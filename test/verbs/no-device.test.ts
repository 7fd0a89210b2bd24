// On a host without RDMA (this project's build machines: the kernel has no RDMA support), listing or opening a
// device fails with a VerbsError that says how to get a device. Runs outside the soft-RoCE test host.
import t from 'tap';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { VerbsError } from '../../vmm-device/verbs/host-verbs.ts';

const verbs = new NativeVerbs();

let devices: string[] | undefined;
let listError: unknown;
try {
  devices = verbs.listDevices().map((d) => d.name);
} catch (e) {
  listError = e;
}
const hasRdma = devices !== undefined && devices.length > 0;

t.test('without RDMA, opening a device says how to get one', { skip: hasRdma ? `this host has RDMA devices (${devices?.join(', ')})` : false }, async (t) => {
  if (listError !== undefined) {
    t.type(listError, VerbsError);
    const e = listError as VerbsError;
    t.equal(e.verb, 'ibv_get_device_list');
    t.match(e.message, /^ibv_get_device_list: E[A-Z]+ \(/);
    t.match(e.message, 'rdma link add rxe0 type rxe netdev <if>');
    t.match(e.message, 'npm run test:rxe');
  }
  const err = await verbs.openDevice('rxe0').then(
    () => undefined,
    (e: unknown) => e,
  );
  t.type(err, VerbsError, 'openDevice rejects with a VerbsError');
  const e = err as VerbsError;
  t.match(e.verb, /^ibv_(get_device_list|open_device)$/);
  t.match(e.errno, /^(ENOSYS|ENODEV)$/);
  t.equal(e.code, e.errno);
  t.ok(e.message.startsWith(`${e.verb}: ${e.errno} (`), `message starts with the verb and errno: ${e.message}`);
  t.match(e.message, 'rdma link add rxe0 type rxe netdev <if>');
  t.match(e.message, 'rdma_rxe');
  t.match(e.message, 'npm run test:rxe');
  t.match(e.message, 'bash scripts/rxe/run.sh -- <command>');
});

t.test('a handle that was never created is EBADF, not a crash', async (t) => {
  const fakeQp = { kind: 'qp', id: 4242, qpNum: 1, qpType: 2, cap: { maxSendWr: 1, maxRecvWr: 1, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 } } as const;
  const fakeCq = { kind: 'cq', id: 4243, cqe: 1 } as const;
  const fakePd = { kind: 'pd', id: 4244 } as const;
  const { SendWrList, WcBuffer } = await import('../../vmm-device/verbs/layout.ts');
  t.throws(() => verbs.postSend(fakeQp, new SendWrList().push({ wrId: 1, opcode: 2 })), {
    name: 'VerbsError',
    verb: 'ibv_post_send',
    errno: 'EBADF',
    message: 'ibv_post_send: EBADF (qp handle 4242 does not exist or was already destroyed)',
  });
  t.throws(() => verbs.pollCq(fakeCq, new WcBuffer(4)), { name: 'VerbsError', verb: 'ibv_poll_cq', errno: 'EBADF' });
  t.throws(() => verbs.reqNotifyCq(fakeCq, false), { name: 'VerbsError', verb: 'ibv_req_notify_cq', errno: 'EBADF' });
  await t.rejects(verbs.deallocPd(fakePd), { name: 'VerbsError', verb: 'ibv_dealloc_pd', errno: 'EBADF' });
  await t.rejects(verbs.regMr(fakePd, new ArrayBuffer(64), { access: 1 }), { name: 'VerbsError', verb: 'ibv_reg_mr', errno: 'EBADF' });
  await t.rejects(verbs.regMr(fakePd, new ArrayBuffer(64), { access: 1, iova: 0x1000 }), { name: 'VerbsError', verb: 'ibv_reg_mr_iova', errno: 'EBADF' });
});
