#!/usr/bin/env bash
# Installs the Debian packages the build links against, when missing: librdkafka is built with
# TLS (OpenSSL), SASL GSSAPI (Cyrus SASL), OIDC token fetching (libcurl) and the zstd and gzip
# codecs (snappy and lz4 are bundled in librdkafka). Idempotent; .ci/run and scripts/test.sh
# run it before building.
set -euo pipefail
packages="pkg-config libssl-dev libsasl2-dev libcurl4-openssl-dev libzstd-dev zlib1g-dev"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "build dependencies: installing$missing"
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
