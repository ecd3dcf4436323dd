#!/usr/bin/env bash
# Checks the deployment material in deploy/: the Prometheus configuration and rules are valid,
# the rules' unit tests pass, and the Grafana dashboard JSON parses. Installs promtool (the
# Debian package `prometheus`) and amtool (`prometheus-alertmanager`) first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
  echo "check-deploy: installing promtool (Debian package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! command -v amtool >/dev/null; then
  echo "check-deploy: installing amtool (Debian package prometheus-alertmanager)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null
fi

promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml

amtool check-config deploy/alertmanager/alertmanager.yml

for dashboard in deploy/grafana/dashboards/*.json; do
  python3 -m json.tool "$dashboard" >/dev/null
  echo "  SUCCESS: $dashboard is valid JSON"
done
echo "check-deploy: all deployment checks passed"
