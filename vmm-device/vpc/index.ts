// The VPC policy layer (issue 6): beside the device model, never inside the data path. See README.md.
export { VpcEngine, DEFAULT_RULE_ID, type Decision, type Connection, type TeardownNotice, type TeardownSink, type Counters, type VmView, type QuotaCharge, type ChargeResult } from './engine.ts';
export { VpcAddressResolver, type PolicyHooks, type HookAnswer } from './resolver.ts';
export { FilePolicySource } from './file-source.ts';
export { EtcdClient } from './etcd-client.ts';
export { EtcdPolicySource, publishPolicy, policyKeys, SETTINGS_KEY } from './etcd-source.ts';
export { PolicyDocumentSchema, validatePolicy, parsePolicyText, QUOTA_KINDS, type PolicyDocument, type QuotaKind } from './schema.ts';
export { linkDevice, type DeviceLink, type TeardownCapableDevice } from './device-link.ts';
