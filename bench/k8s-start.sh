#!/usr/bin/env bash
# Pods per second on the single-node cluster: runs the sdk-go `outcomes:ok` plan (each
# instance publishes its success and exits) with N instances under cluster:k8s and prints the
# runner's start progress: pods created, pods started (plan container running) since the first
# create, and where the time went (scheduling, sandbox, data network, container start).
# Usage: bench/k8s-start.sh [N...]   (default 20 100 300). Needs the cluster (.ci/k8s/cluster.sh up),
# a Docker engine and root; builds target/release/testground.
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("$@"); [ ${#counts[@]} -gt 0 ] || counts=(20 100 300)
cargo build --release -q -p testground
tg=$PWD/target/release/testground
home=$(mktemp -d /tmp/tg-bench-k8s.XXXXXX)
trap 'rm -rf "$home"' EXIT
export TESTGROUND_HOME=$home
cat > "$home/.env.toml" <<TOML
[runners."cluster:k8s"]
kubeconfig = "${TG_K8S_KUBECONFIG:-/tmp/tg-k8s/kubeconfig}"
push_registry = "${TG_K8S_REGISTRY:-127.0.0.1:5000}"
testplan_pod_cpu = "1m"
testplan_pod_memory = "32Mi"
TOML
"$tg" plan import --from plans/outcomes > /dev/null
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(date -u +%F)"
for n in "${counts[@]}"; do
  start=$(date +%s.%N)
  out=$("$tg" run single --plan outcomes --testcase ok --builder docker:go --runner cluster:k8s \
    -i "$n" --wait 2>&1 || true)
  end=$(date +%s.%N)
  echo "== $n instances: $(echo "$out" | grep -o 'outcome = [a-z]* ([^)]*)' | head -1), whole run $(echo "$end - $start" | bc) s"
  echo "$out" > "${TG_BENCH_LOG_DIR:-/tmp}/k8s-start-$n.log"
  echo "$out" | grep -E "k8s: ($n pods created|$n/$n pods started|pod start)|pushed" | sed 's/^.*INFO\t/  /'
done
