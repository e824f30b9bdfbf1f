#!/usr/bin/env bash
# The machine's own wake-up lateness (bench/wake-floor.c), quiet and under LOAD busy loops
# (default 2), at normal and at real-time priority, ROUNDS times (issue 12, item 2: the floor
# under the shaped RTT's error). As root for the real-time rows. Markdown rows to stdout.
# Usage: bench/wake-floor.sh [ROUNDS] [WAKEUPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
n=${2:-4000}
load_n=${LOAD:-2}
bin=$(mktemp /tmp/wake-floor.XXXXXX)
cc -O2 -Wall -o "$bin" bench/wake-floor.c
pids=()
stop_load() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap 'stop_load; rm -f "$bin"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| round | load | priority | wake-ups | late p50 (µs) | p99 | p99.9 | max | min | over 1 ms |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
for r in $(seq 1 "$rounds"); do
  for load in quiet "$load_n busy"; do
    if [ "$load" != quiet ]; then
      for _ in $(seq 1 "$load_n"); do sh -c 'while :; do :; done' & pids+=($!); done
      sleep 1
    fi
    for prio in normal "SCHED_FIFO 10"; do
      pre=()
      [ "$prio" != normal ] && pre=(chrt -f 10)
      echo "| $r | $load | $prio $("${pre[@]}" "$bin" "$n")"
    done
    stop_load
  done
done
