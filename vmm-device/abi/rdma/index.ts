// The virtio-rdma layouts shared by the device (vmm-device/) and the reference driver (guest-driver-spec/):
// constants, structure declarations with encode/decode, and framing helpers. The spec is virtio-rdma.md.
export * from './constants.ts';
export * from './struct.ts';
export * from './structs.ts';
export * from './codec.ts';
