#!/usr/bin/env bash
# Installs the tansu build the broker-restart fault test needs: tansu 0.6.0 with its SQLite
# storage engine (feature libsql), so a killed broker comes back with its topics. It goes into
# its own root, $HOME/.local/tansu-libsql, beside the in-memory broker scripts/broker.sh runs,
# and is installed once (about ten minutes). The test starts and kills its own instances.
set -euo pipefail
root="${COSTWATCH_DURABLE_TANSU_ROOT:-$HOME/.local/tansu-libsql}"
export PATH="$HOME/.cargo/bin:$PATH"
if [ -x "$root/bin/tansu" ]; then
  echo "durable broker: $root/bin/tansu is installed"
  exit 0
fi
echo "durable broker: installing tansu 0.6.0 with the SQLite engine into $root (about ten minutes, once)"
cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$root"
