#!/usr/bin/env bash
# local:docker next to local:netns on the same sdk-go plan (plans/outcomes, case `ok`: every
# instance waits for the network, claims its sequence numbers, succeeds), alternating runs:
# wall time of a run whose build is cached, the engine's peak RSS, dockerd's RSS after the run.
# Usage (as root, with a Docker engine): bench/docker-vs-netns.sh TESTGROUND_BIN "10 100 500" ROUNDS
set -euo pipefail
bin=$1; counts=$2; rounds=${3:-2}
home=$(mktemp -d /tmp/tg-bench-docker.XXXXXX)
trap 'rm -rf "$home"' EXIT
export TESTGROUND_HOME=$home
"$bin" plan import --from "$(dirname "$0")/../plans/outcomes" >/dev/null
# Builds once per builder (docker:go for local:docker, exec:go for local:netns).
"$bin" run single -p outcomes -t ok -b docker:go -r local:docker -i 1 --wait >/dev/null
"$bin" run single -p outcomes -t ok -b exec:go -r local:netns -i 1 --wait >/dev/null
dockerd_rss() { ps -C dockerd -o rss= | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}'; }
echo "| runner | instances | round | wall (s) | engine peak RSS (MiB) | dockerd RSS after (MiB) | outcome |"
echo "|---|---|---|---|---|---|---|"
for n in $counts; do
  for r in $(seq 1 "$rounds"); do
    for pair in "local:docker docker:go" "local:netns exec:go"; do
      set -- $pair
      log=$(mktemp)
      s=$(date +%s.%N)
      /usr/bin/time -f '%M' -o "$log.rss" "$bin" run single -p outcomes -t ok -b "$2" -r "$1" -i "$n" \
        --run-cfg run_timeout=600s --wait >"$log" 2>&1 || true
      e=$(date +%s.%N)
      outcome=$(grep -o 'outcome = [a-z]* ([^)]*)' "$log" | head -1)
      printf '| %s | %d | %d | %.2f | %.0f | %s | %s |\n' "$1" "$n" "$r" "$(echo "$e - $s" | bc)" \
        "$(echo "$(tail -1 "$log.rss") / 1024" | bc -l)" "$(dockerd_rss)" "$outcome"
      rm -f "$log" "$log.rss"
    done
  done
done
