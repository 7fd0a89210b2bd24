// REM_MEM_REG (38): removes the region with that guest address, user address and size (mmap offset ignored).
import t from 'tap';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import { FrontendRequest as R, encodeSingleRegion } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, host, negotiate, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('removes the matching region and unmaps it', async (t) => {
  const r = await rig();
  await negotiate(r);
  const ram = r.ram([{ gpa: 0, size: 0x10000 }, { gpa: 0x40000, size: 0x10000 }]);
  for (const reg of ram.regions) await r.fe.addMemReg(reg);
  t.equal(await ack(r, R.REM_MEM_REG, encodeSingleRegion({ ...GuestRam.describe(ram.regions[0]!), mmapOffset: 0x1234n })), 0n);
  t.same(r.session().describe().regions.map((x) => x.guestPhysAddr), [0x40000]);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('one fd is tolerated (and closed)', async (t) => {
  const r = await rig();
  await negotiate(r);
  const ram = r.ram();
  await r.fe.addMemReg(ram.regions[0]!);
  const efd = host.eventfd();
  t.equal(await ack(r, R.REM_MEM_REG, encodeSingleRegion(GuestRam.describe(ram.regions[0]!)), [efd]), 0n);
  host.close(efd);
  t.same(r.session().describe().regions, []);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('no such region: REPLY_ACK failure', async (t) => {
  const r = await rig();
  await negotiate(r);
  const ram = r.ram();
  await r.fe.addMemReg(ram.regions[0]!);
  await expectAckFailure(t, r, R.REM_MEM_REG, encodeSingleRegion({ ...GuestRam.describe(ram.regions[0]!), size: 0x1000n }), [], { request: 'REM_MEM_REG (38)', kind: 'BadState', reason: /no region at guest 0x0/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
