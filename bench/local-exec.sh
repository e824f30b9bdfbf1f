#!/usr/bin/env bash
# Benchmark: wall time and engine peak memory of `run single -i N` of a trivial plan under
# local:exec, with a cached build. Usage: bench/local-exec.sh [plan] [builder] [N...]
# Writes a markdown table row per N to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
plan=${1:-example-rust}
builder=${2:-exec:rust}
shift 2 || true
counts=("$@"); [ ${#counts[@]} -gt 0 ] || counts=(10 100 1000)

cargo build --release -q -p testground
tg=$PWD/target/release/testground
export TESTGROUND_HOME=$(mktemp -d /tmp/tg-bench.XXXXXX)
trap 'rm -rf "$TESTGROUND_HOME"' EXIT
"$tg" plan import --from "plans/$plan" >/dev/null
# Warm the build cache (not measured).
"$tg" run single -p "$plan" -t ok -b "$builder" -r local:exec -i 1 --wait >/dev/null

echo "| plan | instances | wall time (s) | engine peak RSS (MiB) | outcome |"
echo "|---|---|---|---|---|"
for n in "${counts[@]}"; do
  log=$(mktemp)
  start=$(date +%s.%N)
  set +e
  /usr/bin/time -f '%M' -o "$log.rss" "$tg" run single -p "$plan" -t ok -b "$builder" -r local:exec -i "$n" --wait >"$log" 2>&1
  rc=$?
  set -e
  end=$(date +%s.%N)
  outcome=$(grep -o 'run finished with outcome = [a-z]* ([^)]*)' "$log" | head -1 | sed 's/run finished with //')
  rss_kb=$(tail -1 "$log.rss")
  printf '| %s | %d | %.2f | %.1f | %s (exit %d) |\n' "$plan" "$n" "$(echo "$end - $start" | bc)" "$(echo "$rss_kb / 1024" | bc -l)" "$outcome" "$rc"
  rm -f "$log" "$log.rss"
done
