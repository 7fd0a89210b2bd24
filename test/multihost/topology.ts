// The multi-host test's fixed layout (scripts/rxe/multi-host.sh builds the link): two test hosts joined only to each
// other, rxe0 of host 1 on 10.77.0.1 and of host 2 on 10.77.0.2; a three-member etcd cluster over that link (two
// members on host 1, one on host 2); one VM per host in the same VPC, plus a VM of another tenant on host 2 that
// host 1's VM must not reach. Everything is a constant here so both hosts' programs agree without talking first.

import { gidFromIpv4 } from '../../vmm-device/vpc/net.ts';

export type HostId = 'host-1' | 'host-2';

export const HOST_ADDRESS: Record<HostId, string> = { 'host-1': '10.77.0.1', 'host-2': '10.77.0.2' };

/** The orchestrator (host 1's test) reaches host 2's agent here, over the link. */
export const AGENT_PORT = 7700;

export interface EtcdMemberSpec {
  name: string;
  host: HostId;
  clientPort: number;
  peerPort: number;
}

export const ETCD_MEMBERS: readonly EtcdMemberSpec[] = [
  { name: 'm0', host: 'host-1', clientPort: 2379, peerPort: 2380 },
  { name: 'm1', host: 'host-1', clientPort: 2381, peerPort: 2382 },
  { name: 'm2', host: 'host-2', clientPort: 2379, peerPort: 2380 },
];

export const clientUrl = (m: EtcdMemberSpec): string => `http://${HOST_ADDRESS[m.host]}:${m.clientPort}`;
export const peerUrl = (m: EtcdMemberSpec): string => `http://${HOST_ADDRESS[m.host]}:${m.peerPort}`;
/** Every backend is given all three members in this order, so both watch m0 first (the one the test kills). */
export const ETCD_ENDPOINTS = ETCD_MEMBERS.map(clientUrl);

export const ETCD_PREFIX = '/vrdma/multihost/';

/** The VM each host serves, and its virtual address. */
export const VM_OF_HOST: Record<HostId, { vmId: string; ip: string }> = {
  'host-1': { vmId: 'a1', ip: '172.16.0.1' },
  'host-2': { vmId: 'a2', ip: '172.16.0.2' },
};
/** globex's VM on host 2 (same numeric range, another VPC): a destination host 1's VM must never reach. */
export const OTHER_TENANT_IP = '172.16.0.3';
/** acme's DSCP: the host QPs' traffic class is DSCP << 2, which the IPv4 TOS byte on the wire carries. */
export const ACME_DSCP = 26;
export const ALLOW_RULE_ID = 10;

export const gidHex = (ip: string): string => Buffer.from(gidFromIpv4(ip)).toString('hex');

/** The policy document both backends read from etcd. `allow` false drops rule 10: the VPC's default (deny) rules. */
export function multiHostPolicy(allow: boolean) {
  return {
    version: 1,
    provider: { dscp: 48 },
    defaultQuotas: { pds: 4, cqs: 8, qps: 16, mrs: 8, ahs: 8, mrBytes: 8 << 20, controlRequests: 8 },
    hosts: [
      { id: 'host-1', address: HOST_ADDRESS['host-1'] },
      { id: 'host-2', address: HOST_ADDRESS['host-2'] },
    ],
    tenants: [
      { id: 'acme', qos: { dscp: ACME_DSCP } },
      { id: 'globex', qos: { dscp: 10 } },
    ],
    vpcs: [
      {
        id: 'acme-prod',
        tenant: 'acme',
        cidr: '172.16.0.0/24',
        defaultAction: 'deny',
        rules: allow ? [{ id: ALLOW_RULE_ID, action: 'allow', src: '172.16.0.0/24', dst: '172.16.0.0/24', qpTypes: ['RC', 'UD'] }] : [],
      },
      { id: 'globex-net', tenant: 'globex', cidr: '172.16.0.0/24', defaultAction: 'allow', rules: [] },
    ],
    vms: [
      { id: VM_OF_HOST['host-1'].vmId, vpc: 'acme-prod', ip: VM_OF_HOST['host-1'].ip, host: 'host-1' },
      { id: VM_OF_HOST['host-2'].vmId, vpc: 'acme-prod', ip: VM_OF_HOST['host-2'].ip, host: 'host-2' },
      { id: 'g2', vpc: 'globex-net', ip: OTHER_TENANT_IP, host: 'host-2' },
    ],
  };
}
