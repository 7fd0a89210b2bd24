// The virtio device core layer.
export * from './constants.ts';
export type { ActivationContext, VirtioDeviceModel } from './device.ts';
export { VirtioDeviceCore, CORE_FEATURES, drainQueue, type TransportHooks, type CoreCounters } from './core.ts';
