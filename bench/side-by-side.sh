#!/usr/bin/env bash
# Side by side: the engine before (OLD) and after (NEW) issue 8, same machine, alternating runs.
# Usage: bench-side.sh OLD_BIN NEW_BIN PLAN_DIR N ROUNDS RUNNER
set -euo pipefail
old=$1; new=$2; plan=$3; n=$4; rounds=$5; runner=${6:-local:exec}
name=$(basename "$plan")
# The plan's `ok` case, built with exec:rust; the homes are removed however the script ends.
trap 'for w in old new; do [ -f /tmp/side-home-$w ] && rm -rf "$(cat /tmp/side-home-$w)" /tmp/side-home-$w; done' EXIT
for which in old new; do
  bin=${!which}
  home=$(mktemp -d /tmp/tg-side-$which.XXXXXX)
  echo "$home" > /tmp/side-home-$which
  TESTGROUND_HOME=$home "$bin" plan import --from "$plan" >/dev/null
  TESTGROUND_HOME=$home "$bin" run single -p "$name" -t ok -b exec:rust -r "$runner" -i 1 --wait >/dev/null
done
echo "| engine | round | instances | wall (s) | peak RSS (MiB) | outcome |"
echo "|---|---|---|---|---|---|"
for r in $(seq 1 "$rounds"); do
  for which in old new; do
    bin=${!which}; home=$(cat /tmp/side-home-$which)
    log=$(mktemp)
    s=$(date +%s.%N)
    TESTGROUND_HOME=$home /usr/bin/time -f '%M' -o "$log.rss" "$bin" run single -p "$name" -t ok -b exec:rust -r "$runner" -i "$n" --wait >"$log" 2>&1 || true
    e=$(date +%s.%N)
    outcome=$(grep -o 'outcome = [a-z]* ([^)]*)' "$log" | head -1)
    printf '| %s | %d | %d | %.2f | %.1f | %s |\n' "$which" "$r" "$n" "$(echo "$e - $s" | bc)" "$(echo "$(tail -1 "$log.rss") / 1024" | bc -l)" "$outcome"
    rm -f "$log" "$log.rss"
  done
done
