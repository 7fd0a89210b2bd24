// ADD_MEM_REG (37): one region and exactly one fd, with CONFIGURE_MEM_SLOTS; checked against the regions present.
import t from 'tap';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, ProtocolFeature as P, bit, encodeSingleRegion } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, negotiate, rig } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('regions added one by one', async (t) => {
  const r = await rig();
  await negotiate(r);
  const ram = r.ram([{ gpa: 0, size: 0x10000 }, { gpa: 0x40000, size: 0x10000 }]);
  for (const reg of ram.regions) t.equal(await ack(r, R.ADD_MEM_REG, encodeSingleRegion(GuestRam.describe(reg)), [reg.fd]), 0n);
  t.same(r.session().describe().regions.map((x) => x.guestPhysAddr), [0, 0x40000]);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('overlapping an existing region: REPLY_ACK failure', async (t) => {
  const r = await rig();
  await negotiate(r);
  const ram = r.ram([{ gpa: 0, size: 0x10000 }, { gpa: 0x40000, size: 0x10000 }]);
  await r.fe.addMemReg(ram.regions[0]!);
  const clash = { ...GuestRam.describe(ram.regions[1]!), guestPhysAddr: 0x8000n };
  await expectAckFailure(t, r, R.ADD_MEM_REG, encodeSingleRegion(clash), [ram.regions[1]!.fd], { request: 'ADD_MEM_REG (37)', kind: 'BadPayload', reason: /OverlappingRegions/ });
  t.equal(r.session().describe().regions.length, 1);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('no fd: REPLY_ACK failure', async (t) => {
  const r = await rig();
  await negotiate(r);
  const ram = r.ram();
  await expectAckFailure(t, r, R.ADD_MEM_REG, encodeSingleRegion(GuestRam.describe(ram.regions[0]!)), [], { request: 'ADD_MEM_REG (37)', kind: 'BadFdCount', reason: /0 fds, expected 1/ });
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

t.test('without CONFIGURE_MEM_SLOTS: close', async (t) => {
  const r = await rig();
  await negotiate(r, SUPPORTED_PROTOCOL_FEATURES & ~bit(P.CONFIGURE_MEM_SLOTS) & ~bit(P.REPLY_ACK));
  const ram = r.ram();
  r.fe.send(R.ADD_MEM_REG, encodeSingleRegion(GuestRam.describe(ram.regions[0]!)), [ram.regions[0]!.fd]);
  await expectClose(t, r, 'ADD_MEM_REG (37)', 'BadState', /CONFIGURE_MEM_SLOTS was not negotiated/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
