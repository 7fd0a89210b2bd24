// The memory-map scenario (memory-scenario.ts) through the real vhost-user session, over the verbs test double.

import t from 'tap';
import { FakeAliasMapper, FakeVerbs } from '../../vmm-device/verbs/fake-verbs.ts';
import { StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { TABLE } from './guest.ts';
import { memoryMapScenario } from './memory-scenario.ts';

t.test('over vhost-user: REM_MEM_REG and SET_MEM_TABLE under live rings and MRs give the spec events; nothing escapes, nothing leaks', async (t) => {
  const verbs = new FakeVerbs();
  await memoryMapScenario(t, {
    verbs,
    hostDevice: 'fake0',
    resolver: new StaticAddressResolver(TABLE),
    aliases: new FakeAliasMapper(),
    objects: () => {
      const o = verbs.liveObjects();
      return { qp: o.qp, cq: o.cq, mr: o.mr, pd: o.pd };
    },
  });
  t.equal(verbs.liveObjects().ah, 0);
});
