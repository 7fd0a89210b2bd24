// The virtio device core layer.
export * from '../abi/virtio.ts';
export type { ActivationContext, VirtioDeviceModel } from './device.ts';
export { VirtioDeviceCore, CORE_FEATURES, drainQueue, type TransportHooks, type CoreCounters } from './core.ts';
