#!/usr/bin/env bash
# The whole test suite against the real broker and the real PostgreSQL: starts (and if needed
# installs) both, then runs `cargo test`. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/postgres.sh
scripts/broker.sh
# The broker-restart fault test runs its own tansu with on-disk storage.
scripts/durable-broker.sh
export COSTWATCH_TEST_DURABLE_TANSU="${COSTWATCH_DURABLE_TANSU_ROOT:-$HOME/.local/tansu-libsql}/bin/tansu"
# The dashboard test runs a real Prometheus, the alerting test a real Alertmanager (Debian's
# packages).
if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
  echo "prometheus, alertmanager: installing the Debian packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager >/dev/null
fi

# Rules and dashboard files: promtool check and promtool's own rule unit tests.
scripts/check-deploy.sh
# Module dependencies point one way (docs/architecture.md, "The tree, by layer").
python3 scripts/check-layers.py

# The OpenAPI fuzz test runs schemathesis (PyPI) from a virtualenv of its own.
if [ ! -x .local/venv/bin/schemathesis ]; then
  echo "schemathesis: installing into .local/venv"
  python3 -m venv .local/venv
  .local/venv/bin/pip install -q "schemathesis==4.32.5"
fi
export COSTWATCH_SCHEMATHESIS="$PWD/.local/venv/bin/schemathesis"

# --- Secure connections (tests/security.rs, issue 14) ---------------------------------------
# The libraries librdkafka is built against (TLS, SASL, OIDC, zstd); stunnel4 terminates TLS in
# front of the tests' own brokers and the HTTP endpoints, openssl makes their certificates,
# curl is the HTTPS client; kafka-python (PyPI, with its codecs) is the independent producer of
# gzip, snappy, lz4 and zstd batches, confluent-kafka's admin client makes SCRAM users.
scripts/build-deps.sh
if ! command -v stunnel4 >/dev/null || ! command -v openssl >/dev/null || ! command -v curl >/dev/null; then
  echo "stunnel4, openssl, curl: installing the Debian packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    stunnel4 openssl curl >/dev/null
fi
if ! .local/kafka-venv/bin/python -c "import confluent_kafka, opentelemetry.proto.collector.trace.v1.trace_service_pb2, kafka.codec as c; assert c.has_snappy() and c.has_lz4() and c.has_zstd()" 2>/dev/null; then
  echo "kafka-python, confluent-kafka, opentelemetry-proto: installing into .local/kafka-venv"
  python3 -m venv .local/kafka-venv
  .local/kafka-venv/bin/pip install -q "kafka-python[lz4,snappy,zstd]==2.2.15" "confluent-kafka==2.12.1" "opentelemetry-proto==1.38.0"
fi
# (Not COSTWATCH_KAFKA_*: every variable with that prefix is a librdkafka property for costwatch.)
export COSTWATCH_TEST_PYTHON="$PWD/.local/kafka-venv/bin/python"
# ---------------------------------------------------------------------------------------------

export COSTWATCH_TEST_BROKERS="${COSTWATCH_TEST_BROKERS:-127.0.0.1:${BROKER_PORT:-9092}}"
export COSTWATCH_TEST_DATABASE_URL="${COSTWATCH_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

# Each test makes its own database named cw_test_*; drop what earlier runs left behind.
psql -q -h 127.0.0.1 -U postgres -d postgres -At \
  -c "SELECT 'DROP DATABASE IF EXISTS \"' || datname || '\" WITH (FORCE);' FROM pg_database WHERE datname LIKE 'cw\_test\_%'" \
  | psql -q -h 127.0.0.1 -U postgres -d postgres >/dev/null
# ...and the roles (cw_test_*) that tests/dashboards.rs makes for the Grafana read-only role.
psql -q -h 127.0.0.1 -U postgres -d postgres -At \
  -c "SELECT 'DROP ROLE IF EXISTS \"' || rolname || '\";' FROM pg_roles WHERE rolname LIKE 'cw\_test\_%'" \
  | psql -q -h 127.0.0.1 -U postgres -d postgres >/dev/null

cargo test --lib --bins --tests "$@"
