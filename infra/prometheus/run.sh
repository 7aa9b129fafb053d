#!/usr/bin/env bash
# Prometheus for local and Slurm runs, in the foreground: scrapes every node that wrote a target file into
# outputs/prometheus/targets/ and evaluates the alert rules. Open http://127.0.0.1:${PORT:-9090}/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${PROMETHEUS_DATA:-$here/../../outputs/prometheus/data}"
mkdir -p "$data" "$here/../../outputs/prometheus/targets"
exec prometheus --config.file="$here/prometheus.yml" --storage.tsdb.path="$data" \
  --web.listen-address="127.0.0.1:${PORT:-9090}" --web.enable-lifecycle
