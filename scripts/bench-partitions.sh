#!/usr/bin/env bash
# Daily or weekly partitions for window_usage? (issue 17 asks for the choice with a measured
# reason.) Run after scripts/bench-history.sh has filled its database (35 days x 200 keys by
# default): this copies the raw windows into two twins partitioned by UTC day and by UTC week
# (Monday-aligned), with the same columns, indexes and physical order and both built the same way
# (rows first, indexes after), then times against each, interleaved, with
# pgbench (simple protocol: every statement is planned with its values, as costwatch's custom
# plans are):
#   ragged    - the raw minutes a budget's forecast window reads at *now* (37 minutes, every key)
#   old_hour  - one raw hour of a day 20 days back (a range's ragged end in the past)
#   day_steps - step=window over the last 24 hours (288,000 rows at 200 keys)
#   flush     - a flush's upsert: 200 keys x the last 6 minutes, every row a conflict (adds 0:
#               the twins' sums stay as copied)
# and prints p50/p95 per workload and table, the partitions' sizes, and what retention keeps
# beyond `retention.windows` with each granularity. The twins are dropped at the end; the data
# costwatch wrote is not touched (the flush workload runs against the twins).
#
#   scripts/bench-partitions.sh [--runs N]      (N per workload and table; default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=200
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    *) echo "usage: scripts/bench-partitions.sh [--runs N]" >&2; exit 2 ;;
  esac
done
url="${COSTWATCH_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/costwatch_bench_history}"
pgbench="$(command -v pgbench || echo /usr/lib/postgresql/15/bin/pgbench)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PGOPTIONS='-c client_min_messages=warning'
psql() { command psql "$url" -v ON_ERROR_STOP=1 -qAt "$@"; }

rows="$(psql -c "SELECT count(*) FROM window_usage")"
if [ "$rows" = 0 ]; then
  echo "window_usage is empty: run scripts/bench-history.sh first" >&2
  exit 1
fi

started=$SECONDS
psql <<'SQL'
SET timezone = 'UTC';
SET jit = off;
DROP TABLE IF EXISTS twin_daily, twin_weekly;
-- Both twins are built the same way (rows first, indexes after), so that neither has the more
-- compact indexes: the live table's grew with its fill.
DO $$
DECLARE
  twin record;
  lo timestamptz;
BEGIN
  FOR twin IN SELECT * FROM (VALUES ('twin_daily', 'day', interval '1 day'),
                                    ('twin_weekly', 'week', interval '7 days')) t(name, unit, span) LOOP
    EXECUTE format('CREATE TABLE %I (LIKE window_usage INCLUDING DEFAULTS) PARTITION BY RANGE (window_start)', twin.name);
    FOR lo IN SELECT generate_series(date_trunc(twin.unit, min(window_start)), max(window_start), twin.span)
              FROM window_usage LOOP
      EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                     twin.name || '_' || to_char(lo, 'YYYYMMDD'), twin.name, lo, lo + twin.span);
    END LOOP;
    -- The live table's physical order: partition by partition, each as it was filled.
    EXECUTE format('INSERT INTO %I SELECT * FROM window_usage', twin.name);
    EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (model, hardware, labels, topic, source, usage_from_tokens, window_start)', twin.name);
    EXECUTE format('CREATE INDEX ON %I (window_start)', twin.name);
  END LOOP;
END $$;
VACUUM ANALYZE twin_daily;
VACUUM ANALYZE twin_weekly;
SQL
echo "daily and weekly twins of $rows raw windows built in $((SECONDS - started)) s"

# Bounds as epoch seconds: to_timestamp(double) is immutable, so partitions are pruned at plan
# time, as they are for the bound values costwatch sends.
end="$(psql -c "SELECT extract(epoch FROM max(window_start) + interval '1 minute')::bigint FROM window_usage")"
keys="$(psql -c "SELECT count(DISTINCT (model, hardware)) FROM window_usage WHERE window_start >= to_timestamp($end) - interval '1 hour'")"
old="$(psql -c "SELECT extract(epoch FROM date_trunc('hour', to_timestamp($end) - interval '20 days'))::bigint")"

