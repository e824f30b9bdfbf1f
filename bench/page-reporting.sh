#!/usr/bin/env bash
# 5,000 sdk-go instances through 10 barrier rounds, PAIRS times with this virtual machine's free
# page reporting off (after touching TOUCH_GIB GiB so that the guest's memory is backed) and then
# with the machine's own setting, 30 s later (BENCHMARKS.md, "Why the same start took twice as
# long"). As root, with a release `testground` and TESTGROUND_HOME holding plans/sync-compat.
# It changes /sys/module/page_reporting/parameters/page_reporting_order for the runs only and
# puts the machine's value back on exit, whatever happens.
# Usage: bench/page-reporting.sh [PAIRS]   (TG=path/to/testground, TOUCH_GIB=18)
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-1}
tg=${TG:-target/release/testground}
param=/sys/module/page_reporting/parameters/page_reporting_order
[ -w "$param" ] || { echo "no free page reporting to turn off here ($param)" >&2; exit 2; }
orig=$(cat "$param")
bin=$(mktemp /tmp/touch-memory.XXXXXX)
trap 'echo "$orig" > "$param"; rm -f "$bin"' EXIT
cc -O2 -o "$bin" bench/touch-memory.c
one() {
  local log
  log=$(mktemp /tmp/page-reporting-run.XXXXXX)
  local a b s e
  a=$(awk '/^pgfault /{print $2}' /proc/vmstat)
  s=$(date +%s.%N)
  timeout -s INT 200 "$tg" run single -p sync-compat -t barriers -b exec:go -r local:exec \
    -i 5000 --wait > "$log" 2>&1 || true
  e=$(date +%s.%N)
  b=$(awk '/^pgfault /{print $2}' /proc/vmstat)
  echo "| $1 | $(grep -o 'result default\[[a-z0-9]*\]: [a-z]*' "$log" | awk '{print $3}') \
| $(grep -E 'starting 5000|started 5000/5000' "$log" | awk '{print $3}' | tr '\n' ' ')\
| $(echo "$e - $s" | bc) | $((b - a)) |"
  rm -f "$log"
  rm -rf "${TESTGROUND_HOME:?}"/data/outputs/*
}
echo "| free page reporting | outcome | start (first, all started) | wall (s) | page faults |"
echo "|---|---|---|---:|---:|"
for _ in $(seq 1 "$pairs"); do
  echo 11 > "$param"
  "$bin" "${TOUCH_GIB:-18}" 0 1 >&2
  one off
  echo "$orig" > "$param"
  sleep 30
  one on
done
