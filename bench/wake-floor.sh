#!/usr/bin/env bash
# The machine's own wake-up lateness (bench/wake-floor.c), quiet and under LOAD busy loops
# (default 2), at normal and at real-time priority, ROUNDS times (issue 12, item 2: the floor
# under the shaped RTT's error). As root for the real-time rows. Markdown rows to stdout.
# Usage: bench/wake-floor.sh [ROUNDS] [WAKEUPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
n=${2:-4000}
. bench/load.sh
bin=$(mktemp /tmp/wake-floor.XXXXXX)
cc -O2 -Wall -o "$bin" bench/wake-floor.c
trap 'stop_load; rm -f "$bin"' EXIT
machine_line
echo
echo "| round | load | priority | wake-ups | late p50 (µs) | p99 | p99.9 | max | min | over 1 ms | of which over 1 ms before the guest woke it |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for r in $(seq 1 "$rounds"); do
  for load in quiet "$load_n busy"; do
    if [ "$load" != quiet ]; then start_load; fi
    for prio in normal "SCHED_FIFO 10"; do
      pre=()
      [ "$prio" != normal ] && pre=(chrt -f 10)
      echo "| $r | $load | $prio $("${pre[@]}" "$bin" "$n")"
    done
    stop_load
  done
done
