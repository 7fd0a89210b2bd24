#!/usr/bin/env bash
# `npm run check:layers`: the layer rules of .dependency-cruiser.cjs over vmm-device/ and guest-driver-spec/ (no
# upward import, no cycle), and the size rule: no source file under vmm-device/ longer than MAX_LINES (a file that
# long holds more than one job). Exit status 0 only when both hold.
set -uo pipefail
cd "$(dirname "$0")/.."
MAX_LINES=800
status=0
if ! npx --no-install depcruise --config .dependency-cruiser.cjs vmm-device guest-driver-spec; then
  status=1
fi
while IFS= read -r line; do
  n=${line%% *}
  file=${line#* }
  if [ "$n" -gt "$MAX_LINES" ]; then
    echo "size rule: $file has $n lines (at most $MAX_LINES under vmm-device/: split it by job)"
    status=1
  fi
done < <(find vmm-device -name '*.ts' -type f -exec wc -l {} + | grep -v ' total$' | awk '{print $1" "$2}')
[ "$status" -eq 0 ] && echo "layers: ok (layer rules hold, no file under vmm-device/ over $MAX_LINES lines)"
exit "$status"
