#!/usr/bin/env bash
# Benchmark (issue 12): N live instances of a plan through R barrier rounds under local:exec
# (or the runner in $RUNNER, e.g. RUNNER=local:netns), embedded mode, cached build, release
# binary. Reports wall time, the engine's peak RSS and
# the machine's peak memory in use (MemTotal - MemAvailable, sampled every 0.2 s, minus what
# was in use before the run).
# Usage: bench/barriers.sh [plan] [case] [builder] [N...]
#   bench/barriers.sh example-sdk barriers exec:rust 1000 5000 10000
#   bench/barriers.sh sync-compat barriers exec:go 5000
#   RUNNER=local:netns bench/barriers.sh example-sdk barriers exec:rust 2000
# Also reports when every instance had started (the run log's `started N/N` line), and stops
# a run (SIGINT) when the machine's available memory falls below $MIN_AVAIL_MIB (default 2048).
# KEEP_HOME=1 keeps the run's home (outputs, logs) and prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
plan=${1:-example-sdk}
case=${2:-barriers}
builder=${3:-exec:rust}
shift 3 || true
counts=("$@"); [ ${#counts[@]} -gt 0 ] || counts=(1000 5000 10000)
runner=${RUNNER:-local:exec}
min_avail_kib=$(( ${MIN_AVAIL_MIB:-2048} * 1024 ))

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p testground
tg=$CARGO_TARGET_DIR/release/testground
export TESTGROUND_HOME=$(mktemp -d /tmp/tg-bench.XXXXXX)
# KEEP_HOME=1 keeps the home (instance outputs, task logs) for a look at a failed run.
if [ -n "${KEEP_HOME:-}" ]; then
  echo "home kept: $TESTGROUND_HOME" >&2
else
  trap 'rm -rf "$TESTGROUND_HOME"' EXIT
fi
"$tg" plan import --from "plans/$plan" >/dev/null
# Warm the build cache (not measured).
"$tg" run single -p "$plan" -t "$case" -b "$builder" -r "$runner" -i 2 --wait >/dev/null

used_kib() { awk '/^MemTotal:/{t=$2} /^MemAvailable:/{a=$2} END{print t-a}' /proc/meminfo; }
avail_kib() { awk '/^MemAvailable:/{print $2}' /proc/meminfo; }

echo "| plan | runner | instances | all started after (s) | wall time (s) | outcome line after start (s) | engine peak RSS (MiB) | peak memory in use (GiB) | outcome |"
echo "|---|---|---|---|---|---|---|---|---|"
for n in "${counts[@]}"; do
  log=$(mktemp)
  base=$(used_kib)
  peak=$base
  start=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$log.rss" "$tg" run single -p "$plan" -t "$case" -b "$builder" \
    -r "$runner" -i "$n" --wait >"$log" 2>&1 &
  pid=$!
  outcome_at=""
  started_at=""
  stopped=""
  while kill -0 "$pid" 2>/dev/null; do
    u=$(used_kib); [ "$u" -gt "$peak" ] && peak=$u
    if [ -z "$stopped" ] && [ "$(avail_kib)" -lt "$min_avail_kib" ]; then
      echo "available memory below $((min_avail_kib / 1024)) MiB: stopping the run" >&2
      pkill -INT -P "$pid" testground 2>/dev/null || true
      kill -INT "$pid" 2>/dev/null || true
      stopped=1
    fi
    if [ -z "$started_at" ] && grep -q "started $n/$n instances" "$log"; then
      started_at=$(echo "$(date +%s.%N) - $start" | bc)
    fi
    if [ -z "$outcome_at" ] && grep -q 'run finished with outcome' "$log"; then
      outcome_at=$(echo "$(date +%s.%N) - $start" | bc)
    fi
    sleep 0.2
  done
  set +e; wait "$pid"; rc=$?; set -e
  end=$(date +%s.%N)
  outcome=$(grep -o 'run finished with outcome = [a-z]* ([^)]*)' "$log" | head -1 | sed 's/run finished with //')
  rss_kb=$(tail -1 "$log.rss")
  printf '| %s | %s | %d | %s | %.2f | %s | %.1f | %.2f | %s (exit %d) |\n' "$plan:$case" "$runner" "$n" \
    "${started_at:-?}" "$(echo "$end - $start" | bc)" "${outcome_at:-?}" "$(echo "$rss_kb / 1024" | bc -l)" \
    "$(echo "($peak - $base) / 1048576" | bc -l)" "$outcome" "$rc"
  [ "$rc" -eq 0 ] || tail -5 "$log" >&2
  rm -f "$log" "$log.rss"
done
