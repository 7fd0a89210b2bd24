// SET_MEM_TABLE (5): regions with one memfd each, mapped by the back-end; checked for count, fd count, overlap, and
// that each region lies inside its fd (mapping past a memfd's end would SIGBUS the back-end on first touch).
import t from 'tap';
import { GuestRam } from '../../../guest-driver-spec/frontend/guest-ram.ts';
import { FrontendRequest as R, encodeMemTable } from '../../../vmm-device/transport/vhost-user/messages.ts';
import { ack, expectAckFailure, expectClose, host, negotiate, rig, WITHOUT_REPLY_ACK } from '../../../guest-driver-spec/frontend/conformance/harness.ts';

t.test('two regions mapped; guest memory reads what the front-end wrote', async (t) => {
  const r = await rig();
  await negotiate(r);
  const ram = r.ram([{ gpa: 0, size: 0x10000 }, { gpa: 0x100000, size: 0x2000, mmapOffset: 0x1000 }]);
  ram.memory.write(0x100010, Uint8Array.of(7, 8, 9));
  t.equal(await ack(r, R.SET_MEM_TABLE, encodeMemTable(ram.regions.map(GuestRam.describe)), ram.regions.map((x) => x.fd)), 0n);
  const seen = new Uint8Array(3);
  r.session().guestMemory.read(0x100010, seen);
  t.same([...seen], [7, 8, 9], 'shared memory: the back-end sees the front-end bytes (mmap offset honoured)');
  t.same(r.session().describe().regions.length, 2);
  // A second table replaces the first (the old mappings are released).
  const ram2 = r.ram([{ gpa: 0, size: 0x4000 }]);
  await r.fe.setMemTable(ram2.regions);
  t.same(r.session().describe().regions.map((x) => x.size), [0x4000]);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});

const bad: { name: string; build: (ram: GuestRam) => { payload: Uint8Array; fds: number[]; ours?: number[] }; kind: string; reason: RegExp }[] = [
  {
    name: 'overlapping guest ranges',
    build: (ram) => {
      const a = GuestRam.describe(ram.regions[0]!);
      const b = { ...GuestRam.describe(ram.regions[1]!), guestPhysAddr: 0x8000n };
      return { payload: encodeMemTable([a, b]), fds: [ram.regions[0]!.fd, ram.regions[1]!.fd] };
    },
    kind: 'BadPayload',
    reason: /OverlappingRegions: guest physical ranges/,
  },
  {
    name: 'overlapping front-end virtual ranges',
    build: (ram) => {
      const a = GuestRam.describe(ram.regions[0]!);
      const b = { ...GuestRam.describe(ram.regions[1]!), userAddr: a.userAddr + 0x100n };
      return { payload: encodeMemTable([a, b]), fds: [ram.regions[0]!.fd, ram.regions[1]!.fd] };
    },
    kind: 'BadPayload',
    reason: /OverlappingRegions: frontend virtual ranges/,
  },
  {
    name: 'fewer fds than regions',
    build: (ram) => ({ payload: encodeMemTable(ram.regions.map(GuestRam.describe)), fds: [ram.regions[0]!.fd] }),
    kind: 'BadFdCount',
    reason: /1 fds, expected 2/,
  },
  {
    name: 'a region larger than its memfd',
    build: (ram) => ({ payload: encodeMemTable([{ ...GuestRam.describe(ram.regions[0]!), size: 0x20000n }]), fds: [ram.regions[0]!.fd] }),
    kind: 'BadPayload',
    reason: /ends past the end of its fd \(65536 bytes\)/,
  },
  {
    name: 'zero regions',
    build: () => ({ payload: encodeMemTable([]), fds: [] }),
    kind: 'BadPayload',
    reason: /0 regions, expected 1\.\.8/,
  },
  {
    name: 'nine regions',
    build: (ram) => ({
      payload: encodeMemTable(Array.from({ length: 9 }, (_, i) => ({ ...GuestRam.describe(ram.regions[0]!), guestPhysAddr: BigInt(i) * 0x100000n }))),
      fds: Array(8).fill(ram.regions[0]!.fd) as number[],
    }),
    kind: 'BadPayload',
    reason: /9 regions, expected 1\.\.8/,
  },
  {
    name: 'a region of size 0',
    build: (ram) => ({ payload: encodeMemTable([{ ...GuestRam.describe(ram.regions[0]!), size: 0n }]), fds: [ram.regions[0]!.fd] }),
    kind: 'BadPayload',
    reason: /region 0: size is 0/,
  },
  {
    name: 'an fd that is not a memfd mapping (an eventfd)',
    build: (ram) => {
      const efd = host.eventfd();
      return { payload: encodeMemTable([GuestRam.describe(ram.regions[0]!)]), fds: [efd], ours: [efd] };
    },
    kind: 'BadPayload',
    reason: /ends past the end of its fd \(0 bytes\)/,
  },
];

for (const c of bad) {
  t.test(`refused with REPLY_ACK: ${c.name}; the previous table stays`, async (t) => {
    const r = await rig();
    await negotiate(r);
    const good = r.ram([{ gpa: 0x200000, size: 0x1000 }]);
    await r.fe.setMemTable(good.regions);
    const ram = r.ram([{ gpa: 0, size: 0x10000 }, { gpa: 0x10000, size: 0x10000 }]);
    const { payload, fds, ours } = c.build(ram);
    await expectAckFailure(t, r, R.SET_MEM_TABLE, payload, fds, { request: 'SET_MEM_TABLE (5)', kind: c.kind, reason: c.reason });
    for (const fd of ours ?? []) host.close(fd);
    t.same(r.session().describe().regions.map((x) => x.guestPhysAddr), [0x200000], 'old table kept');
    t.same(await r.finish(), { watchers: 0, mappings: 0 });
  });
}

t.test('refused without REPLY_ACK: close, every mapping released', async (t) => {
  const r = await rig();
  await negotiate(r, WITHOUT_REPLY_ACK);
  const ram = r.ram([{ gpa: 0, size: 0x10000 }]);
  await r.fe.setMemTable(ram.regions);
  r.fe.send(R.SET_MEM_TABLE, encodeMemTable([{ ...GuestRam.describe(ram.regions[0]!), size: 0x20000n }]), [ram.regions[0]!.fd]);
  await expectClose(t, r, 'SET_MEM_TABLE (5)', 'BadPayload', /ends past the end of its fd/);
  t.same(await r.finish(), { watchers: 0, mappings: 0 });
});
