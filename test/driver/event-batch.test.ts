// The reference driver's event queue when the device returns several events in one batch: every event of the batch
// is read before its buffer is posted again. (Found by the multi-host test: two policy teardowns written together
// reached the guest as one teardown and one all-zero event, because re-posting the first buffer reused the
// descriptor id the second used entry still named.) Devices over FakeVerbs, guests over the reference vhost-user
// front-end, the real VPC engine: a rule change tears down several connections at once.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventType } from '../../vmm-device/abi/rdma/index.ts';
import { AccessFlag, RdmaContext, VhostUserTransport } from '../../guest-driver-spec/driver/index.ts';
import { GuestRam } from '../../guest-driver-spec/frontend/guest-ram.ts';
import { RdmaDevice } from '../../vmm-device/rdma/index.ts';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { VhostUserServer } from '../../vmm-device/transport/vhost-user/server.ts';
import { SysHost } from '../../vmm-device/host/sys-host.ts';
import { RecordingLogger } from '../../vmm-device/util/log.ts';
import { VpcEngine } from '../../vmm-device/vpc/engine.ts';
import { VpcAddressResolver } from '../../vmm-device/vpc/resolver.ts';
import { linkDevice } from '../../vmm-device/vpc/device-link.ts';
import { fixtureJson, valid } from '../vpc/policy.ts';

/** Connections torn down by one change: more than one, so that their events share a batch. */
const CONNECTIONS = 3;
const GUEST_RAM_BYTES = 8 << 20;
const EVENT_WAIT_MS = 10_000;

t.test(`${CONNECTIONS} connections torn down by one rule change: each guest gets every QP_POLICY_TEARDOWN`, async (t) => {
  const host = new SysHost();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vrdma-event-batch-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const log = new RecordingLogger('event-batch');
  const engine = new VpcEngine({ log });
  engine.apply(valid(fixtureJson()), { source: 'test' });

  const open = async (vmId: string, hostId: string) => {
    const resolver = new VpcAddressResolver(engine, hostId, log);
    const device = await RdmaDevice.open({ verbs: new FakeVerbs(), hostDevice: 'fake0', vmId, resolver, log, aliases: new FakeAliasMapper() });
    const socketPath = path.join(dir, `${vmId}.sock`);
    const server = new VhostUserServer({ path: socketPath, host, model: device, log });
    server.listen();
    const ram = new GuestRam(host, [{ gpa: 0, size: GUEST_RAM_BYTES }]);
    const transport = await VhostUserTransport.open({ host, socketPath, ram, queues: device.queueCount });
    const ctx = await RdmaContext.open(transport);
    const link = linkDevice(engine, device, log);
    t.teardown(async () => {
      link.detach();
      await ctx.close();
      await transport.close();
      ram.release();
      server.close();
      await device.close();
    });
    const pd = await ctx.allocPd();
    const cq = await ctx.createCq(64);
    return { ctx, pd, cq, link };
  };
  const a = await open('a1', 'host-1');
  const b = await open('a2', 'host-2');

  const pairs = [];
  for (let i = 0; i < CONNECTIONS; i++) {
    const qa = await a.ctx.createQp(a.pd, { type: 'RC', sendCq: a.cq, recvCq: a.cq, maxSendWr: 8, maxRecvWr: 8 });
    const qb = await b.ctx.createQp(b.pd, { type: 'RC', sendCq: b.cq, recvCq: b.cq, maxSendWr: 8, maxRecvWr: 8 });
    await qa.connect({ gid: b.ctx.gid, qpn: qb.qpNum }, { accessFlags: AccessFlag.LOCAL_WRITE });
    await qb.connect({ gid: a.ctx.gid, qpn: qa.qpNum }, { accessFlags: AccessFlag.LOCAL_WRITE });
    pairs.push([qa, qb] as const);
  }

  const noRules = fixtureJson();
  noRules.vpcs[0]!.rules = [];
  engine.apply(valid(noRules), { source: 'every rule removed' });
  await Promise.all([a.link.settled(), b.link.settled()]);

  for (const [side, qps] of [[a, pairs.map((p) => p[0])], [b, pairs.map((p) => p[1])]] as const) {
    for (const qp of qps) {
      const e = await side.ctx.driver.waitEvent((e) => e.type === EventType.QP_POLICY_TEARDOWN && e.handle === qp.handle, EVENT_WAIT_MS);
      t.ok(e, `QP_POLICY_TEARDOWN for QP handle ${qp.handle}`);
    }
    t.equal(side.ctx.driver.counters.protocolErrors, 0, 'no event read from a re-posted (zeroed) buffer');
  }
});
