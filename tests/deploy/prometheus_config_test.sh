#!/usr/bin/env bash
# deploy/prometheus.yml is a valid Prometheus configuration (promtool, from
# Debian's prometheus package) that scrapes retraced's metrics port; so is
# deploy/prometheus-shards.yml (docker-compose.shards.yml's).
set -euo pipefail
src=${RETRACE_SOURCE_DIR:?RETRACE_SOURCE_DIR must name the repository}
if ! command -v promtool >/dev/null; then
  echo "SKIPPED: promtool is not installed (Debian: prometheus; scripts/setup.sh lists it)"
  exit 77
fi
promtool check config "$src/deploy/prometheus.yml"
promtool check config "$src/deploy/prometheus-shards.yml"
echo "PASS"
