// Folds one campaign's per-target result lines (scripts/fuzz/run.sh --results) into bench-results/fuzz.json:
// the runs of every campaign of the same fuzz targets (git's tree hash of test/fuzz/targets; a change to a target
// or to the rig starts the count again), their sums per target and in total, and how far the 10^7-input goal is at
// the measured rates. With an empty lines file it recomputes the sums from the runs already recorded.
//   node scripts/fuzz/summarize.mjs <lines-file> <campaign-start> <targets-tree> <out.json>
import fs from 'node:fs';
import os from 'node:os';

/** Inputs the campaign is asked to reach over all targets (issue 12, item 6). */
const GOAL = 1e7;
const [linesFile, started, tree, out] = process.argv.slice(2);
if (!out) throw new Error('usage: node summarize.mjs <lines-file> <campaign-start> <targets-tree> <out.json>');
const runs = fs
  .readFileSync(linesFile, 'utf8')
  .trim()
  .split('\n')
  .filter(Boolean)
  .map((l) => JSON.parse(l));
let previous = { runs: [] };
try {
  previous = JSON.parse(fs.readFileSync(out, 'utf8'));
} catch {}
const kept = (previous.runs ?? []).filter((r) => r.targets_tree === tree && !runs.some((n) => n.target === r.target && n.campaign === started));
const all = [...kept, ...runs.map((r) => ({ ...r, campaign: started, targets_tree: tree }))];

const byTarget = {};
for (const r of all) {
  const t = (byTarget[r.target] ??= { executions: 0, seconds: 0, fuzzing_seconds: 0, cpu_s: 0, crashes: 0, findings: [], peak_rss_mb: 0, runs: 0 });
  t.executions += r.executions;
  t.seconds += r.seconds;
  t.cpu_s += r.cpu_s ?? 0;
  t.crashes += r.crashes;
  t.runs++;
  // libFuzzer's exec/s excludes start-up; the time it stands for is what the rate is over.
  t.fuzzing_seconds += r.exec_per_s > 0 ? r.executions / r.exec_per_s : r.seconds;
  if (r.finding) t.findings.push(r.finding);
  t.peak_rss_mb = Math.max(t.peak_rss_mb, r.peak_rss_mb);
  t.coverage = r.coverage;
  t.corpus = r.corpus;
}
const share = GOAL / Math.max(1, Object.keys(byTarget).length);
for (const t of Object.values(byTarget)) {
  t.exec_per_s = Math.round(t.executions / t.fuzzing_seconds);
  t.inputs_per_cpu_s = t.cpu_s > 0 ? Math.round(t.executions / t.cpu_s) : null;
  // Hours this target needs for an equal share of the goal at its rate.
  t.hours_to_equal_share = t.exec_per_s > 0 ? +(Math.max(0, share - t.executions) / t.exec_per_s / 3600).toFixed(1) : null;
  t.fuzzing_seconds = Math.round(t.fuzzing_seconds);
  t.cpu_s = Math.round(t.cpu_s);
}
const list = Object.values(byTarget);
const totals = list.reduce(
  (a, t) => ({ executions: a.executions + t.executions, crashes: a.crashes + t.crashes, seconds: a.seconds + t.seconds }),
  { executions: 0, crashes: 0, seconds: 0 },
);
// Going on as campaign.sh does (equal time per target), the inputs per second are the mean of the targets' rates.
const meanRate = list.reduce((a, t) => a + t.exec_per_s, 0) / Math.max(1, list.length);
const goal = {
  inputs: GOAL,
  reached: totals.executions,
  hours_left_equal_time_per_target: meanRate > 0 ? +(Math.max(0, GOAL - totals.executions) / meanRate / 3600).toFixed(1) : null,
  // One fuzzing process at a time: the targets' hours add up.
  hours_left_equal_share_per_target: +list.reduce((a, t) => a + (t.hours_to_equal_share ?? 0), 0).toFixed(1),
};
const doc = {
  what:
    'coverage-guided fuzzing campaign (Jazzer.js 2.1.0 on libFuzzer 14): executions, findings and peak RSS per target; scripts/fuzz/campaign.sh. ' +
    'exec_per_s: libFuzzer average while fuzzing (start-up excluded); inputs_per_cpu_s: per CPU second of the fuzzing process, start-up included ' +
    '(what compares runs on a shared machine); load: 1-minute load average at the start and end of each run; ' +
    'hours_left_equal_time_per_target: time to the goal going on as campaign.sh does; hours_left_equal_share_per_target: time until every target has done goal/targets inputs, one after the other',
  machine: `${os.cpus().length} cores (shared), node ${process.version}, nice 19, one fuzzing process at a time`,
  targets_tree: tree,
  totals,
  goal,
  byTarget,
  ...(previous.measurements ? { measurements: previous.measurements } : {}),
  runs: all,
};
fs.writeFileSync(out, JSON.stringify(doc, null, 2) + '\n');
console.log(`campaign: ${totals.executions} executions, ${totals.crashes} crashes over ${list.length} targets -> ${out}`);
