#!/usr/bin/env bash
# Prometheus and promtool from Debian (2.42): the server the monitoring tests start on 127.0.0.1, and the
# checker of the scrape configs and alert rules. Needs root (CI); does nothing when both are installed.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
