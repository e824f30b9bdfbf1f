#!/usr/bin/env bash
# The dashboard under a large run: a daemon runs the example-python `metrics` case with N
# instances (default 1000), each writing P metric points (default 100: 100,000 points) and L
# output lines (default 100), while the CLI follows its log. Prints the daemon's RSS (idle,
# peak while the run's log streams, after) and then the run page's timings in headless
# Chromium (bench-run-page.mjs): first paint, the instance table complete, the plot drawn.
# Usage: bench/dashboard.sh [N] [P] [L]. Needs node, /usr/bin/chromium and
# crates/cli/tests/browser/node_modules (npm ci); builds target/release/testground.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}; p=${2:-100}; l=${3:-100}
cargo build --release -q -p testground
tg=$PWD/target/release/testground
home=$(mktemp -d /tmp/tg-bench-dash.XXXXXX)
daemon=
trap '[ -z "$daemon" ] || kill "$daemon" 2>/dev/null; wait 2>/dev/null; rm -rf "$home"' EXIT
export TESTGROUND_HOME=$home
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$home/.env.toml" <<TOML
[daemon]
listen = "127.0.0.1:$port"
tokens = ["bench"]
[client]
endpoint = "http://127.0.0.1:$port"
token = "bench"
TOML
"$tg" plan import --from plans/example-python > /dev/null
"$tg" daemon > "$home/daemon.log" 2>&1 &
daemon=$!
until curl -s -o /dev/null "http://127.0.0.1:$port/"; do sleep 0.1; done
rss() { awk '/VmRSS/{print $2}' "/proc/$daemon/status"; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
echo "daemon RSS idle: $(( $(rss) / 1024 )) MiB"
peak=0
( while kill -0 "$daemon" 2>/dev/null; do rss; sleep 0.1; done ) > "$home/rss" &
sampler=$!
start=$(date +%s.%N)
"$tg" run single --plan example-python --testcase metrics --builder exec:generic \
  --runner local:exec -i "$n" --tp points="$p" --tp lines="$l" --wait > "$home/run.out" 2>&1 || true
end=$(date +%s.%N)
kill "$sampler" 2>/dev/null || true
peak=$(sort -n "$home/rss" | tail -1)
task=$(grep -o 'run is queued with ID: [a-z0-9]*' "$home/run.out" | awk '{print $NF}')
echo "run $task: $(grep -o 'outcome = [a-z]* ([^)]*)' "$home/run.out" | head -1), $(printf '%.1f' "$(echo "$end - $start" | bc)") s, $(wc -l < "$home/run.out") log lines followed by the CLI"
echo "daemon RSS peak while the run's log streamed: $(( peak / 1024 )) MiB; after: $(( $(rss) / 1024 )) MiB"
node crates/cli/tests/browser/bench-run-page.mjs "http://127.0.0.1:$port" bench "$task" "$n"
echo "daemon RSS after the page loads: $(( $(rss) / 1024 )) MiB"
