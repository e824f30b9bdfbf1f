#!/usr/bin/env bash
# Proves a cluster started by cluster.sh works, with curl and the REST API only:
#  1. a busybox pod (imagePullPolicy Never) runs to Succeeded and its log says hello;
#  2. pod-to-pod by IP: a client pod pings a server pod and fetches from its httpd;
#  3. an image pushed to the loopback registry (docker push) is pulled by the node (Always);
#  4. a pod reaches a TCP server on the host at the node IP (bridge gateway).
# Usage: smoke-test.sh [state-dir]   (needs dockerd for step 3; deletes its pods at the end)
set -euo pipefail
S=${1:-${TG_K8S_DIR:-/tmp/tg-k8s}}
# shellcheck disable=SC1091
source "$S/env"
NS=default
BUSYBOX=busybox:1.35.0-glibc
PUSHED=$TG_K8S_REGISTRY/tg-test:1
HOST_PORT=18080

log() { printf 'smoke: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
api() { local p=$1; shift; curl -sS --fail --max-time 20 --cacert "$TG_K8S_CA" -H "Authorization: Bearer $TG_K8S_TOKEN" "$@" "$TG_K8S_API$p"; }
t0=$EPOCHREALTIME
elapsed() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f s", b-a}'; }

pod_json() { # pod_json <name> <image> <pullPolicy> <shell command>
  jq -n --arg n "$1" --arg i "$2" --arg p "$3" --arg c "$4" '{
    apiVersion: "v1", kind: "Pod", metadata: {name: $n, labels: {app: "tg-smoke"}},
    spec: {restartPolicy: "Never", terminationGracePeriodSeconds: 0,
      containers: [{name: "main", image: $i, imagePullPolicy: $p, command: ["sh", "-c", $c]}]}}'
}
create_pod() { pod_json "$@" | api "/api/v1/namespaces/$NS/pods" -X POST -H 'Content-Type: application/json' -d @- > /dev/null; }
phase() { api "/api/v1/namespaces/$NS/pods/$1" | jq -r .status.phase; }
wait_phase() { # wait_phase <pod> <phase...>; prints the phase reached
  local pod=$1 ph i; shift
  for ((i = 0; i < 300; i++)); do
    ph=$(phase "$pod")
    for want in "$@"; do [ "$ph" = "$want" ] && { echo "$ph"; return 0; }; done
    [ "$ph" = Failed ] && break
    sleep 0.2
  done
  api "/api/v1/namespaces/$NS/pods/$pod" | jq '.status' >&2
  die "pod $pod is $ph, wanted $*"
}
pod_log() { api "/api/v1/namespaces/$NS/pods/$1/log"; }

cleanup() {
  api "/api/v1/namespaces/$NS/pods?labelSelector=app%3Dtg-smoke" -X DELETE > /dev/null 2>&1 || true
  [ -n "${http_pid:-}" ] && kill "$http_pid" 2> /dev/null || true
  [ -n "${www:-}" ] && rm -rf "$www"
  [ -n "${tagged:-}" ] && docker rmi "$PUSHED" > /dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. hello
create_pod hello "$BUSYBOX" Never 'echo hello; sleep 2'
wait_phase hello Succeeded > /dev/null
[ "$(pod_log hello)" = hello ] || die "hello log: $(pod_log hello)"
log "1. pod hello Succeeded, log 'hello' ($(elapsed))"

# 2. pod to pod
create_pod srv "$BUSYBOX" Never 'mkdir -p /www && echo pong > /www/index.html && exec httpd -f -p 8080 -h /www'
wait_phase srv Running > /dev/null
srv_ip=$(api "/api/v1/namespaces/$NS/pods/srv" | jq -r .status.podIP)
create_pod cli "$BUSYBOX" Never "ping -c 3 -W 2 $srv_ip && wget -qO- http://$srv_ip:8080/"
wait_phase cli Succeeded > /dev/null
out=$(pod_log cli)
grep -q '3 packets transmitted, 3 packets received' <<< "$out" || die "ping: $out"
[ "$(tail -n1 <<< "$out")" = pong ] || die "wget: $out"
log "2. pod cli ($(api "/api/v1/namespaces/$NS/pods/cli" | jq -r .status.podIP)) pinged and fetched from pod srv ($srv_ip): $(grep round-trip <<< "$out") ($(elapsed))"

# 3. the loopback registry
docker tag "$BUSYBOX" "$PUSHED" && tagged=1
docker push -q "$PUSHED" > /dev/null || die "docker push $PUSHED"
create_pod pulled "$PUSHED" Always 'echo pulled'
wait_phase pulled Succeeded > /dev/null
[ "$(pod_log pulled)" = pulled ] || die "pulled log: $(pod_log pulled)"
img=$(api "/api/v1/namespaces/$NS/pods/pulled" | jq -r '.status.containerStatuses[0].imageID')
case $img in "$TG_K8S_REGISTRY/tg-test@sha256:"*) ;; *) die "imageID $img is not from the registry" ;; esac
log "3. pod pulled ran $img (pulled from $TG_K8S_REGISTRY, policy Always) ($(elapsed))"

# 4. a TCP server on the host, at the node IP
www=$(mktemp -d)
echo "from the host" > "$www/index.html"
python3 -m http.server --bind "$TG_K8S_NODE_IP" --directory "$www" "$HOST_PORT" > /dev/null 2>&1 &
http_pid=$!
for ((i = 0; i < 50; i++)); do curl -sf "http://$TG_K8S_NODE_IP:$HOST_PORT/" > /dev/null && break; sleep 0.1; done
create_pod tohost "$BUSYBOX" Never "wget -qO- http://$TG_K8S_NODE_IP:$HOST_PORT/"
wait_phase tohost Succeeded > /dev/null
[ "$(pod_log tohost)" = "from the host" ] || die "tohost log: $(pod_log tohost)"
log "4. pod tohost fetched http://$TG_K8S_NODE_IP:$HOST_PORT/ from the host ($(elapsed))"
log "all passed in $(elapsed)"