cat >"$work/ragged.sql" <<'SQL'
SELECT model, hardware, sum(events), sum(compute * compute_price * k1 + storage * storage_price * k2)
FROM :table WHERE window_start >= to_timestamp(:end - 2220) AND window_start < to_timestamp(:end) GROUP BY 1, 2;
SQL
cat >"$work/old_hour.sql" <<'SQL'
SELECT model, hardware, sum(events), sum(compute * compute_price * k1 + storage * storage_price * k2)
FROM :table WHERE window_start >= to_timestamp(:old) AND window_start < to_timestamp(:old + 3600) GROUP BY 1, 2;
SQL
cat >"$work/day_steps.sql" <<'SQL'
SELECT window_start, sum(events), sum(compute), sum(storage)
FROM :table WHERE window_start >= to_timestamp(:end - 86400) AND window_start < to_timestamp(:end) GROUP BY 1;
SQL
cat >"$work/flush.sql" <<'SQL'
INSERT INTO :table AS w (model, hardware, labels, topic, source, usage_from_tokens, window_start, window_end,
       finalizes_at, events, compute, storage, currency)
SELECT 'model-' || (k % 20), 'hw-' || (k / 20), '{}', 'usage', 'usage', false, t, t + interval '1 minute',
       t + interval '6 minutes', 0, 0, 0, 'USD'
FROM generate_series(0, :keys - 1) k, generate_series(1, 6) m, LATERAL (SELECT to_timestamp(:end - 60 * m) AS t) x
ON CONFLICT (model, hardware, labels, topic, source, usage_from_tokens, window_start) DO UPDATE SET
    events = w.events + excluded.events, compute = w.compute + excluded.compute,
    storage = w.storage + excluded.storage, updated_at = now();
SQL

# One pgbench run of `runs / 2` transactions, per-transaction latencies (µs) appended to a file.
bench() {
  local workload="$1" table="$2" n="$3"
  (cd "$work" && "$pgbench" -n -M simple -t "$n" -f "$workload.sql" -D table="$table" -D end="$end" \
      -D old="$old" -D keys="$keys" -l --log-prefix="log.$workload.$table" "$url" >/dev/null)
  cat "$work"/log."$workload"."$table".* | awk '{print $3}' >>"$work/lat.$workload.$table"
  rm -f "$work"/log."$workload"."$table".*
}
# Percentile $2 (0-100) of the µs samples in file $1, printed in ms.
pct() { sort -n "$1" | awk -v p="$2" '{a[NR]=$1} END {i=int((NR-1)*p/100+0.999); printf "%.2f", a[i+1]/1000}'; }

echo
echo "workload    daily p50 / p95 ms    weekly p50 / p95 ms    weekly/daily (p50)"
for workload in ragged old_hour day_steps flush; do
  n=$runs
  [ "$workload" = day_steps ] && n=$(( (runs + 9) / 10 ))
  half=$(( (n + 1) / 2 ))
  for table in twin_daily twin_weekly; do bench "$workload" "$table" 2; : >"$work/lat.$workload.$table"; done
  for round in 1 2; do
    for table in twin_daily twin_weekly; do bench "$workload" "$table" "$half"; done
  done
  d50=$(pct "$work/lat.$workload.twin_daily" 50); d95=$(pct "$work/lat.$workload.twin_daily" 95)
  w50=$(pct "$work/lat.$workload.twin_weekly" 50); w95=$(pct "$work/lat.$workload.twin_weekly" 95)
  printf "%-11s %8s / %-8s       %8s / %-8s       %.2f\n" "$workload" "$d50" "$d95" "$w50" "$w95" \
    "$(echo "$w50 / $d50" | bc -l)"
done

echo
psql <<'SQL'
SET timezone = 'UTC';
WITH parts AS (
  SELECT p.relid::regclass AS part, pg_total_relation_size(p.relid) AS bytes, t.parent
  FROM (VALUES ('twin_daily'), ('twin_weekly')) t(parent),
       LATERAL pg_partition_tree(t.parent::regclass) p
  WHERE p.isleaf)
SELECT format('%s: %s partitions with rows, %s in all, median %s per partition',
              parent, count(*), pg_size_pretty(sum(bytes)),
              pg_size_pretty((percentile_cont(0.5) WITHIN GROUP (ORDER BY bytes))::bigint))
FROM parts WHERE bytes > 1048576 GROUP BY parent ORDER BY parent;
SQL
# A whole day's raw windows at this fill's keys (the median of the daily partitions with rows).
per_day="$(psql -c "SELECT (percentile_cont(0.5) WITHIN GROUP (ORDER BY b))::bigint FROM (SELECT pg_total_relation_size(relid) b FROM pg_partition_tree('twin_daily') WHERE isleaf) x WHERE b > 1048576")"
echo "kept beyond retention.windows, at this fill's keys: daily partitions 0 to 1 day" \
  "(mean $(numfmt --to=iec $((per_day / 2)))), weekly 0 to 7 days (mean $(numfmt --to=iec $((per_day * 7 / 2))))"
psql -c "DROP TABLE twin_daily, twin_weekly"
