#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this host, for tests and CI (see README.md here and
# /work/shared/k8s.md for why each setting is what it is).
#
#   cluster.sh up     [state-dir]   start etcd, kube-apiserver, kube-controller-manager,
#                                   kube-scheduler, a second containerd, the kubelet and a
#                                   registry; wait until the node is Ready
#   cluster.sh down   [state-dir]   stop all of it, clean the host, remove the state dir
#   cluster.sh status [state-dir]   which components run, is the node Ready
#
# State dir: $1, else $TG_K8S_DIR, else /tmp/tg-k8s. Binaries and the registry's storage live in
# the cache dir (${TG_CACHE_DIR:-/var/cache/testground}/k8s), which `down` keeps.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=${K8S_VERSION:-v1.37.2}
CACHE=${TG_CACHE_DIR:-/var/cache/testground}
BIN=${TG_K8S_BIN_DIR:-$CACHE/k8s/$K8S_VERSION/bin}
REGISTRY_DIR=${TG_K8S_REGISTRY_DIR:-$CACHE/k8s/registry}
TOKEN=${TG_K8S_TOKEN:-testground-admin-token}
API_PORT=${TG_K8S_API_PORT:-6443}
ETCD_PORT=${TG_K8S_ETCD_PORT:-23790}
ETCD_PEER_PORT=${TG_K8S_ETCD_PEER_PORT:-23800}
REGISTRY_ADDR=127.0.0.1:${TG_K8S_REGISTRY_PORT:-5000}
BRIDGE=tgk8s0
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/16
SERVICE_CIDR=10.245.0.0/16
NODE_NAME=${TG_K8S_NODE_NAME:-tgk8s-node}
PAUSE_IMAGE=testground/pause:1
# Images imported from the Docker engine into the kubelet's containerd on `up`: the pause image
# (the pods' sandbox) and $TG_K8S_IMAGES.
IMAGES=("$PAUSE_IMAGE")
for _i in ${TG_K8S_IMAGES:-busybox:1.35.0-glibc}; do [ "$_i" = "$PAUSE_IMAGE" ] || IMAGES+=("$_i"); done
SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv4.conf.default.forwarding
  net.ipv6.conf.all.forwarding net.ipv6.conf.default.forwarding
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  net.bridge.bridge-nf-call-arptables vm.overcommit_memory vm.panic_on_oom kernel.panic
  kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
FWD_RULE=(FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment tgk8s -j ACCEPT)

