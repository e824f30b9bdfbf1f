#!/usr/bin/env bash
# RTT accuracy under local:docker next to local:netns: plans/netns-examples `latency` (both
# instances add latency_ms of egress latency; instance 2 times 20 one-byte TCP round trips to
# instance 1), alternating runners, for each configured latency.
# Usage (as root, with a Docker engine): bench/docker-rtt.sh TESTGROUND_BIN "0 10 100" ROUNDS
set -euo pipefail
bin=$1; latencies=$2; rounds=${3:-3}
home=$(mktemp -d /tmp/tg-bench-rtt.XXXXXX)
trap 'rm -rf "$home"' EXIT
export TESTGROUND_HOME=$home
"$bin" plan import --from "$(dirname "$0")/../plans/netns-examples" >/dev/null
echo "| runner | latency_ms | round | floor: 2 x latency (ms) | min RTT | median RTT | outcome |"
echo "|---|---|---|---|---|---|---|"
for l in $latencies; do
  for r in $(seq 1 "$rounds"); do
    for pair in "local:docker docker:rust" "local:netns exec:rust"; do
      set -- $pair
      out=$("$bin" run single -p netns-examples -t latency -b "$2" -r "$1" -i 2 \
        --tp latency_ms="$l" --wait 2>&1 || true)
      line=$(echo "$out" | grep -o 'rtt min=[^ ]* median=[^ ]*' | head -1)
      min=$(echo "$line" | sed -E 's/rtt min=([^ ]*) .*/\1/')
      med=$(echo "$line" | sed -E 's/.*median=([^ ]*)/\1/')
      outcome=$(echo "$out" | grep -o 'outcome = [a-z]* ([^)]*)' | head -1)
      printf '| %s | %s | %d | %d | %s | %s | %s |\n' "$1" "$l" "$r" "$((2 * l))" "$min" "$med" "$outcome"
    done
  done
done
