# Sourced by the timing benchmarks: a CPU load of LOAD busy shell loops (default 2, one per core
# of the 2-core machine), started and stopped around the loaded measurements, and the line that
# names the machine.
#   start_load: starts the loops and gives them a second to take the CPUs;
#   stop_load:  stops them (also the scripts' EXIT trap, so nothing is left running).
load_n=${LOAD:-2}
load_pids=()
start_load() {
  for _ in $(seq 1 "$load_n"); do
    sh -c 'while :; do :; done' &
    load_pids+=($!)
  done
  sleep 1
}
stop_load() {
  for p in "${load_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${load_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  load_pids=()
}
machine_line() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
}
