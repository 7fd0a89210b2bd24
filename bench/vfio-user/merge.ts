// bench-results/vfio-user.json holds the records of two benches (bench.ts: control round trip, outside the test
// host; data-path.ts: the relayed data path, inside it). Each rewrites only its own records, keeping the other's.
import fs from 'node:fs';
import { writeResults, type BenchRecord } from '../common/results.ts';

export function mergeResults(file: string, records: readonly BenchRecord[]): void {
  const mine = new Set(records.map((r) => r.metric));
  const kept = fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, 'utf8')) as BenchRecord[]).filter((r) => !mine.has(r.metric)) : [];
  writeResults(file, [...kept, ...records]);
}
