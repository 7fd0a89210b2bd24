// Records the golden vhost-user exchanges under fixtures/vhost-user/ by running the reference front-end against
// this back-end (with the echo test device). Run: npx tsx guest-driver-spec/frontend/record-fixtures.ts [name...]
// Re-record only when a change of the back-end's answers is intended, and review the diff byte by byte.

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FrontendRequest as R, SUPPORTED_PROTOCOL_FEATURES, bit, encodeConfig, encodeU64, encodeVringState, encodeMessage } from '../../vmm-device/transport/vhost-user/messages.ts';
import { F_RING_PACKED, F_VERSION_1 } from '../../vmm-device/abi/virtio.ts';
import { ECHO_F_TEST } from './conformance/echo-device.ts';
import { NEED_REPLY, negotiate, rig, type Rig } from './conformance/harness.ts';
import { EXCHANGE_FORMAT, stepsFromRecord, writeFixture, type ExchangeFixture } from './exchange-fixture.ts';
import type { StartOptions } from './frontend.ts';
import { GuestAllocator, PackedRingDriver, SplitRingDriver } from './guest-driver.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
export const FIXTURE_DIR = path.resolve(here, '../../fixtures/vhost-user');

export const ECHO_DEVICE_DESCRIPTION = {
  model: 'echo test device (guest-driver-spec/frontend/conformance/echo-device.ts)',
  queues: 2,
  maxQueueSize: 256,
  deviceFeatures: '0x1',
  configSize: 8,
  config: 'u32 magic 0x6f686365 (read-only), u32 writable',
};

export interface Scenario {
  name: string;
  description: string;
  run(r: Rig): Promise<void>;
}

/** QEMU's init on a 2-queue device and the start options of its two split rings (64 and 16 entries) in fresh RAM. */
async function initTwoRings(r: Rig): Promise<StartOptions> {
  await r.fe.init({ queues: 2 });
  const ram = r.ram([{ gpa: 0, size: 0x40000 }]);
  const alloc = new GuestAllocator(ram);
  const q0 = new SplitRingDriver(ram, alloc, 64);
  const q1 = new SplitRingDriver(ram, alloc, 16);
  return { ram, features: (1n << F_VERSION_1) | ECHO_F_TEST, queues: [{ index: 0, size: 64, ...q0.addrs }, { index: 1, size: 16, ...q1.addrs }] };
}

