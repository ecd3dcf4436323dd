-- The read-only role for Grafana's PostgreSQL data source: SELECT on exactly what the shipped
-- dashboard reads, nothing else. tests/dashboards.rs runs every SQL panel of the dashboard as
-- this role, so a panel that needs more fails there first.
--
-- Run it as costwatch's schema owner in costwatch's database (psql -d costwatch -f ...), then
-- give the role a password and put it in Grafana's data source (secureJsonData.password):
--   ALTER ROLE costwatch_grafana PASSWORD '...';
CREATE ROLE costwatch_grafana LOGIN;
GRANT USAGE ON SCHEMA public TO costwatch_grafana;
-- The views are the stable contract (README, "What is in PostgreSQL"); budget_alert is the
-- alert state table behind the "Budget alerts" panel.
GRANT SELECT ON usage_costs, usage_costs_by_labels, rejected_events, budget_alert TO costwatch_grafana;
