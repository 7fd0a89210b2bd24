// The project's layer rules (README "Layout"), checked by `npm run check:layers` in CI. Each layer imports only
// downward:
//   vmm-device/abi                the specification's structures and constants: imports nothing of ours
//   vmm-device/util, native       logging; typed wrappers of the addon
//   vmm-device/memory             guest memory
//   vmm-device/virtqueue          split and packed rings (knows no eventfd)
//   vmm-device/virtio             the virtio device core and the model contract
//   vmm-device/host               transport-neutral host services over the addon (fd-backed mappings, host ops)
//   vmm-device/transport/<name>   vhost-user, vfio-user, ...: never each other, except that a transport presenting
//                                 a PCI function uses transport/virtio-pci (the device side of virtio-pci, itself
//                                 importing no other transport)
//   vmm-device/verbs              the host verbs interface (the addon behind it)
//   vmm-device/rdma               the virtio-rdma device model: knows no transport, no socket, no addon
//   vmm-device/vpc                policy at the queue pair, beside the model
//   vmm-device/observe            metrics, the flight recorder, replay: observes sessions and the model from above
//   vmm-device/cli                the vrdma-backend command: wires everything
//   guest-driver-spec/**          the spec's tooling (drivers, frontend, qtest, testkit): above all of vmm-device
// No import cycle anywhere.
const layer = (name) => `^vmm-device/${name}/`;

/** A rule: files in `from` may import only from the folders in `allowed` (their own folder always). */
function onlyDown(name, from, allowed) {
  const own = from.replace(/\/$/, '');
  return {
    name,
    severity: 'error',
    comment: `${from} imports only from: ${allowed.join(', ') || '(nothing of ours)'}`,
    from: { path: `^${from}` },
    to: {
      path: '^(vmm-device|guest-driver-spec)/',
      pathNot: [`^${own}/`, ...allowed.map((a) => `^${a}/`)],
    },
  };
}

module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      severity: 'error',
      comment: 'import cycles make layers impossible to name',
      from: {},
      to: { circular: true },
    },
    {
      name: 'device-not-above-tooling',
      severity: 'error',
      comment: 'vmm-device never imports the spec tooling (guest-driver-spec sits above it)',
      from: { path: '^vmm-device/' },
      to: { path: '^guest-driver-spec/' },
    },
    onlyDown('abi-is-the-bottom', 'vmm-device/abi/', []),
    onlyDown('util-layer', 'vmm-device/util/', ['vmm-device/abi']),
    onlyDown('native-wrappers', 'vmm-device/native/', ['vmm-device/util']),
    onlyDown('memory-layer', 'vmm-device/memory/', ['vmm-device/abi', 'vmm-device/util']),
    onlyDown('virtqueue-layer', 'vmm-device/virtqueue/', ['vmm-device/abi', 'vmm-device/memory', 'vmm-device/util']),
    onlyDown('virtio-core-layer', 'vmm-device/virtio/', ['vmm-device/abi', 'vmm-device/memory', 'vmm-device/virtqueue', 'vmm-device/util']),
    onlyDown('host-layer', 'vmm-device/host/', ['vmm-device/abi', 'vmm-device/memory', 'vmm-device/native', 'vmm-device/util']),
    onlyDown('verbs-layer', 'vmm-device/verbs/', ['vmm-device/abi', 'vmm-device/memory', 'vmm-device/native', 'vmm-device/util']),
    {
      name: 'transports-are-siblings',
      severity: 'error',
      comment: 'a transport never imports another transport (virtio-pci is the PCI face vfio-user presents)',
      from: { path: '^vmm-device/transport/([^/]+)/' },
      to: { path: '^vmm-device/transport/', pathNot: ['^vmm-device/transport/$1/', '^vmm-device/transport/virtio-pci/'] },
    },
    {
      name: 'virtio-pci-is-transport-neutral',
      severity: 'error',
      comment: 'the virtio-pci function knows no transport that presents it (no vfio-user, no addon)',
      from: { path: '^vmm-device/transport/virtio-pci/' },
      to: { path: '^vmm-device/(transport/(?!virtio-pci/)|native/|host/)' },
    },
    onlyDown('transport-layer', 'vmm-device/transport/', [
      'vmm-device/abi', 'vmm-device/memory', 'vmm-device/virtqueue', 'vmm-device/virtio', 'vmm-device/host',
      'vmm-device/native', 'vmm-device/util',
    ]),
    onlyDown('rdma-model-layer', 'vmm-device/rdma/', [
      'vmm-device/abi', 'vmm-device/memory', 'vmm-device/virtqueue', 'vmm-device/virtio', 'vmm-device/verbs',
      'vmm-device/util',
    ]),
    onlyDown('vpc-beside-the-model', 'vmm-device/vpc/', [
      'vmm-device/abi', 'vmm-device/rdma', 'vmm-device/verbs', 'vmm-device/util',
    ]),
    onlyDown('observe-above-the-model', 'vmm-device/observe/', [
      'vmm-device/abi', 'vmm-device/memory', 'vmm-device/virtqueue', 'vmm-device/virtio', 'vmm-device/host',
      'vmm-device/transport', 'vmm-device/verbs', 'vmm-device/rdma', 'vmm-device/vpc', 'vmm-device/util',
    ]),
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '^(node_modules|native/build)' },
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
    enhancedResolveOptions: { extensions: ['.ts', '.js', '.mjs', '.cjs', '.json'] },
    moduleSystems: ['es6', 'cjs'],
  },
};
