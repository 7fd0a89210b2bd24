#!/usr/bin/env bash
# The long fuzzing campaign (`npm run fuzz -- --seconds S [target...]` runs the same targets briefly): every target for
# S seconds (default 900), one fuzzing process at a time at the lowest priority (a shared machine), then
# bench-results/fuzz.json with the figures of this run: executions, crashes and peak RSS per target, and the totals.
#   bash scripts/fuzz/campaign.sh [--seconds S] [target...]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
seconds=900
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
lines=$(mktemp)
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# Runs accumulate over campaigns of the same fuzz targets (git's tree hash of test/fuzz/targets): a change to a
# target or to the rig starts the count again.
targets_tree=$(git rev-parse --short HEAD:test/fuzz/targets 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain -- test/fuzz/targets 2>/dev/null)" ] && targets_tree="$targets_tree+dirty"
nice -n 19 bash scripts/fuzz/run.sh --seconds "$seconds" --results "$lines" "${args[@]}"
rc=$?
mkdir -p bench-results
node -e '
const fs = require("fs");
const [linesFile, started, tree, out] = process.argv.slice(1);
const GOAL = 1e7;
const runs = fs.readFileSync(linesFile, "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
let previous = { runs: [] };
try { previous = JSON.parse(fs.readFileSync(out, "utf8")); } catch {}
const kept = (previous.runs || []).filter((r) => r.targets_tree === tree && !runs.some((n) => n.target === r.target && n.campaign === started));
const all = [...kept, ...runs.map((r) => ({ ...r, campaign: started, targets_tree: tree }))];
const byTarget = {};
for (const r of all) {
  const t = (byTarget[r.target] ??= { executions: 0, seconds: 0, fuzzing_seconds: 0, cpu_s: 0, crashes: 0, findings: [], peak_rss_mb: 0, runs: 0 });
  t.executions += r.executions; t.seconds += r.seconds; t.cpu_s += r.cpu_s; t.crashes += r.crashes; t.runs++;
  t.fuzzing_seconds += r.exec_per_s > 0 ? r.executions / r.exec_per_s : r.seconds;
  if (r.finding) t.findings.push(r.finding);
  t.peak_rss_mb = Math.max(t.peak_rss_mb, r.peak_rss_mb);
  t.coverage = r.coverage; t.corpus = r.corpus;
}
for (const t of Object.values(byTarget)) {
  t.exec_per_s = Math.round(t.executions / t.fuzzing_seconds);
  t.inputs_per_cpu_s = t.cpu_s > 0 ? Math.round(t.executions / t.cpu_s) : null;
  t.fuzzing_seconds = Math.round(t.fuzzing_seconds); t.cpu_s = Math.round(t.cpu_s);
}
const list = Object.values(byTarget);
const totals = list.reduce((a, t) => ({ executions: a.executions + t.executions, crashes: a.crashes + t.crashes, seconds: a.seconds + t.seconds }), { executions: 0, crashes: 0, seconds: 0 });
// Time to the goal if the campaign goes on at these rates with equal time per target (what campaign.sh does).
const meanRate = list.reduce((a, t) => a + t.exec_per_s, 0) / Math.max(1, list.length);
const goal = { inputs: GOAL, reached: totals.executions, hours_left_at_these_rates: meanRate > 0 ? +((Math.max(0, GOAL - totals.executions) / meanRate) / 3600).toFixed(1) : null };
const doc = {
  what: "coverage-guided fuzzing campaign (Jazzer.js 2.1.0 on libFuzzer 14): executions, findings and peak RSS per target; scripts/fuzz/campaign.sh. exec_per_s: libFuzzer average while fuzzing (start-up excluded); inputs_per_cpu_s: per CPU second of the fuzzing process (the figure that compares runs on a shared machine); load: 1-minute load average at the start and end of each run",
  machine: `${require("os").cpus().length} cores (shared), node ${process.version}, nice 19, one fuzzing process at a time`,
  targets_tree: tree,
  totals,
  goal,
  byTarget,
  ...(previous.measurements ? { measurements: previous.measurements } : {}),
  runs: all,
};
fs.writeFileSync(out, JSON.stringify(doc, null, 2) + "\n");
console.log(`campaign: ${totals.executions} executions, ${totals.crashes} crashes over ${list.length} targets -> ${out}`);
' "$lines" "$started" "$targets_tree" bench-results/fuzz.json
rm -f "$lines"
exit $rc
