-- costwatch's PostgreSQL roles, least privilege (step 2 of 2, after `costwatch migrate`):
-- what the shipped Grafana dashboard (deploy/grafana/dashboards/costwatch.json) reads, and
-- nothing else. Run as the owner (or the admin), in costwatch's database:
--
--   psql "host=db.example.com user=costwatch dbname=costwatch sslmode=verify-full sslrootcert=ca.pem" \
--     -v grafana=grafana -f deploy/postgres/grafana-grants.sql
--
-- The views are the stable contract and read the tables behind them with the owner's rights,
-- so Grafana needs no access to window_usage, rejected_event or the offsets. The dashboard's
-- spend panels read the hourly roll-ups (usage_costs_hourly): a 30-day panel sums 720 rows per
-- model and hardware instead of 43,200, and the spend stat reads usage_costs_totals_hourly (720
-- rows for 30 days, whatever the keys).
-- tests/dashboards.rs runs every SQL query of the dashboard as this role.
\set ON_ERROR_STOP on

GRANT USAGE ON SCHEMA public TO :"grafana";
GRANT SELECT ON usage_costs, usage_costs_hourly, usage_costs_daily, usage_costs_by_labels,
    usage_costs_by_labels_hourly, usage_costs_totals_hourly, rejected_events,
    budget_alert TO :"grafana";
