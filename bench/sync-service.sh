#!/usr/bin/env bash
# Benchmark: sync services side by side, each server in its own process, loaded by
# `sync-bench client` from another process (pipelined throughput, barrier release, idle memory).
#
# Usage: bench/sync-service.sh BEFORE_BIN AFTER_BIN [CLIENT_BIN]
#   BEFORE_BIN / AFTER_BIN: `sync-bench` binaries whose `server` mode runs the service to compare
#   (e.g. one built from main, one from this branch); CLIENT_BIN (default AFTER_BIN) generates the
#   load for both. To load another service (e.g. the original Go sync-service), start it yourself
#   and run `sync-bench client --addr HOST:PORT ...` against it (see `sync-bench client --help`).
#
# Two scheduling setups, because other work shares this 2-core machine:
#   rt-pinned: server (1 worker thread) on CPU 0 and client on CPU 1, both SCHED_FIFO 20, so
#              that neither competes with the other or with other processes;
#   shared:    server (2 workers) and client unpinned, normal scheduling.
# Markdown tables go to stdout.
set -euo pipefail
before=${1:?before binary}
after=${2:?after binary}
client=${3:-$after}
port=${SYNC_BENCH_PORT:-5290}
secs=${SYNC_BENCH_SECS:-3}

# start_server BIN THREADS CPUS RT -> sets $srv_pid. The server runs until its stdin (a fifo
# held open on fd 9) closes.
start_server() {
  local bin=$1 threads=$2 cpus=$3 rt=$4 dir
  dir=$(mktemp -d /tmp/sync-bench.XXXXXX)
  mkfifo "$dir/in"
  local prefix=(taskset -c "$cpus")
  [ "$rt" = 1 ] && prefix+=(chrt -f 20)
  "${prefix[@]}" "$bin" server --addr "127.0.0.1:$port" --threads "$threads" <"$dir/in" >"$dir/out" &
  srv_pid=$!
  exec 9>"$dir/in"
  until grep -q listening "$dir/out" 2>/dev/null; do sleep 0.02; done
  rm -rf "$dir"
}
stop_server() {
  exec 9>&-
  wait "$srv_pid" 2>/dev/null || true
  port=$((port + 1))
}
run_client() { # CPUS RT ARGS...
  local cpus=$1 rt=$2; shift 2
  local prefix=(taskset -c "$cpus")
  [ "$rt" = 1 ] && prefix+=(chrt -f 20)
  "${prefix[@]}" "$client" client --addr "127.0.0.1:$port" --server-pid "$srv_pid" "$@"
}

echo "# sync-service bench, $(date -u +%FT%TZ), $(nproc) CPUs, kernel $(uname -r), load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
for setup in rt-pinned shared; do
  if [ $setup = rt-pinned ]; then sthreads=1 scpus=0 ccpus=1 rt=1; else sthreads=2 scpus=0-1 ccpus=0-1 rt=0; fi
  echo "## throughput, $setup (server $sthreads worker(s) on CPU $scpus, client on CPU $ccpus, ${secs} s per cell after 1 s warm-up)"
  echo
  echo "| server | op | conns | depth | ops/s | server CPU | server µs/op | client CPU | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  for cell in "10 1" "10 16" "10 64" "10 256" "100 16" "1000 4"; do
    set -- $cell
    for op in signal-entry publish barrier; do
      for which in before after; do
        bin=$before; [ $which = after ] && bin=$after
        start_server "$bin" $sthreads $scpus $rt
        row=$(run_client $ccpus $rt throughput --op $op --conns "$1" --depth "$2" --secs "$secs" --run t)
        stop_server
        echo "| $which | ${row#| }"
      done
    done
  done
  echo
done

for setup in rt shared; do
  if [ $setup = rt ]; then rt=1; else rt=0; fi
  echo "## barrier release, $setup (server 2 workers, client 2 threads, unpinned; 5 rounds each)"
  echo
  echo "| server | waiters | rounds | min | median | max |"
  echo "|---|---:|---:|---:|---:|---:|"
  for w in 1000 10000; do
    for which in before after; do
      bin=$before; [ $which = after ] && bin=$after
      start_server "$bin" 2 0-1 $rt
      row=$(run_client 0-1 $rt --threads 2 barrier --waiters $w --rounds 5 --run b | tail -1)
      stop_server
      echo "| $which | ${row#| }"
    done
  done
  echo
done

echo "## idle connections (each sent one request), server RSS"
echo
echo "| server | conns | RSS before | RSS after | per connection |"
echo "|---|---:|---:|---:|---:|"
for which in before after; do
  bin=$before; [ $which = after ] && bin=$after
  start_server "$bin" 2 0-1 0
  row=$(run_client 0-1 0 idle-mem --conns 10000 --run i)
  stop_server
  echo "| $which | ${row#| }"
done
