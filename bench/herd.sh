#!/usr/bin/env bash
# Benchmark (issue 12): N sdk-go instances through 10 barrier rounds (`sync-compat:barriers`,
# local:exec), the sync service's fan-out pacing on (default) and off
# (`[sync] fanout_pace_runnable = 0`), taking turns, RUNS times each. Reports each run's
# outcome, wall time and the host's runnable tasks (/proc/loadavg, sampled every 5 ms: p50,
# p99, max) — a barrier release wakes every instance at once.
# Usage: bench/herd.sh [N] [RUNS]      e.g. bench/herd.sh 1000 4
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
runs=${2:-4}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p testground
tg=$CARGO_TARGET_DIR/release/testground
home_on=$(mktemp -d /tmp/tg-herd-on.XXXXXX)
home_off=$(mktemp -d /tmp/tg-herd-off.XXXXXX)
sampler=""
trap 'rm -rf "$home_on" "$home_off"; [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true' EXIT
printf '[sync]\nfanout_pace_runnable = 0\n' > "$home_off/.env.toml"
for h in "$home_on" "$home_off"; do
  TESTGROUND_HOME=$h "$tg" plan import --from plans/sync-compat >/dev/null
  TESTGROUND_HOME=$h "$tg" run single -p sync-compat -t barriers -b exec:go -r local:exec -i 2 --wait >/dev/null
done
# Prints "p50 p99 max" of the runnable count between its start and a SIGTERM.
sample() {
  exec python3 -c '
import signal, sys, time
xs = []
def done(*_):
    xs.sort(); n = len(xs)
    print(xs[n // 2], xs[min(n - 1, n * 99 // 100)], xs[-1]) if n else print("? ? ?")
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    xs.append(int(open("/proc/loadavg").read().split()[3].split("/")[0]))
    time.sleep(0.005)
'
}
echo "| run | fan-out pacing | instances | outcome | wall time (s) | runnable p50 / p99 / max |"
echo "|---|---|---|---|---|---|"
for r in $(seq 1 "$runs"); do
  for mode in on off; do
    h=$home_on; [ "$mode" = off ] && h=$home_off
    sleep 3
    out=$(mktemp)
    sample > "$out.q" & sampler=$!
    sleep 0.5  # the sampler's signal handler is in place
    start=$(date +%s.%N)
    set +e
    TESTGROUND_HOME=$h "$tg" run single -p sync-compat -t barriers -b exec:go -r local:exec -i "$n" --wait > "$out" 2>&1
    set -e
    end=$(date +%s.%N)
    kill -TERM "$sampler"; wait "$sampler" || true; sampler=""
    outcome=$(grep -o 'outcome = [a-z]* ([^)]*)' "$out" | head -1 | sed 's/outcome = //')
    read -r p50 p99 max < "$out.q" || true
    printf '| %d | %s | %d | %s | %.2f | %s / %s / %s |\n' "$r" "$mode" "$n" "${outcome:-?}" \
      "$(echo "$end - $start" | bc)" "$p50" "$p99" "$max"
    # Why a run failed: the first instance errors it recorded.
    case "${outcome:-?}" in
      success*) ;;
      *) grep -rhoE '"(error|msg)":"[^"]*(timed out|closed|deadline|failed)[^"]{0,160}' \
           "$h/data/outputs" 2>/dev/null | sort | uniq -c | sort -rn | head -3 >&2 || true ;;
    esac
    rm -rf "$h/data/outputs"
    rm -f "$out" "$out.q"
  done
done
