-- The roll-ups store each row's cost (compute x compute price x k1, storage x storage price x k2):
-- a 30-day panel sums 144,000 hourly rows at 200 keys, and four numeric products per row were a
-- third of its time. Generated columns, so a writer cannot store a cost that disagrees with the
-- row; still exact decimals, equal to the raw windows' to the last digit. NULL when unpriced.
ALTER TABLE usage_hourly
    ADD COLUMN compute_cost numeric GENERATED ALWAYS AS (compute * compute_price * k1) STORED,
    ADD COLUMN storage_cost numeric GENERATED ALWAYS AS (storage * storage_price * k2) STORED;
ALTER TABLE usage_daily
    ADD COLUMN compute_cost numeric GENERATED ALWAYS AS (compute * compute_price * k1) STORED,
    ADD COLUMN storage_cost numeric GENERATED ALWAYS AS (storage * storage_price * k2) STORED;

-- usage_between as before (migration 0006), with the two costs at the end: stored for roll-up
-- rows, computed for the raw windows (only a range's ragged ends are read from those).
DROP FUNCTION usage_between(timestamptz, timestamptz, text);
CREATE FUNCTION usage_between(p_from timestamptz, p_to timestamptz, p_finest text DEFAULT 'day')
RETURNS TABLE (
    window_start timestamptz, window_end timestamptz, tier text, topic text, source text, model text,
    hardware text, labels jsonb, usage_from_tokens boolean, profile text, events bigint, late_events bigint,
    compute numeric, storage numeric, input_tokens numeric, output_tokens numeric, compute_price numeric,
    storage_price numeric, k1 numeric, k2 numeric, coefficients_assumed boolean, currency text,
    coefficient_version bigint, price_id text, finalizes_at timestamptz, updated_at timestamptz,
    compute_cost numeric, storage_cost numeric)
LANGUAGE sql STABLE AS $$
    SELECT d.bucket_start, d.bucket_start + interval '24 hours', 'daily', d.topic, d.source, d.model, d.hardware,
           d.labels, d.usage_from_tokens, d.profile, d.events, d.late_events, d.compute, d.storage, d.input_tokens,
           d.output_tokens, d.compute_price, d.storage_price, d.k1, d.k2, d.coefficients_assumed, d.currency,
           d.coefficient_version, d.price_id, d.finalizes_at, d.updated_at, d.compute_cost, d.storage_cost
    FROM usage_daily d
    WHERE d.bucket_start >= costwatch_d_from(p_from, p_to, p_finest)
      AND d.bucket_start < costwatch_d_to(p_from, p_to, p_finest)
    UNION ALL
    SELECT h.bucket_start, h.bucket_start + interval '60 minutes', 'hourly', h.topic, h.source, h.model, h.hardware,
           h.labels, h.usage_from_tokens, h.profile, h.events, h.late_events, h.compute, h.storage, h.input_tokens,
           h.output_tokens, h.compute_price, h.storage_price, h.k1, h.k2, h.coefficients_assumed, h.currency,
           h.coefficient_version, h.price_id, h.finalizes_at, h.updated_at, h.compute_cost, h.storage_cost
    FROM usage_hourly h
    WHERE (h.bucket_start >= costwatch_h_from(p_from, p_to, p_finest)
           AND h.bucket_start < costwatch_d_from(p_from, p_to, p_finest))
       OR (h.bucket_start >= costwatch_d_to(p_from, p_to, p_finest)
           AND h.bucket_start < costwatch_h_to(p_from, p_to, p_finest))
    UNION ALL
    SELECT w.window_start, w.window_end, 'raw', w.topic, w.source, w.model, w.hardware, w.labels,
           w.usage_from_tokens, w.profile, w.events, w.late_events, w.compute, w.storage, w.input_tokens,
           w.output_tokens, w.compute_price, w.storage_price, w.k1, w.k2, w.coefficients_assumed, w.currency,
           w.coefficient_version, w.price_id, w.finalizes_at, w.updated_at,
           w.compute * w.compute_price * w.k1, w.storage * w.storage_price * w.k2
    FROM window_usage w
    WHERE (w.window_start >= p_from AND w.window_start < costwatch_h_from(p_from, p_to, p_finest))
       OR (w.window_start >= costwatch_h_to(p_from, p_to, p_finest) AND w.window_start < p_to)
$$;

-- The roll-up views read the stored costs (same columns, same values).
CREATE OR REPLACE VIEW usage_costs_hourly AS
SELECT
    h.bucket_start AS window_start,
    h.bucket_start + interval '60 minutes' AS window_end,
    h.model,
    h.hardware,
    sum(h.events)::bigint      AS events,
    sum(h.late_events)::bigint AS late_events,
    sum(h.compute)             AS compute,
    sum(h.storage)             AS storage,
    CASE WHEN bool_and(h.compute_price IS NOT NULL) THEN sum(h.compute_cost) END AS compute_cost,
    CASE WHEN bool_and(h.storage_price IS NOT NULL) THEN sum(h.storage_cost) END AS storage_cost,
    CASE WHEN bool_and(h.compute_price IS NOT NULL AND h.storage_price IS NOT NULL)
         THEN sum(h.compute_cost + h.storage_cost) END AS total_cost,
    h.currency,
    COALESCE(bool_and(h.finalizes_at <= t.watermark), false) AS final,
    max(h.updated_at)          AS updated_at,
    bool_or(h.coefficients_assumed) AS coefficients_assumed,
    sum(h.input_tokens)        AS input_tokens,
    sum(h.output_tokens)       AS output_tokens
FROM usage_hourly h
LEFT JOIN topic_watermarks t ON t.topic = h.topic
GROUP BY h.bucket_start, h.model, h.hardware, h.currency;

CREATE OR REPLACE VIEW usage_costs_daily AS
SELECT
    d.bucket_start AS window_start,
    d.bucket_start + interval '24 hours' AS window_end,
    d.model,
    d.hardware,
    sum(d.events)::bigint      AS events,
    sum(d.late_events)::bigint AS late_events,
    sum(d.compute)             AS compute,
    sum(d.storage)             AS storage,
    CASE WHEN bool_and(d.compute_price IS NOT NULL) THEN sum(d.compute_cost) END AS compute_cost,
    CASE WHEN bool_and(d.storage_price IS NOT NULL) THEN sum(d.storage_cost) END AS storage_cost,
    CASE WHEN bool_and(d.compute_price IS NOT NULL AND d.storage_price IS NOT NULL)
         THEN sum(d.compute_cost + d.storage_cost) END AS total_cost,
    d.currency,
    COALESCE(bool_and(d.finalizes_at <= t.watermark), false) AS final,
    max(d.updated_at)          AS updated_at,
    bool_or(d.coefficients_assumed) AS coefficients_assumed,
    sum(d.input_tokens)        AS input_tokens,
    sum(d.output_tokens)       AS output_tokens
FROM usage_daily d
LEFT JOIN topic_watermarks t ON t.topic = d.topic
GROUP BY d.bucket_start, d.model, d.hardware, d.currency;

CREATE OR REPLACE VIEW usage_costs_by_labels_hourly AS
SELECT
    h.bucket_start AS window_start, h.bucket_start + interval '60 minutes' AS window_end,
    h.model, h.hardware, h.labels,
    h.events, h.late_events, h.compute, h.storage,
    h.compute_cost,
    h.storage_cost,
    h.compute_cost + h.storage_cost AS total_cost,
    h.currency,
    h.topic, h.source, h.coefficients_assumed, h.input_tokens, h.output_tokens
FROM usage_hourly h;