cmd=${1:-}
[ $# -gt 0 ] && shift
S=${1:-${TG_K8S_DIR:-/tmp/tg-k8s}}
case $S in /*) ;; *) S=$PWD/$S ;; esac
S=${S%/}
SOCK=$S/containerd/containerd.sock
API=https://127.0.0.1:$API_PORT

log() { printf 'tg-k8s: %s\n' "$*" >&2; }
STARTED=
die() {
  log "ERROR: $*"
  [ -z "$STARTED" ] || log "components may still run: see $S/logs, clean up with: $0 down $S"
  exit 1
}
now() { echo "${EPOCHREALTIME/,/.}"; }
T0=$(now); TL=$T0
mark() { # mark <what>: prints the time since the previous mark and since the start
  local t; t=$(now)
  awk -v a="$TL" -v b="$t" -v z="$T0" -v w="$*" 'BEGIN{printf "tg-k8s: %-44s %6.2f s  (total %6.2f s)\n", w, b-a, b-z}' >&2
  TL=$t
}

pidof_c() { cat "$S/pids/$1.pid" 2>/dev/null || true; }
# A component runs when its pid file names a live process whose command line mentions the
# state dir (every daemon here gets a path under it), so a recycled pid is never mistaken.
alive() {
  local p; p=$(pidof_c "$1")
  [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -qF -- "$S/"
}
start() { # start <name> <cmd...>
  local name=$1; shift
  if alive "$name"; then log "$name already running (pid $(pidof_c "$name"))"; return 0; fi
  # setsid: the daemons outlive the calling shell and its process group (CI step, Ctrl-C).
  setsid "$@" >> "$S/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$S/pids/$name.pid"
}
stop() { # stop <seconds before SIGKILL> <name>...: TERM all, wait, KILL the stragglers
  local wait_s=$1 n p i left; shift
  local -a pids=()
  for n in "$@"; do
    if alive "$n"; then p=$(pidof_c "$n"); pids+=("$p"); kill -TERM "$p" 2> /dev/null || true; fi
    rm -f "$S/pids/$n.pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for ((i = 0; i < wait_s * 10; i++)); do
    left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2> /dev/null && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2> /dev/null; then
      log "pid $p ($(tr '\0' ' ' < "/proc/$p/cmdline" 2> /dev/null | cut -c1-60)) did not stop on TERM: KILL"
      kill -KILL "$p" 2> /dev/null || true
    fi
  done
  for ((i = 0; i < 50; i++)); do
    left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2> /dev/null && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.1
  done
}
fail_log() { # fail_log <component> <message>
  log "last lines of $S/logs/$1.log:"; tail -n 25 "$S/logs/$1.log" >&2 2>/dev/null || true
  # What the wait was checking, when the component's own log does not say it (e.g. a taint
  # another component should have removed).
  if [ -n "${WAIT_DIAG:-}" ]; then $WAIT_DIAG >&2 2>&1 || true; fi
  die "$2"
}
wait_for() { # wait_for <seconds> <component whose log to show> <what> <cmd...>
  local secs=$1 comp=$2 what=$3 deadline; shift 3
  deadline=$(( $(date +%s) + secs ))
  until "$@" > /dev/null 2>&1; do
    if [ -n "$comp" ] && [ -f "$S/pids/$comp.pid" ] && ! alive "$comp"; then fail_log "$comp" "$comp exited while waiting for $what"; fi
    [ "$(date +%s)" -lt "$deadline" ] || fail_log "$comp" "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}
api() { # api <path> [curl args...]
  local p=$1; shift
  curl -sS --fail --max-time 10 --cacert "$S/pki/ca.crt" -H "Authorization: Bearer $TOKEN" "$@" "$API$p"
}
port_busy() { ss -Htln "sport = :$1" | grep -q .; }
# Ready, and without the not-ready/unreachable taints the node lifecycle controller removes a
# moment later (pods created before that would wait for the scheduler's next try).
node_ready() {
  api "/api/v1/nodes/$NODE_NAME" | jq -e '([.status.conditions[]? | select(.type == "Ready" and .status == "True")] | length == 1)
    and ([.spec.taints[]? | select(.effect == "NoSchedule" or .effect == "NoExecute")] | length == 0)' > /dev/null
}
node_diag() {
  log "node $NODE_NAME conditions and taints:"
  api "/api/v1/nodes/$NODE_NAME" | jq -c '[.status.conditions[]? | {type, status, reason}], .spec.taints'
  log "last lines of $S/logs/kube-controller-manager.log (it removes the not-ready taint):"
  tail -n 25 "$S/logs/kube-controller-manager.log"
}
sa_ready() {
  api /api/v1/namespaces/default/serviceaccounts/default > /dev/null \
    && api /api/v1/namespaces/default/configmaps/kube-root-ca.crt > /dev/null
}

write_pki() {
  local d=$S/pki
  [ -s "$d/apiserver.crt" ] && [ -s "$d/sa.pub" ] && return 0
  mkdir -p "$d"
  (
    cd "$d"
    # ECDSA P-256 keys: generated in milliseconds (RSA 2048 took ~1 s here), accepted by Go,
    # rustls and OpenSSL clients and by the apiserver as service-account signing key (ES256).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj /CN=tgk8s-ca -addext basicConstraints=critical,CA:TRUE \
      -addext keyUsage=critical,keyCertSign,cRLSign
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj /CN=kube-apiserver
    printf '%s\n' \
      "subjectAltName=IP:127.0.0.1,IP:10.245.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
      'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
      'extendedKeyUsage=serverAuth' > apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
      -days 3650 -extfile apiserver.ext -out apiserver.crt
    openssl ecparam -name prime256v1 -genkey -noout -out sa.key
    openssl ec -in sa.key -pubout -out sa.pub
    printf '%s,admin,admin,"system:masters"\n' "$TOKEN" > tokens.csv
    chmod 600 ./*.key tokens.csv
  ) 2> "$S/logs/openssl.log" || true
  if ! { openssl verify -CAfile "$d/ca.crt" "$d/apiserver.crt" && [ -s "$d/sa.pub" ] && [ -s "$d/tokens.csv" ]; } > /dev/null 2>&1; then
    cat "$S/logs/openssl.log" >&2; rm -f "$d/apiserver.crt" "$d/sa.pub"
    die "generating the certificates in $d failed"
  fi
}

write_kubeconfig() { # write_kubeconfig <file>
  cat > "$1" << EOF
apiVersion: v1
kind: Config
clusters:
- name: tgk8s
  cluster:
    server: $API
    certificate-authority-data: $(base64 -w0 < "$S/pki/ca.crt")
users:
- name: admin
  user:
    token: $TOKEN
contexts:
- name: tgk8s
  context:
    cluster: tgk8s
    user: admin
    namespace: default
current-context: tgk8s
EOF
  chmod 600 "$1"
}

write_configs() {
  mkdir -p "$S/etcd" "$S/containerd/certs.d" "$S/cni/net.d" "$S/cni/ipam" \
    "$S/kubelet/root" "$S/kubelet/pki" "$S/kubelet/pod-logs" "$S/registry" "$REGISTRY_DIR"
  write_kubeconfig "$S/kubeconfig"
  cat > "$S/env" << EOF
export KUBECONFIG=$S/kubeconfig
export TG_K8S_API=$API
export TG_K8S_TOKEN=$TOKEN
export TG_K8S_CA=$S/pki/ca.crt
export TG_K8S_REGISTRY=$REGISTRY_ADDR
export TG_K8S_CONTAINERD_SOCK=$SOCK
export TG_K8S_NODE_IP=$NODE_IP
EOF

  cat > "$S/containerd/config.toml" << EOF
version = 2
root = "$S/containerd/root"
state = "$S/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$S/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "docker.io/$PAUSE_IMAGE"
    restrict_oom_score_adj = true
    disable_apparmor = true
    enable_selinux = false
    # The pods' network namespaces go under the state dir, not /run/netns.
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "$S/containerd/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$S/cni/net.d"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "$S/containerd/certs.d"
EOF
  # The loopback registry over plain HTTP, under both names an image may be tagged with.
  local h
  for h in "$REGISTRY_ADDR" "localhost:${REGISTRY_ADDR##*:}"; do
    mkdir -p "$S/containerd/certs.d/$h"
    cat > "$S/containerd/certs.d/$h/hosts.toml" << EOF
server = "http://$REGISTRY_ADDR"
[host."http://$REGISTRY_ADDR"]
  capabilities = ["pull", "resolve"]
EOF
  done

  cat > "$S/cni/net.d/10-tgk8s.conflist" << EOF
{
  "cniVersion": "1.0.0",
  "name": "tgk8s",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "dataDir": "$S/cni/ipam",
        "ranges": [[{ "subnet": "$POD_CIDR", "gateway": "$NODE_IP" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "loopback" }
  ]
}
EOF

  write_kubeconfig "$S/kubelet/kubeconfig"
  cat > "$S/kubelet/config.yaml" << EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
containerRuntimeEndpoint: unix://$SOCK
imageServiceEndpoint: unix://$SOCK
podLogsDir: $S/kubelet/pod-logs
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
maxOpenFiles: $(n=$(ulimit -Hn); case $n in *[!0-9]*) echo 1000000 ;; *) echo "$n" ;; esac)
makeIPTablesUtilChains: false
protectKernelDefaults: false
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 1100
serializeImagePulls: false
# Without it (KubeletEnsureSecretPulledImages, on since 1.35), once the kubelet pulls an image
# whose ID equals that of an imported one (e.g. busybox pushed to the registry and pulled back),
# the imported name counts as "not verified" and pods using it with pullPolicy Never fail with
# ErrImageNeverPull.
imagePullCredentialsVerificationPolicy: NeverVerify
registryPullQPS: 0
kubeAPIQPS: 100
kubeAPIBurst: 200
EOF

  cat > "$S/registry/config.yml" << EOF
version: 0.1
log:
  level: warn
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: $REGISTRY_DIR
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $REGISTRY_ADDR
  secret: $(openssl rand -hex 16)
EOF
}

# What `up` may change on the host, recorded once (by the first `up`) so `down` can undo it.
record_host() {
  local h=$S/host k v c d
  [ -f "$h/recorded" ] && return 0
  mkdir -p "$h"
  : > "$h/sysctl.before"
  # Setting ip_forward also rewrites conf.*.forwarding and conf.all.accept_redirects: list the
  # global switch first so that restoring it comes before the per-interface values.
  for k in "${SYSCTLS[@]}" $(sysctl -aN 2> /dev/null | grep -E '^net\.ipv4\.conf\.[^.]+\.(forwarding|accept_redirects)$'); do
    v=$(sysctl -n "$k" 2> /dev/null) && printf '%s=%s\n' "$k" "$v" >> "$h/sysctl.before"
  done
  ip netns list 2> /dev/null | awk '{print $1}' > "$h/netns.before"
  # Paths the kubelet, containerd and the CNI create whatever their config says:
  # /var/lib/kubelet/device-plugins (hard-coded), /var/log/containers (hard-coded),
  # /var/lib/cni/results (libcni's cache), /run/netns.
  : > "$h/paths.created"
  for d in /var/lib/kubelet /var/lib/cni /var/log/containers /run/netns; do
    [ -e "$d" ] || echo "$d" >> "$h/paths.created"
  done
  : > "$h/cgroups.created"
  for c in /sys/fs/cgroup/*/; do
    [ -e "${c}kubepods" ] || echo "${c}kubepods" >> "$h/cgroups.created"
  done
  touch "$h/recorded"
}

