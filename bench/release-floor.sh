#!/usr/bin/env bash
# Benchmark (issue 12, item 3): a barrier's release to N waiters by our sync service next to the
# kernel's floor for the same fan-out on this machine (bench/fanout-floor.c: one plain write per
# waiter from one process, epoll reads in another, nothing else), taking turns, quiet and with
# both sides at SCHED_FIFO 20.
#
# Usage (as root for the real-time rows): bench/release-floor.sh [ROUNDS] [SYNC_BENCH_BIN...]
#   SYNC_BENCH_BIN defaults to target/release/sync-bench (cargo build --release -p tg-sync --bin sync-bench);
#   several builds (e.g. before and after a change) take turns with the floor, row by row.
#   WAITERS (default "1000 10000") and SCHED (default "0 1": normal, then SCHED_FIFO) narrow it.
# Needs 10,000 + a few open files per process (ulimit -n). Markdown rows to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
sbs=("$@"); [ ${#sbs[@]} -gt 0 ] || sbs=(target/release/sync-bench)
floor=$(mktemp /tmp/fanout-floor.XXXXXX)
cc -O2 -Wall -pthread -o "$floor" bench/fanout-floor.c
port=${SYNC_BENCH_PORT:-5390}
dir=$(mktemp -d /tmp/release-floor.XXXXXX)
trap 'exec 9>&- 2>/dev/null || true; rm -rf "$dir" "$floor"' EXIT

ours() { # RT WAITERS SYNC_BENCH_BIN -> "min | median | max"
  local pre=() pid sb=$3
  [ "$1" = 1 ] && pre=(chrt -f 20)
  mkfifo "$dir/in"
  "${pre[@]}" "$sb" server --addr "127.0.0.1:$port" --threads 2 <"$dir/in" >"$dir/out" &
  pid=$!
  exec 9>"$dir/in"
  until grep -q listening "$dir/out" 2>/dev/null; do sleep 0.02; done
  "${pre[@]}" "$sb" client --addr "127.0.0.1:$port" --server-pid "$pid" --threads 2 \
    barrier --waiters "$2" --rounds 5 --run b | tail -1 | awk -F'|' '{print $4 "|" $5 "|" $6}'
  exec 9>&-
  wait "$pid" || true
  rm -f "$dir/in" "$dir/out"
  port=$((port + 1))
}
floor() { # RT WAITERS -> "min | median | max"
  local pre=()
  [ "$1" = 1 ] && pre=(chrt -f 20)
  "${pre[@]}" "$floor" "$2" 2 2 5 "$port" | awk -F'|' '{print $6 "|" $7 "|" $8}'
  port=$((port + 1))
}

echo "# $(date -u '+%F %T UTC'), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | scheduling | waiters | what | min | median | max |"
echo "|---|---|---:|---|---:|---:|---:|"
for r in $(seq 1 "$rounds"); do
  for rt in ${SCHED:-0 1}; do
    sched=normal; [ $rt = 1 ] && sched="SCHED_FIFO 20"
    for w in ${WAITERS:-1000 10000}; do
      echo "| $r | $sched | $w | floor (C, 2 writer threads, 2 reader threads) |$(floor $rt $w)|"
      for sb in "${sbs[@]}"; do
        name="our service"
        [ ${#sbs[@]} -gt 1 ] && name="our service, $sb"
        echo "| $r | $sched | $w | $name (2 workers; sync-bench client, 2 threads) |$(ours $rt $w "$sb")|"
      done
    done
  done
done
