#!/usr/bin/env bash
# Starts a Kafka-protocol broker (tansu, in-memory storage) on 127.0.0.1:${BROKER_PORT:-9092},
# installing it from crates.io first if it is missing. Idempotent: a broker already listening
# on the port is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${BROKER_PORT:-9092}"
mkdir -p .local
export PATH="$HOME/.cargo/bin:$PATH"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if listening; then
  echo "broker: already listening on 127.0.0.1:$port"
  exit 0
fi
if ! command -v tansu >/dev/null; then
  echo "broker: installing tansu 0.6.0 from crates.io (about 10 minutes, once)"
  cargo install tansu --version 0.6.0 --locked --features dynostore
fi
echo "broker: starting tansu on 127.0.0.1:$port (log: .local/tansu.log)"
nohup tansu broker \
  --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ > .local/tansu.log 2>&1 &
echo $! > .local/tansu.pid
for _ in $(seq 1 100); do
  if listening; then echo "broker: ready"; exit 0; fi
  sleep 0.2
done
echo "broker: tansu did not start listening on $port; see .local/tansu.log" >&2
tail -20 .local/tansu.log >&2 || true
exit 1
