#!/usr/bin/env bash
# Fetches uPlot from the npm registry into uplot/ (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
version="${1:-1.6.32}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$version" >/dev/null && tar xzf uplot-*.tgz)
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" uplot/
sha256sum uplot/uPlot.iife.min.js uplot/uPlot.min.css
