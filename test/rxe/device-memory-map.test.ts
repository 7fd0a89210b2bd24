// Issue 10's Done-when on rxe0 through the reference front-end: REM_MEM_REG and SET_MEM_TABLE replacing a region
// under live rings and MRs give the spec's error events, no exception escapes, the device keeps serving, and
// `rdma resource show` lists nothing of this process afterwards (memory-scenario.ts).
//
//   bash scripts/rxe/run.sh -- npx tap test/rxe/device-memory-map.test.ts

import t from 'tap';
import { NativeVerbs } from '../../vmm-device/verbs/native-verbs.ts';
import { nativeAliasMapper } from '../../vmm-device/host/alias.ts';
import { StaticAddressResolver } from '../../vmm-device/rdma/index.ts';
import { memoryMapScenario } from '../rdma/memory-scenario.ts';
import { RXE_DEVICE, requireTestHost, rdmaResourcesOf } from './fixture/harness.ts';
import { RXE_HOST_IP } from '../driver/rxe-helpers.ts';

requireTestHost();

t.test('on rxe0: REM_MEM_REG and SET_MEM_TABLE under live rings and MRs; nothing left on the host', async (t) => {
  const resolver = new StaticAddressResolver([
    { vmId: 'vm-a', vpc: 'blue', virtualIp: '192.168.7.1', hostIp: RXE_HOST_IP },
    { vmId: 'vm-b', vpc: 'blue', virtualIp: '192.168.7.2', hostIp: RXE_HOST_IP },
  ]);
  await memoryMapScenario(t, {
    verbs: new NativeVerbs(),
    hostDevice: RXE_DEVICE,
    resolver,
    aliases: nativeAliasMapper,
    objects: () => rdmaResourcesOf(process.pid),
  });
});
