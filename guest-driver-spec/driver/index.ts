// The reference virtio-rdma guest driver (spec: ../virtio-rdma.md): transports, the driver core, and a small
// verbs-like API for tests and the demo.
export * from './errors.ts';
export * from './memory.ts';
export * from './buffer.ts';
export * from './virtqueue.ts';
export * from './transport.ts';
export * from './vhost-user-transport.ts';
export * from './driver.ts';
export * from './verbs.ts';
// The qtest transport (qtest-transport.ts) is imported from its own file: it needs guest-driver-spec/qtest/.
