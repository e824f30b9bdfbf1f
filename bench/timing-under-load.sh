#!/usr/bin/env bash
# RTT error of the local:netns data plane, quiet and under a CPU load, for several builds of
# tg-sidecar's `netns-bench` example side by side in one run (issue 12, "timing under load").
#
# Usage (as root): bench/timing-under-load.sh ROUNDS NAME=BINARY [NAME=BINARY ...]
#   e.g. bench/timing-under-load.sh 3 before=/tmp/base/netns-bench after=target/release/examples/netns-bench
# A NAME ending in "-rtoff" runs its binary with TESTGROUND_PUMP_REALTIME=off;
# "-schedoff", "-session", "-slice" set TESTGROUND_INSTANCE_SCHED=off, session, slice (how the
# instances, or the benchmark's endpoints, are scheduled; default on: both).
#
# The load is LOAD busy shell loops (default 2, one per core of the 2-core machine), started
# before and killed after each loaded measurement. Each round measures every binary quiet, then
# every binary loaded. Prints one markdown row per round, load, build and latency: RTT error
# (measured minus 2L) in µs at the median, p99, max, and of the first probe.
set -euo pipefail
. "$(dirname "$0")/build-env.sh"
. "$(dirname "$0")/load.sh"
rounds=$1
shift
trap stop_load EXIT
machine_line
echo
echo "| round | load | build | L (ms) | samples | lost | p50 error (µs) | p99 error (µs) | max error (µs) | first error (µs) | pump release late p50 / p99 / max (µs) | pump; endpoints |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
for r in $(seq 1 "$rounds"); do
  for load in quiet "${load_n} busy"; do
    if [ "$load" != quiet ]; then start_load; fi
    for spec in "$@"; do
      name=${spec%%=*}
      bin=${spec#*=}
      build_env "$name"
      out=$(env "${env[@]}" "$bin" latency 2>&1) || { echo "$name failed: $out" >&2; continue; }
      pump=$(echo "$out" | sed -n 's/.*pump thread scheduling: //p' | head -1)
      ends=$(echo "$out" | sed -n 's/.*endpoint scheduling: //p' | head -1)
      pump="$pump; endpoints: ${ends:-not reported (older build)}"
      echo "$out" | awk -v r="$r" -v load="$load" -v name="$name" -v pump="$pump" \
        '$1 == "row" { late = (NF >= 11) ? sprintf("<%s / <%s / %s", $9, $10, $11) : "n/a"; printf "| %s | %s | %s | %s | %s | %s | %+d | %+d | %+d | %+d | %s | %s |\n", r, load, name, $2, $3, $4, $5, $6, $7, $8, late, pump }'
    done
    stop_load
  done
done
