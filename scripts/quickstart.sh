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
# Evaluate budgets every 2 s (15 s by default) so the summary below is current.
export COSTWATCH__ALERTING__EVALUATION_INTERVAL=2s
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

echo "== budgets (GET /api/v1/budgets; evaluated every alerting.evaluation_interval) =="
sleep 3
python3 - <<'PY' || echo "(the API did not answer; see .local/costwatch.log)"
import json, urllib.request
board = json.load(urllib.request.urlopen("http://127.0.0.1:9464/api/v1/budgets", timeout=5))
for b in board["budgets"]:
    print(f"{b['name']}: {b['spend']} of {b['amount']} {b['currency']} this {b['period']} period "
          f"({float(b['utilization']):.1%}), forecast {b['forecast']}, state {b['state']}")
PY
echo "== alerts (GET /api/v1/alerts) =="
python3 - <<'PY' || true
import json, urllib.request
for a in json.load(urllib.request.urlopen("http://127.0.0.1:9464/api/v1/alerts", timeout=5))["items"]:
    print(f"{a['state']:9} {a['labels']['alertname']}: {a['annotations'].get('summary', '')}")
PY
echo "== where each model would be cheapest (costwatch recommend) =="
$bin recommend || true

if [ "$keep" = 1 ]; then
  echo "costwatch keeps running; Ctrl-C stops it."
  wait $pid
fi