export const SCENARIOS: Scenario[] = [
  {
    name: 'qemu-lifecycle',
    description:
      "QEMU 10's sequence against a 2-queue device: init (features, protocol features, queue num, mem slots, back-end " +
      'channel, owner, call/err fds), start after DRIVER_OK (features, FEATURES_OK, ADD_MEM_REG, per ring NUM/BASE/ADDR/' +
      'KICK/CALL, ENABLE, DRIVER_OK), a config read, stop (disable, GET_VRING_BASE, status 0).',
    async run(r) {
      await r.fe.start(await initTwoRings(r));
      await r.fe.getConfig(0, 8);
      await r.fe.stop([0, 1]);
      await r.fe.sync();
    },
  },
  {
    name: 'patched-qemu-inflight-lifecycle',
    description:
      "The project's patched QEMU (scripts/qemu/README.md) against a 2-queue device: init, then at start SET_FEATURES, " +
      'GET_INFLIGHT_FD (2 queues of 64) and SET_INFLIGHT_FD with that area before the usual start sequence ending in ' +
      'SET_STATUS DRIVER_OK; a guest reset (disable, GET_VRING_BASE, SET_STATUS 0); a second start handing the same ' +
      'area back (no GET_INFLIGHT_FD), as after a back-end restart.',
    async run(r) {
      const o = await initTwoRings(r);
      const kept = await r.fe.start({ ...o, inflight: { numQueues: 2, queueSize: 64 } });
      try {
        await r.fe.stop([0, 1]);
        await r.fe.start({ ...o, inflight: { numQueues: 2, queueSize: 64, kept } });
        await r.fe.stop([0, 1]);
        await r.fe.sync();
      } finally {
        kept?.release();
      }
    },
  },
  {
    name: 'packed-ring-base',
    description:
      'A packed ring (VIRTIO_F_RING_PACKED acked): SET_VRING_BASE 0x8005 (position 5, wrap counter 1) on a ring of 8, ' +
      'started and stopped: GET_VRING_BASE answers 0x8005; then base 0x0003 (wrap counter 0) answers 0x0003; a base ' +
      'with bit 16 set and one at the ring size get REPLY_ACK failures.',
    async run(r) {
      await r.fe.init({ queues: 2 });
      const ram = r.ram([{ gpa: 0, size: 0x40000 }]);
      const alloc = new GuestAllocator(ram);
      const d = new PackedRingDriver(ram, alloc, 8, { index: 5, wrap: true });
      const features = (1n << F_VERSION_1) | (1n << F_RING_PACKED) | ECHO_F_TEST;
      await r.fe.start({ ram, features, queues: [{ index: 0, size: 8, ...d.addrs, base: d.base }] });
      await r.fe.getVringBase(0);
      await r.fe.request(R.SET_VRING_BASE, encodeVringState({ index: 0, num: 3 }), [], false);
      await r.fe.setVringFile(R.SET_VRING_KICK, 0, r.fe.kickFds.get(0));
      await r.fe.getVringBase(0);
      for (const num of [0x1_0000, 0x8000 | 8]) {
        r.fe.send(R.SET_VRING_BASE, encodeVringState({ index: 0, num }), [], NEED_REPLY);
        await r.fe.readMessage();
      }
      await r.fe.sync();
    },
  },
  {
    name: 'refusals-with-reply-ack',
    description:
      'With REPLY_ACK negotiated, refused requests that asked for an ack get u64 1 and the connection stays: ' +
      'SET_VRING_NUM on queue 5 of 2, SET_FEATURES with a bit never offered, SET_VRING_NUM size 48 (not a power of two); ' +
      'GET_CONFIG past the config space gets an empty reply; GET_VRING_BASE on queue 9 (no error form) closes.',
    async run(r) {
      await negotiate(r, SUPPORTED_PROTOCOL_FEATURES);
      r.fe.send(R.SET_VRING_NUM, encodeVringState({ index: 5, num: 64 }), [], NEED_REPLY);
      await r.fe.readMessage();
      r.fe.send(R.SET_FEATURES, encodeU64(bit(50)), [], NEED_REPLY);
      await r.fe.readMessage();
      r.fe.send(R.SET_VRING_NUM, encodeVringState({ index: 0, num: 48 }), [], NEED_REPLY);
      await r.fe.readMessage();
      r.fe.send(R.GET_CONFIG, encodeConfig({ offset: 4, flags: 0, data: new Uint8Array(8) }));
      await r.fe.readMessage();
      r.fe.send(R.GET_VRING_BASE, encodeVringState({ index: 9, num: 0 }));
      await r.fe.waitClosed();
    },
  },
  {
    name: 'bad-header-closes',
    description: 'A header with protocol version 2: the back-end closes without answering.',
    async run(r) {
      r.fe.sendRaw(encodeMessage(R.GET_FEATURES, 2));
      await r.fe.waitClosed();
    },
  },
];

export async function recordScenario(s: Scenario): Promise<ExchangeFixture> {
  const r = await rig({ queues: 2 });
  r.fe.record = [];
  try {
    await s.run(r);
    return { format: EXCHANGE_FORMAT, name: s.name, description: s.description, device: ECHO_DEVICE_DESCRIPTION, steps: stepsFromRecord(r.fe.record, r.fe.closedByBackend) };
  } finally {
    await r.finish();
  }
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const only = process.argv.slice(2);
  for (const s of SCENARIOS.filter((x) => only.length === 0 || only.includes(x.name))) {
    const f = await recordScenario(s);
    writeFixture(path.join(FIXTURE_DIR, `${s.name}.json`), f);
    console.log(`${s.name}: ${f.steps.length} steps`);
  }
}
