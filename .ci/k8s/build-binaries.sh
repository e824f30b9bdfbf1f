#!/usr/bin/env bash
# Builds the Kubernetes binaries the single-node test cluster needs (none of Debian, PyPI or npm
# ships them) from the Go module k8s.io/kubernetes, once, into a cache directory outside the
# clone keyed by version. Reused when present. Usage: build-binaries.sh [cache-dir]
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-v1.37.2}
cache=${1:-${TG_CACHE_DIR:-/var/cache/testground}/k8s/$K8S_VERSION}
bins=(kube-apiserver kubelet kube-scheduler kube-controller-manager)
have_all() { for b in "${bins[@]}"; do [ -x "$cache/bin/$b" ] || return 1; done; }
if have_all; then echo "k8s: binaries $K8S_VERSION cached in $cache/bin"; exit 0; fi

mkdir -p "$cache/bin"
exec 9>"$cache/.lock"
flock 9
if have_all; then exit 0; fi
work=$(mktemp -d /tmp/tg-k8s-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
# The module's go.mod replaces its staging modules (k8s.io/api, k8s.io/client-go, ...) with
# directories its module zip does not contain: a wrapper module requires it and points each
# staging module at its published v0.x.y twin instead.
minor=${K8S_VERSION#v1.}
staging_version="v0.$minor"
cat > go.mod <<MOD
module tg-k8s-binaries
go 1.26
require k8s.io/kubernetes $K8S_VERSION
MOD
go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > /dev/null
modfile=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod
{
  echo "replace ("
  sed -n '/^replace (/,/^)/p' "$modfile" | grep -E '=> \./staging/' \
    | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} >> go.mod
printf 'package tools\n\nimport (\n' > tools.go
for b in "${bins[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$b" >> tools.go; done
printf ')\n' >> tools.go
sed -i '1i //go:build tools' tools.go
echo "k8s: resolving modules for $K8S_VERSION"
GOFLAGS=-mod=mod go mod tidy -e > tidy.log 2>&1 || { cat tidy.log; exit 1; }
major=1
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
for b in "${bins[@]}"; do
  [ -x "$cache/bin/$b" ] && continue
  echo "k8s: building $b $K8S_VERSION (cold, on 2 cores: kube-apiserver 6 to 20 min, the others 3 min together)"
  t0=$(date +%s)
  CGO_ENABLED=0 go build -tags tools -trimpath -ldflags "$ldflags" -o "$cache/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$cache/bin/$b.tmp" "$cache/bin/$b"
  echo "k8s: built $b in $(( $(date +%s) - t0 )) s"
done
