#!/usr/bin/env bash
# The history benchmark (benches/history.rs): fills a database named costwatch_bench_history
# (dropped and made again) with synthetic history, times the dashboard's panels, the cost API's
# query at 24h/7d/30d/365d and a monthly budget (now, over the whole previous month, and half
# past the previous hour; the last line's budget is the slowest), before (raw windows only) and
# after (roll-ups),
# and prints p50/p95 per query, the table sizes and a last line
#   q30d_p95_ms=<x> q365d_p95_ms=<y> budget_p95_ms=<z> exact=<true|false>
# The report is also written to target/bench-history.txt.
#
#   scripts/bench-history.sh [--days 400] [--raw-days 35] [--keys 200] [--runs 20]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/postgres.sh >/dev/null
mkdir -p target
cargo bench --profile "${BENCH_PROFILE:-bench}" --bench history -- "$@" | tee target/bench-history.txt
