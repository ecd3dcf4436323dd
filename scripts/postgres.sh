#!/usr/bin/env bash
# Makes sure the machine's PostgreSQL answers on 127.0.0.1:5432, starting the cluster if needed.
set -euo pipefail
if pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "postgres: ready"
  exit 0
fi
echo "postgres: starting the local cluster"
version="$(ls /etc/postgresql | sort -V | tail -1)"
pg_ctlcluster --skip-systemctl-redirect "$version" main start
for _ in $(seq 1 50); do
  pg_isready -q -h 127.0.0.1 -p 5432 && { echo "postgres: ready"; exit 0; }
  sleep 0.2
done
echo "postgres: not answering on 127.0.0.1:5432" >&2
exit 1