check_ports() {
  local name port name_port
  for name_port in etcd:$ETCD_PORT etcd:$ETCD_PEER_PORT kube-apiserver:$API_PORT \
    kube-controller-manager:10257 kube-scheduler:10259 kubelet:10250 kubelet:10248 \
    registry:${REGISTRY_ADDR##*:}; do
    name=${name_port%%:*} port=${name_port##*:}
    if ! alive "$name" && port_busy "$port"; then
      die "port $port (for $name) is already in use: $(ss -Htlnp "sport = :$port" | head -1)"
    fi
  done
}

import_images() {
  # docker save | ctr import: the Docker engine's images become the node's images (pods use
  # imagePullPolicy: Never or IfNotPresent).
  docker save "${IMAGES[@]}" | ctr --address "$SOCK" -n k8s.io images import - > "$S/logs/import.log" 2>&1
}

setup_bridge() {
  if ! ip link show "$BRIDGE" > /dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr show dev "$BRIDGE" | grep -qF " $NODE_IP/16 " || ip addr add "$NODE_IP/16" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # With br_netfilter, bridged pod-to-pod traffic crosses the iptables FORWARD chain; dockerd
  # (when run with its iptables management) sets its policy to DROP.
  if iptables -S FORWARD 2> /dev/null | grep -qx -- '-P FORWARD DROP' \
    && ! iptables -C "${FWD_RULE[@]}" 2> /dev/null; then
    iptables -I "${FWD_RULE[@]:0:1}" 1 "${FWD_RULE[@]:1}"
    touch "$S/host/iptables-forward-rule"
    log "iptables FORWARD policy is DROP: added an ACCEPT rule for $BRIDGE (removed by down)"
  fi
}

cmd_up() {
  [ ${#SOCK} -lt 100 ] || die "state dir path too long for a unix socket: $S"
  command -v docker > /dev/null || die "docker CLI not found"
  local b
  for b in etcd containerd ctr runc docker-registry openssl curl jq ip iptables ss; do
    command -v "$b" > /dev/null || die "$b not found"
  done
  [ -x /usr/lib/cni/bridge ] || die "CNI plugins not found in /usr/lib/cni (containernetworking-plugins)"
  # Builds them once into the cache (a cold build takes 10-25 min), else returns at once.
  "$here/build-binaries.sh" "${BIN%/bin}" >&2
  for b in kube-apiserver kubelet kube-scheduler kube-controller-manager; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing after build-binaries.sh"
  done
  mark "binaries ($BIN)"
  if ! docker version --format '{{.Server.Version}}' > /dev/null 2>&1; then
    die "dockerd is not reachable (docker version: $(docker version --format '{{.Server.Version}}' 2>&1 | tail -1)); the node's images are imported from it. Start it, e.g.: dockerd --iptables=false --ip6tables=false --ip-forward=false --bridge=none &"
  fi
  for b in "${IMAGES[@]}"; do
    docker image inspect "$b" > /dev/null 2>&1 || die "image $b is not in the Docker engine"
  done
  check_ports
  b=$(ip -o -4 addr show to "$POD_CIDR" | awk -v b="$BRIDGE" '$2 != b {print $2, $4}')
  [ -z "$b" ] || die "the pod CIDR $POD_CIDR is already used on this host: $b"
  mkdir -p "$S/logs" "$S/pids"
  record_host
  write_pki
  write_configs
  mark "checks, certificates, configs"
  STARTED=1

  start etcd etcd --name tgk8s --data-dir "$S/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "tgk8s=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state new \
    --initial-cluster-token tgk8s --logger zap --log-outputs stderr --snapshot-count 10000 \
    --quota-backend-bytes 4294967296
  start registry docker-registry serve "$S/registry/config.yml"
  start containerd containerd --config "$S/containerd/config.toml"
  setup_bridge
  wait_for 30 etcd "etcd health" curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  mark "etcd ready"

  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --tls-cert-file="$S/pki/apiserver.crt" --tls-private-key-file="$S/pki/apiserver.key" \
    --client-ca-file="$S/pki/ca.crt" \
    --token-auth-file="$S/pki/tokens.csv" --authorization-mode=AlwaysAllow \
    --service-account-key-file="$S/pki/sa.pub" --service-account-signing-key-file="$S/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" --endpoint-reconciler-type=none \
    --kubelet-preferred-address-types=InternalIP --allow-privileged=true --profiling=false
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$S/kubeconfig" --authentication-kubeconfig="$S/kubeconfig" \
    --authorization-kubeconfig="$S/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10257 --leader-elect=false \
    --controllers='*,-nodeipam' --service-account-private-key-file="$S/pki/sa.key" \
    --root-ca-file="$S/pki/ca.crt" --use-service-account-credentials=false --profiling=false
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$S/kubeconfig" --authentication-kubeconfig="$S/kubeconfig" \
    --authorization-kubeconfig="$S/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --profiling=false
  wait_for 30 containerd "containerd" ctr --address "$SOCK" version
  wait_for 10 registry "registry" curl -sf "http://$REGISTRY_ADDR/v2/"
  mark "containerd, registry ready; control plane started"

  import_images &
  local import_pid=$!
  start kubelet "$BIN/kubelet" --config="$S/kubelet/config.yaml" \
    --kubeconfig="$S/kubelet/kubeconfig" --root-dir="$S/kubelet/root" \
    --cert-dir="$S/kubelet/pki" --node-ip="$NODE_IP" --hostname-override="$NODE_NAME"
  wait $import_pid || { cat "$S/logs/import.log" >&2; die "importing ${IMAGES[*]} into the node's containerd failed"; }
  mark "images imported (${IMAGES[*]})"
  wait_for 90 kube-apiserver "kube-apiserver /readyz" api /readyz
  mark "kube-apiserver ready"
  WAIT_DIAG=node_diag wait_for 90 kubelet "node $NODE_NAME Ready and untainted" node_ready
  mark "node Ready, untainted"
  wait_for 60 kube-controller-manager "ServiceAccount default/default and ConfigMap kube-root-ca.crt" sa_ready
  mark "default ServiceAccount exists"
  for b in etcd registry containerd kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    alive "$b" || fail_log "$b" "$b is not running"
  done
  log "up: kubeconfig $S/kubeconfig, API $API, token $TOKEN, registry $REGISTRY_ADDR, node $NODE_NAME $NODE_IP ($BRIDGE), containerd $SOCK"
  mark "up total"
}

# Pids of processes in the pods' cgroups (the containers; not the shims, which stay in ours).
pod_pids() {
  local c
  for c in /sys/fs/cgroup/*/kubepods; do
    if [ -d "$c" ]; then find "$c" -name cgroup.procs -exec cat {} + 2> /dev/null || true; fi
  done | sort -un
}
# Pids of the containerd-shim processes serving our containerd (matched on its socket).
shim_pids() {
  local p c
  for p in /proc/[0-9]*; do
    c=$(tr '\0' ' ' 2> /dev/null < "$p/cmdline") || continue
    case $c in *containerd-shim*"-address $SOCK "*) echo "${p#/proc/}" ;; esac
  done
}
mounts_under() { awk -v s="$S/" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo; }

cmd_down() {
  if [ ! -d "$S" ]; then log "no state dir $S: nothing to do"; return 0; fi
  local n p i m k v cur d
  # Everything at once (each takes up to ~2 s to exit on TERM); the pods' processes are killed
  # below, once the kubelet and containerd can no longer start new ones.
  stop 10 kubelet kube-scheduler kube-controller-manager containerd kube-apiserver etcd registry
  mark "daemons stopped"
  # The pods' processes and the shims outlive containerd: kill them by pid.
  for ((i = 0; i < 50; i++)); do
    p=$(pod_pids); [ -z "$p" ] && break
    # shellcheck disable=SC2086
    kill -KILL $p 2> /dev/null || true
    sleep 0.1
  done
  p=$(shim_pids)
  # shellcheck disable=SC2086
  [ -z "$p" ] || kill -KILL $p 2> /dev/null || true
  for ((i = 0; i < 50; i++)); do [ -z "$(shim_pids)" ] && break; sleep 0.1; done
  # A killed shim leaves its socket in /run/containerd/s; the bundle's `address` file names it.
  for m in "$S"/containerd/state/io.containerd.runtime.v2.task/*/*/address; do
    [ -f "$m" ] || continue
    k=$(cat "$m"); k=${k#unix://}
    case $k in /run/containerd/s/*) rm -f "$k" ;; esac
  done
  mark "shims, containers killed"
  # Mounts under the state dir (rootfs overlays, shm, volumes, the kubelet's rshared bind),
  # deepest first; repeat because a bind may hide others.
  for ((i = 0; i < 5; i++)); do
    m=$(mounts_under | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-)
    [ -z "$m" ] && break
    while IFS= read -r k; do umount "$k" 2> /dev/null || umount -l "$k" 2> /dev/null || true; done <<< "$m"
  done
  # Network namespaces the CNI made (containerd names them cni-*), not those there before `up`.
  for n in $(ip netns list 2> /dev/null | awk '$1 ~ /^cni-/ {print $1}'); do
    grep -qx -- "$n" "$S/host/netns.before" 2> /dev/null && continue
    umount "/run/netns/$n" 2> /dev/null || umount -l "/run/netns/$n" 2> /dev/null || true
    rm -f "/run/netns/$n"
  done
  if ip link show "$BRIDGE" > /dev/null 2>&1; then
    for n in $(ip -o link show master "$BRIDGE" | awk -F': ' '{print $2}' | cut -d@ -f1); do
      ip link del "$n" 2> /dev/null || true
    done
    ip link del "$BRIDGE"
  fi
  if [ -f "$S/host/iptables-forward-rule" ]; then
    iptables -D "${FWD_RULE[@]}" 2> /dev/null || true
  fi
  mark "mounts, netns, bridge cleaned"
  # Cgroups the kubelet made (kubepods and below), deepest first.
  if [ -f "$S/host/cgroups.created" ]; then
    while IFS= read -r m; do
      if [ -d "$m" ]; then find "$m" -depth -type d -exec rmdir {} + 2> /dev/null || true; fi
    done < "$S/host/cgroups.created"
  fi
  # What the kubelet and libcni left outside the state dir: remove the paths that did not exist
  # before `up`; in those that did, only our entries.
  if [ -d /var/log/containers ]; then
    find /var/log/containers -maxdepth 1 -lname "$S/*" -delete 2> /dev/null || true
  fi
  if [ -d /var/lib/cni/results ]; then # <network>-<sandbox id>-<interface>
    for m in "$S"/containerd/root/io.containerd.grpc.v1.cri/sandboxes/*; do
      if [ -d "$m" ]; then rm -f /var/lib/cni/results/*-"${m##*/}"-*; fi
    done
  fi
  if [ -f "$S/host/paths.created" ]; then
    while IFS= read -r d; do
      [ -e "$d" ] || continue
      case $d in
        /run/netns) rmdir "$d" 2> /dev/null || log "kept $d: not empty" ;;
        *) rm -rf --one-file-system "$d" ;;
      esac
    done < "$S/host/paths.created"
  fi
  # Sysctls: the kubelet sets vm.overcommit_memory, kernel.panic, kernel.panic_on_oops; the CNI
  # bridge plugin (isGateway) sets net.ipv4.ip_forward. Put back what `up` found.
  if [ -f "$S/host/sysctl.before" ]; then
    while IFS='=' read -r k v; do
      cur=$(sysctl -n "$k" 2> /dev/null) || continue
      if [ "$cur" != "$v" ]; then
        sysctl -qw "$k=$v" && log "restored $k=$v (was $cur)"
      fi
    done < "$S/host/sysctl.before"
  fi
  m=$(mounts_under)
  [ -z "$m" ] || die "still mounted under $S, not removing it: $m"
  rm -rf --one-file-system "$S"
  mark "down total"
}

cmd_status() {
  local n rc=0 st
  if [ ! -d "$S" ]; then echo "not up (no state dir $S)"; return 3; fi
  for n in etcd registry containerd kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    if alive "$n"; then printf '%-24s running (pid %s)\n' "$n" "$(pidof_c "$n")"
    else printf '%-24s NOT running\n' "$n"; rc=1; fi
  done
  if api /readyz > /dev/null 2>&1; then echo "kube-apiserver $API ready"; else echo "kube-apiserver $API NOT ready"; rc=1; fi
  st=$(api "/api/v1/nodes/$NODE_NAME" 2> /dev/null | jq -r '.status.conditions[]? | select(.type=="Ready") | .status' 2> /dev/null || true)
  if [ "$st" = True ]; then echo "node $NODE_NAME ($NODE_IP) Ready"; else echo "node $NODE_NAME NOT Ready (${st:-absent})"; rc=1; fi
  echo "kubeconfig $S/kubeconfig, registry $REGISTRY_ADDR, containerd $SOCK"
  return $rc
}

case $cmd in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status [state-dir]   (state dir default: \$TG_K8S_DIR or /tmp/tg-k8s)" >&2; exit 2 ;;
esac
