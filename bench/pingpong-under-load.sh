#!/usr/bin/env bash
# The seed's ping-pong (plans/network, case ping-pong, exec:go under local:netns, unmodified:
# RTT must land in [200 ms, 250 ms]) N times per build under a CPU load, builds alternating,
# counting passes (issue 12, "timing under load").
#
# Usage (as root): bench/pingpong-under-load.sh N NAME=TESTGROUND_BINARY [NAME=BINARY ...]
# A NAME ending in "-rtoff" runs with TESTGROUND_PUMP_REALTIME=off; "-schedoff", "-session",
# "-slice" with TESTGROUND_INSTANCE_SCHED=off, session, slice (default on: both). LOAD busy
# shell loops (default 2) run during the whole measurement; each build gets a fresh
# $TESTGROUND_HOME with the plan imported and built once before the load starts.
set -euo pipefail
. "$(dirname "$0")/build-env.sh"
. "$(dirname "$0")/load.sh"
n=$1
shift
here=$(cd "$(dirname "$0")/.." && pwd)
homes=()
cleanup() {
  stop_load
  for h in "${homes[@]}"; do rm -rf "$h"; done
}
trap cleanup EXIT
declare -A home
for spec in "$@"; do
  name=${spec%%=*}
  bin=${spec#*=}
  h=$(mktemp -d /tmp/tg-pingpong-"$name".XXXXXX)
  homes+=("$h")
  home[$name]=$h
  TESTGROUND_HOME=$h "$bin" plan import --from "$here/plans/network" >/dev/null
  # One unloaded run builds the plan (exec:go), so that builds do not count below.
  TESTGROUND_HOME=$h "$bin" run single -p network -t ping-pong -b exec:go -r local:netns -i 2 --wait >/dev/null 2>&1 || true
done
start_load
echo "load: $load_n busy loops; $(date -u '+%Y-%m-%d %H:%M UTC')"
declare -A pass
for i in $(seq 1 "$n"); do
  for spec in "$@"; do
    name=${spec%%=*}
    bin=${spec#*=}
    build_env "$name"
    out=$(env "${env[@]}" TESTGROUND_HOME="${home[$name]}" "$bin" run single -p network -t ping-pong -b exec:go -r local:netns -i 2 --wait 2>&1) || true
    rtts=$(echo "$out" | grep -o 'ping RTT was [0-9.]*[mµ]*s' | awk '{print $4}' | paste -sd' ' -) || true
    fails=$(echo "$out" | grep -o 'expected an RTT between [^"]*' | head -2 | paste -sd';' -) || true
    if echo "$out" | grep -q 'outcome = success'; then
      ok=pass
      pass[$name]=$(( ${pass[$name]:-0} + 1 ))
    else
      ok=FAIL
    fi
    echo "$i $name $ok rtt: ${rtts:-none} ${fails}"
  done
done
for spec in "$@"; do
  name=${spec%%=*}
  echo "$name: ${pass[$name]:-0} of $n passed"
done
