-- usage_costs_by_labels per UTC hour, from the hourly roll-ups: chargeback panels over weeks read
-- 24 rows per key and day instead of 1440 (the same columns; window_start/window_end are the
-- hour's bounds). Grant SELECT on it to the dashboard's role (deploy/postgres/grafana-grants.sql).
CREATE VIEW usage_costs_by_labels_hourly AS
SELECT
    h.bucket_start AS window_start, h.bucket_start + interval '60 minutes' AS window_end,
    h.model, h.hardware, h.labels,
    h.events, h.late_events, h.compute, h.storage,
    h.compute * h.compute_price * h.k1 AS compute_cost,
    h.storage * h.storage_price * h.k2 AS storage_cost,
    h.compute * h.compute_price * h.k1 + h.storage * h.storage_price * h.k2 AS total_cost,
    h.currency,
    h.topic, h.source, h.coefficients_assumed, h.input_tokens, h.output_tokens
FROM usage_hourly h;
