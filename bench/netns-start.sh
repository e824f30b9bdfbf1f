#!/usr/bin/env bash
# Benchmark (issue 12): how fast `local:netns` starts instances, for several `testground`
# binaries side by side (e.g. before and after a change), embedded mode, cached build.
# Time to start = from the run log's `starting N instances` line to its `started N/N instances`
# line (every instance's network built and its process started); rate = N / that.
# Usage: bench/netns-start.sh BINARY... -- N...
#   bench/netns-start.sh /tmp/testground-before target/release/testground -- 100 1000
# Env: PLAN (placebo), CASE (ok), BUILDER (exec:go), RUNS (runs per binary and count, 2),
# SETTLE (seconds of pause before each run, 5); the
# binaries take turns, run by run, so that they share the machine's conditions.
set -euo pipefail
cd "$(dirname "$0")/.."
bins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bins+=("$1"); shift; done
shift || true
counts=("$@"); [ ${#counts[@]} -gt 0 ] || counts=(100 1000)
plan=${PLAN:-placebo}
case=${CASE:-ok}
builder=${BUILDER:-exec:go}
runs=${RUNS:-2}

homes=()
for b in "${bins[@]}"; do
  h=$(mktemp -d /tmp/tg-start.XXXXXX)
  homes+=("$h")
  TESTGROUND_HOME=$h "$b" plan import --from "plans/$plan" >/dev/null
  # Warm the build cache (not measured).
  TESTGROUND_HOME=$h "$b" run single -p "$plan" -t "$case" -b "$builder" -r local:netns -i 2 \
    --wait >/dev/null 2>&1 || true
done
trap 'rm -rf "${homes[@]}"' EXIT

secs() { # "Dec  2 03:15:44.123456" -> seconds of the day
  awk '{split($3, t, ":"); printf "%.6f\n", t[1] * 3600 + t[2] * 60 + t[3]}'
}

echo "| binary | instances | run | time to start (s) | instances/s | whole run (s) | outcome |"
echo "|---|---|---|---|---|---|---|"
for n in "${counts[@]}"; do
  for r in $(seq "$runs"); do
    for i in "${!bins[@]}"; do
      # The kernel destroys the previous run's namespaces after it ends (cleanup_net, under
      # rtnl): let that finish so it does not slow this run's start.
      sleep "${SETTLE:-5}"
      log=$(mktemp)
      t0=$(date +%s.%N)
      set +e
      TESTGROUND_HOME=${homes[$i]} "${bins[$i]}" run single -p "$plan" -t "$case" \
        -b "$builder" -r local:netns -i "$n" --wait >"$log" 2>&1
      rc=$?
      set -e
      t1=$(date +%s.%N)
      a=$(grep -m1 "starting $n instances" "$log" | secs)
      z=$(grep -m1 "started $n/$n instances" "$log" | secs)
      if [ -n "$a" ] && [ -n "$z" ]; then
        d=$(echo "$z - $a" | bc -l)
        rate=$(echo "$n / $d" | bc -l)
      else
        d=0; rate=0
      fi
      outcome=$(grep -o 'run finished with outcome = [a-z]* ([^)]*)' "$log" | head -1 \
        | sed 's/run finished with outcome = //')
      printf '| %s | %d | %d | %.2f | %.0f | %.2f | %s (exit %d) |\n' "${bins[$i]}" "$n" "$r" \
        "$d" "$rate" "$(echo "$t1 - $t0" | bc)" "$outcome" "$rc"
      grep -h "instance networks" "$log" | sed 's/^/    /' >&2 || true
      rm -f "$log"
    done
  done
done
