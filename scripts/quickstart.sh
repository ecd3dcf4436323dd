#!/usr/bin/env bash
# Brings up a Kafka-protocol broker and PostgreSQL on this machine, runs costwatch on a sample
# load, and shows the resulting costs. With --keep-running the daemon stays up afterwards
# (Ctrl-C stops it); metrics are on http://127.0.0.1:9464/metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
keep=0; [ "${1:-}" = "--keep-running" ] && keep=1
events="${EVENTS:-20000}"

scripts/postgres.sh
scripts/broker.sh
cargo build --release --quiet
bin=target/release/costwatch
export COSTWATCH_CONFIG=config/costwatch.toml
mkdir -p .local

$bin migrate
$bin run > .local/costwatch.log 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
echo "costwatch: running as pid $pid (log: .local/costwatch.log)"

# A fresh seed each time: the same seed would re-send the same event ids, which dedup ignores.
$bin loadgen --count "$events" --seed "$(date +%s)" --models 3 --hardware 3 \
  --rate 0 --expected .local/expected.json

db_url="postgres://postgres@127.0.0.1:5432/costwatch"
end_sum() { psql "$db_url" -Atc "SELECT COALESCE(sum(next_offset), 0) FROM partition_progress"; }
for _ in $(seq 1 120); do
  before=$(end_sum); sleep 1; after=$(end_sum)
  [ "$before" = "$after" ] && [ "$after" -gt 0 ] && break
done

echo
echo "== spend per model and hardware (usage_costs) =="
psql "$db_url" -c "
  SELECT model, hardware, sum(events) AS events, sum(compute) AS compute, sum(storage) AS storage,
         sum(total_cost) AS total_cost, min(currency) AS currency
  FROM usage_costs GROUP BY model, hardware ORDER BY model, hardware"
echo "== the last five windows =="
psql "$db_url" -c "
  SELECT window_start, model, hardware, events, total_cost, final
  FROM usage_costs ORDER BY window_start DESC, model, hardware LIMIT 5"
echo "== rejected events by reason =="
psql "$db_url" -c "SELECT reason_code, count(*) FROM rejected_events GROUP BY 1 ORDER BY 2 DESC"

if [ "$keep" = 1 ]; then
  echo "costwatch keeps running; Ctrl-C stops it."
  wait $pid
fi
