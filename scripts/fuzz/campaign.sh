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
nice -n 19 bash scripts/fuzz/run.sh --seconds "$seconds" --results "$lines" "${args[@]}"
rc=$?
mkdir -p bench-results
node -e '
const fs = require("fs");
const [linesFile, started, out] = process.argv.slice(1);
const runs = fs.readFileSync(linesFile, "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
let previous = { runs: [] };
try { previous = JSON.parse(fs.readFileSync(out, "utf8")); } catch {}
// Runs of this campaign replace earlier runs of the same target that started in the same campaign file.
const all = [...(previous.runs || []).filter((r) => !runs.some((n) => n.target === r.target && n.campaign === started)), ...runs.map((r) => ({ ...r, campaign: started }))];
const byTarget = {};
for (const r of all) {
  const t = (byTarget[r.target] ??= { executions: 0, seconds: 0, crashes: 0, peak_rss_mb: 0, runs: 0 });
  t.executions += r.executions; t.seconds += r.seconds; t.crashes += r.crashes; t.runs++;
  t.peak_rss_mb = Math.max(t.peak_rss_mb, r.peak_rss_mb);
}
const totals = Object.values(byTarget).reduce((a, t) => ({ executions: a.executions + t.executions, crashes: a.crashes + t.crashes, seconds: a.seconds + t.seconds }), { executions: 0, crashes: 0, seconds: 0 });
const doc = {
  what: "coverage-guided fuzzing campaign (Jazzer.js 2.1.0 on libFuzzer 14): executions, findings and peak RSS per target; scripts/fuzz/campaign.sh",
  machine: `${require("os").cpus().length} cores (shared), node ${process.version}, nice 19, one fuzzing process at a time`,
  totals,
  byTarget,
  runs: all,
};
fs.writeFileSync(out, JSON.stringify(doc, null, 2) + "\n");
console.log(`campaign: ${totals.executions} executions, ${totals.crashes} crashes over ${Object.keys(byTarget).length} targets -> ${out}`);
' "$lines" "$started" bench-results/fuzz.json
rm -f "$lines"
exit $rc
