// `npm run bench:virtqueue`: chains per second for pop + used-update of 3-descriptor chains (EVENT_IDX on), our
// engine (split and packed) against QEMU's libvhost-user (split; it has no packed rings) on the same workload, in
// the same run. Rounds alternate between the two so that load from elsewhere on the machine hits both alike; the
// median round of each counts. Writes bench-results/virtqueue.json.

import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync, existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchPacked, benchSplit } from './engine.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const QUEUE_SIZE = 1024;
const BATCH = 256;
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const ROUND_SECONDS = Number(process.env.BENCH_ROUND_SECONDS ?? 1);

/** Compiles native-peer.c against libvhost-user from the project's QEMU source (cached next to it). */
function buildNativePeer(): string {
  const source = execFileSync('bash', [path.join(root, 'scripts/qemu/source.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
    .trim()
    .split('\n')
    .pop()!;
  const lib = path.join(source, 'subprojects/libvhost-user');
  const harness = path.join(root, 'bench/virtqueue/native-peer.c');
  const cacheDir = path.join(process.env.VRDMA_CACHE ?? '/var/cache/vrdma', 'bench');
  mkdirSync(cacheDir, { recursive: true });
  const bin = path.join(cacheDir, 'virtqueue-native-peer');
  if (!existsSync(bin) || statSync(bin).mtimeMs < statSync(harness).mtimeMs) {
    execFileSync('gcc', ['-O2', '-D_GNU_SOURCE', `-I${lib}`, `-I${lib}/include`, '-o', bin, harness, path.join(lib, 'libvhost-user.c'), '-lpthread'], {
      stdio: 'inherit',
    });
  }
  return bin;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const bin = buildNativePeer();
// Warm the JIT before the first measured round.
benchSplit(QUEUE_SIZE, BATCH, 0.5);
benchPacked(QUEUE_SIZE, BATCH, 0.5);

const native: number[] = [];
const split: number[] = [];
const packed: number[] = [];
for (let r = 0; r < ROUNDS; r++) {
  const out = JSON.parse(execFileSync(bin, [String(QUEUE_SIZE), String(BATCH), String(ROUND_SECONDS)], { encoding: 'utf8' })) as {
    chains_per_sec: number;
  };
  native.push(out.chains_per_sec);
  split.push(benchSplit(QUEUE_SIZE, BATCH, ROUND_SECONDS).chainsPerSec);
  packed.push(benchPacked(QUEUE_SIZE, BATCH, ROUND_SECONDS).chainsPerSec);
  process.stderr.write(`round ${r + 1}/${ROUNDS}: libvhost-user ${native[r]!.toFixed(0)}, split ${split[r]!.toFixed(0)}, packed ${packed[r]!.toFixed(0)} chains/s\n`);
}

const baseline = median(native);
const results = [
  {
    metric: 'split_pop_push_3desc_chains_per_sec',
    ours: Math.round(median(split)),
    baseline: Math.round(baseline),
    baseline_name: 'QEMU libvhost-user vu_queue_pop + vu_queue_push (C, -O2), same workload',
    ratio: Number((median(split) / baseline).toFixed(3)),
    unit: 'chains/s',
    better: 'higher',
  },
  {
    metric: 'packed_pop_push_3desc_chains_per_sec',
    ours: Math.round(median(packed)),
    baseline: Math.round(baseline),
    baseline_name: 'QEMU libvhost-user on the SPLIT ring (no native packed-ring peer: libvhost-user has none)',
    ratio: Number((median(packed) / baseline).toFixed(3)),
    unit: 'chains/s',
    better: 'higher',
  },
];
const outDir = path.join(root, 'bench-results');
mkdirSync(outDir, { recursive: true });
writeFileSync(path.join(outDir, 'virtqueue.json'), JSON.stringify(results, null, 2) + '\n');
for (const r of results) console.log(`${r.metric}: ours ${r.ours} ${r.unit}, baseline ${r.baseline} (${r.baseline_name}), ratio ${r.ratio}`);
