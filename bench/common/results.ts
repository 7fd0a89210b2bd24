// The bench-results record format (README "Benchmarks write ..."), summary statistics, and writing the file.

import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

export interface BenchRecord {
  metric: string;
  ours: number;
  baseline: number;
  /** Exactly what the baseline is: tool, flags, where it ran. */
  baseline_name: string;
  /** ours / baseline. */
  ratio: number;
  unit: string;
  better: 'lower' | 'higher';
}

/** Decimal places kept in the file (sub-nanosecond digits of microsecond figures mean nothing). */
const DIGITS = 3;

export function round(x: number): number {
  const f = 10 ** DIGITS;
  return Math.round(x * f) / f;
}

export function record(metric: string, ours: number, baseline: number, baselineName: string, unit: string, better: 'lower' | 'higher'): BenchRecord {
  if (!(Number.isFinite(ours) && Number.isFinite(baseline) && baseline > 0)) {
    throw new Error(`${metric}: cannot form a ratio of ${ours} to ${baseline}`);
  }
  return { metric, ours: round(ours), baseline: round(baseline), baseline_name: baselineName, ratio: round(ours / baseline), unit, better };
}

/** The value at percentile p (0..100) by the nearest-rank method; throws on an empty list. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) throw new Error('percentile of no values');
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}

export function median(values: readonly number[]): number {
  if (values.length === 0) throw new Error('median of no values');
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function mean(values: readonly number[]): number {
  if (values.length === 0) throw new Error('mean of no values');
  return values.reduce((s, x) => s + x, 0) / values.length;
}

export function writeResults(file: string, records: readonly BenchRecord[]): void {
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify(records, null, 2) + '\n');
}
