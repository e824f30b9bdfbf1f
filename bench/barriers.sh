#!/usr/bin/env bash
# Benchmark (issue 12): N live instances of a plan through R barrier rounds under local:exec,
# embedded mode, cached build, release binary. Reports wall time, the engine's peak RSS and
# the machine's peak memory in use (MemTotal - MemAvailable, sampled every 0.2 s, minus what
# was in use before the run).
# Usage: bench/barriers.sh [plan] [case] [builder] [N...]
#   bench/barriers.sh example-sdk barriers exec:rust 1000 5000 10000
#   bench/barriers.sh sync-compat barriers exec:go 5000
set -euo pipefail
cd "$(dirname "$0")/.."
plan=${1:-example-sdk}
case=${2:-barriers}
builder=${3:-exec:rust}
shift 3 || true
counts=("$@"); [ ${#counts[@]} -gt 0 ] || counts=(1000 5000 10000)

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p testground
tg=$CARGO_TARGET_DIR/release/testground
export TESTGROUND_HOME=$(mktemp -d /tmp/tg-bench.XXXXXX)
trap 'rm -rf "$TESTGROUND_HOME"' EXIT
"$tg" plan import --from "plans/$plan" >/dev/null
# Warm the build cache (not measured).
"$tg" run single -p "$plan" -t "$case" -b "$builder" -r local:exec -i 2 --wait >/dev/null

used_kib() { awk '/^MemTotal:/{t=$2} /^MemAvailable:/{a=$2} END{print t-a}' /proc/meminfo; }

echo "| plan | instances | wall time (s) | outcome line after start (s) | engine peak RSS (MiB) | peak memory in use (GiB) | outcome |"
echo "|---|---|---|---|---|---|---|"
for n in "${counts[@]}"; do
  log=$(mktemp)
  base=$(used_kib)
  peak=$base
  start=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$log.rss" "$tg" run single -p "$plan" -t "$case" -b "$builder" \
    -r local:exec -i "$n" --wait >"$log" 2>&1 &
  pid=$!
  outcome_at=""
  while kill -0 "$pid" 2>/dev/null; do
    u=$(used_kib); [ "$u" -gt "$peak" ] && peak=$u
    if [ -z "$outcome_at" ] && grep -q 'run finished with outcome' "$log"; then
      outcome_at=$(echo "$(date +%s.%N) - $start" | bc)
    fi
    sleep 0.2
  done
  set +e; wait "$pid"; rc=$?; set -e
  end=$(date +%s.%N)
  outcome=$(grep -o 'run finished with outcome = [a-z]* ([^)]*)' "$log" | head -1 | sed 's/run finished with //')
  rss_kb=$(tail -1 "$log.rss")
  printf '| %s | %d | %.2f | %s | %.1f | %.2f | %s (exit %d) |\n' "$plan:$case" "$n" \
    "$(echo "$end - $start" | bc)" "${outcome_at:-?}" "$(echo "$rss_kb / 1024" | bc -l)" \
    "$(echo "($peak - $base) / 1048576" | bc -l)" "$outcome" "$rc"
  [ "$rc" -eq 0 ] || tail -5 "$log" >&2
  rm -f "$log" "$log.rss"
done
