-- History at scale (issue 17): raw minute windows partitioned by day, exact hourly and daily
-- roll-ups kept in the flush's own transaction, per-topic `final`, and the columns that sources
-- and token usage (issue 18) and assumed coefficients (issue 20) fill in.
--
-- Needs PostgreSQL 15 or newer (UNIQUE NULLS NOT DISTINCT on the roll-ups' identity).
-- Recreating the views drops grants on them: grant SELECT on the views again after upgrading
-- (deploy/postgres/grafana-grants.sql does).

DROP VIEW usage_costs;
DROP VIEW usage_costs_by_labels;
ALTER TABLE window_usage RENAME TO window_usage_unpartitioned;
ALTER INDEX window_usage_model_hardware RENAME TO window_usage_unpartitioned_model_hardware;
ALTER TABLE window_usage_unpartitioned RENAME CONSTRAINT window_usage_pkey TO window_usage_unpartitioned_pkey;

-- One row per (window, key). Sums are added to in place by every flush; prices are the ones in
-- force at the row's last write (and every re-pricing moves the row's whole contribution in the
-- roll-ups along with it). Partitioned by day of window_start: retention drops whole days.
CREATE TABLE window_usage (
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL,
    -- The Kafka topic the events came from: `final` is per topic.
    topic               text        NOT NULL,
    -- The configured source (issue 18); the topic's name for the one native source.
    source              text        NOT NULL,
    model               text        NOT NULL,
    hardware            text        NOT NULL,
    labels              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- True: T and S were derived from tokens by `profile` (or are unknown, profile NULL).
    usage_from_tokens   boolean     NOT NULL DEFAULT false,
    profile             text,
    events              bigint      NOT NULL,
    late_events         bigint      NOT NULL DEFAULT 0,
    compute             numeric     NOT NULL,
    storage             numeric     NOT NULL,
    input_tokens        numeric     NOT NULL DEFAULT 0,
    output_tokens       numeric     NOT NULL DEFAULT 0,
    -- NULL prices mean the hardware is unpriced: its cost is unknown, never zero.
    compute_price       numeric,
    storage_price       numeric,
    k1                  numeric,
    k2                  numeric,
    -- k1 = k2 = 1 because nothing was configured or calibrated for the pair.
    coefficients_assumed boolean    NOT NULL DEFAULT false,
    currency            text        NOT NULL,
    coefficient_version bigint      REFERENCES coefficient_version (id),
    price_id            text,
    finalizes_at        timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- Key columns first and window_start last: the flush reads and writes rows by key, and a
    -- roll-up step never scans a time range of every key.
    PRIMARY KEY (model, hardware, labels, topic, source, usage_from_tokens, window_start)
) PARTITION BY RANGE (window_start);
CREATE INDEX window_usage_start ON window_usage (window_start);

-- Roll-ups: the raw rows of each hour (day), summed per key and per pricing identity, so that
-- every cost is still exactly price * coefficient * sum, and `rerate` can move a row's
-- contribution from one identity to another. Kept by the flush and by rerate in their own
-- transactions, as signed deltas (src/history/rollup.rs): never recomputed from raw rows, so
-- they stay whole after retention dropped the raw days.
CREATE TABLE usage_hourly (
    bucket_start        timestamptz NOT NULL,
    topic               text        NOT NULL,
    source              text        NOT NULL,
    model               text        NOT NULL,
    hardware            text        NOT NULL,
    labels              jsonb       NOT NULL,
    usage_from_tokens   boolean     NOT NULL,
    profile             text,
    currency            text        NOT NULL,
    price_id            text,
    coefficient_version bigint,
    compute_price       numeric,
    storage_price       numeric,
    k1                  numeric,
    k2                  numeric,
    coefficients_assumed boolean    NOT NULL,
    events              bigint      NOT NULL,
    late_events         bigint      NOT NULL,
    compute             numeric     NOT NULL,
    storage             numeric     NOT NULL,
    input_tokens        numeric     NOT NULL,
    output_tokens       numeric     NOT NULL,
    -- The latest finalizes_at of the raw rows behind it.
    finalizes_at        timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (model, hardware, labels, topic, source, usage_from_tokens, profile, currency,
        price_id, coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed, bucket_start)
) PARTITION BY RANGE (bucket_start);
CREATE INDEX usage_hourly_start ON usage_hourly (bucket_start);

CREATE TABLE usage_daily (LIKE usage_hourly INCLUDING DEFAULTS) PARTITION BY RANGE (bucket_start);
ALTER TABLE usage_daily ADD UNIQUE NULLS NOT DISTINCT (model, hardware, labels, topic, source, usage_from_tokens,
    profile, currency, price_id, coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed,
    bucket_start);
CREATE INDEX usage_daily_start ON usage_daily (bucket_start);

-- The partition of `parent` that holds `at`, created if missing: window_usage by UTC day,
-- usage_hourly by UTC month, usage_daily by UTC year. Bounds are computed on UTC timestamps
-- (not timestamptz + interval, which follows the session's time zone across DST).
CREATE FUNCTION costwatch_ensure_partition(parent text, at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    unit text := CASE parent WHEN 'window_usage' THEN 'day' WHEN 'usage_hourly' THEN 'month'
                             WHEN 'usage_daily' THEN 'year' END;
    lo timestamp;
    hi timestamp;
    name text;
BEGIN
    IF unit IS NULL THEN
        RAISE EXCEPTION 'costwatch: % is not a partitioned history table', parent;
    END IF;
    lo := date_trunc(unit, at AT TIME ZONE 'UTC');
    hi := lo + ('1 ' || unit)::interval;
    name := parent || '_' || to_char(lo, CASE unit WHEN 'day' THEN '"d"YYYYMMDD'
                                                   WHEN 'month' THEN '"m"YYYYMM' ELSE '"y"YYYY' END);
    -- Two instances creating the same partition: the second waits, then finds it.
    PERFORM pg_advisory_xact_lock(7170017, hashtext(name));
    IF to_regclass(quote_ident(name)) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                       name, parent, lo AT TIME ZONE 'UTC', hi AT TIME ZONE 'UTC');
    END IF;
    RETURN name;
END $$;

-- Move the rows over. Rows written before topics were recorded belong to the one topic
-- consumed so far, when there is exactly one; otherwise to '' (final by every topic's watermark).
SELECT costwatch_ensure_partition('window_usage', d)
FROM (SELECT DISTINCT date_trunc('day', window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS d
      FROM window_usage_unpartitioned) days;

INSERT INTO window_usage (window_start, window_end, topic, source, model, hardware, labels, events, late_events,
    compute, storage, compute_price, storage_price, k1, k2, coefficients_assumed, currency, coefficient_version,
    price_id, finalizes_at, created_at, updated_at)
SELECT w.window_start, w.window_end, t.topic, t.topic, w.model, w.hardware, w.labels, w.events, w.late_events,
       w.compute, w.storage, w.compute_price, w.storage_price, w.k1, w.k2,
       -- Before this migration, 1 and 1 were written without saying where they came from.
       COALESCE(w.coefficient_version IS NULL AND w.k1 = 1 AND w.k2 = 1, false),
       w.currency, w.coefficient_version, w.price_id, w.finalizes_at, w.created_at, w.updated_at
FROM window_usage_unpartitioned w
CROSS JOIN (SELECT CASE WHEN count(DISTINCT topic) = 1 THEN min(topic) ELSE '' END AS topic
            FROM partition_progress) t;

DROP TABLE window_usage_unpartitioned;

SELECT costwatch_ensure_partition('usage_hourly', d)
FROM (SELECT DISTINCT date_trunc('month', window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS d
      FROM window_usage) months;
SELECT costwatch_ensure_partition('usage_daily', d)
FROM (SELECT DISTINCT date_trunc('year', window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS d
      FROM window_usage) years;

INSERT INTO usage_hourly (bucket_start, topic, source, model, hardware, labels, usage_from_tokens, profile, currency,
    price_id, coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed, events, late_events,
    compute, storage, input_tokens, output_tokens, finalizes_at)
SELECT date_trunc('hour', window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', topic, source, model, hardware, labels,
       usage_from_tokens, profile, currency, price_id, coefficient_version, compute_price, storage_price, k1, k2,
       coefficients_assumed, sum(events), sum(late_events), sum(compute), sum(storage), sum(input_tokens),
       sum(output_tokens), max(finalizes_at)
FROM window_usage
GROUP BY 1, topic, source, model, hardware, labels, usage_from_tokens, profile, currency, price_id,
         coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed;

INSERT INTO usage_daily (bucket_start, topic, source, model, hardware, labels, usage_from_tokens, profile, currency,
    price_id, coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed, events, late_events,
    compute, storage, input_tokens, output_tokens, finalizes_at)
SELECT date_trunc('day', bucket_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', topic, source, model, hardware, labels,
       usage_from_tokens, profile, currency, price_id, coefficient_version, compute_price, storage_price, k1, k2,
       coefficients_assumed, sum(events), sum(late_events), sum(compute), sum(storage), sum(input_tokens),
       sum(output_tokens), max(finalizes_at)
FROM usage_hourly
GROUP BY 1, topic, source, model, hardware, labels, usage_from_tokens, profile, currency, price_id,
         coefficient_version, compute_price, storage_price, k1, k2, coefficients_assumed;

-- Each topic's lowest partition watermark. A row is final once its topic's watermark passed its
-- finalizes_at; rows from before topics were recorded ('') wait for every topic's.
CREATE VIEW topic_watermarks AS
SELECT topic, min(watermark) AS watermark FROM partition_progress GROUP BY topic
UNION ALL
SELECT '', min(watermark) FROM partition_progress;

-- Where each tier's part of [p_from, p_to) begins and ends (see usage_between): raw rows for
-- [p_from, h_from) and [h_to, p_to), hourly for [h_from, d_from) and [d_to, h_to), daily for
-- [d_from, d_to); p_from <= h_from <= d_from <= d_to <= h_to <= p_to. Days and hours are UTC.
CREATE FUNCTION costwatch_floor(ts timestamptz, unit text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$ SELECT date_trunc(unit, ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' $$;
CREATE FUNCTION costwatch_ceil(ts timestamptz, unit text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN costwatch_floor(ts, unit) = ts THEN ts
                ELSE costwatch_floor(ts, unit) + CASE unit WHEN 'day' THEN interval '24 hours'
                                                            ELSE interval '60 minutes' END END
$$;
CREATE FUNCTION costwatch_h_from(p_from timestamptz, p_to timestamptz, p_finest text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_finest = 'window' THEN p_to ELSE LEAST(costwatch_ceil(p_from, 'hour'), p_to) END
$$;
CREATE FUNCTION costwatch_h_to(p_from timestamptz, p_to timestamptz, p_finest text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT GREATEST(CASE WHEN p_finest = 'window' THEN p_to ELSE costwatch_floor(p_to, 'hour') END,
                    costwatch_h_from(p_from, p_to, p_finest))
$$;
CREATE FUNCTION costwatch_d_from(p_from timestamptz, p_to timestamptz, p_finest text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_finest = 'day'
                THEN GREATEST(LEAST(costwatch_ceil(p_from, 'day'), costwatch_h_to(p_from, p_to, p_finest)),
                              costwatch_h_from(p_from, p_to, p_finest))
                ELSE costwatch_h_to(p_from, p_to, p_finest) END
$$;
CREATE FUNCTION costwatch_d_to(p_from timestamptz, p_to timestamptz, p_finest text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_finest = 'day'
                THEN GREATEST(costwatch_floor(p_to, 'day'), costwatch_d_from(p_from, p_to, p_finest))
                ELSE costwatch_h_to(p_from, p_to, p_finest) END
$$;

-- Every stored usage row of [p_from, p_to), from the coarsest tier that covers each part of the
-- range: whole UTC days from usage_daily (when p_finest is 'day'), whole UTC hours from
-- usage_hourly (unless p_finest is 'window'), the rest from window_usage. `window_start` is the
-- bucket's start for roll-up rows. Totals are identical whichever tier answers; a plain SQL
-- function so that the planner inlines it and prunes partitions.
CREATE FUNCTION usage_between(p_from timestamptz, p_to timestamptz, p_finest text DEFAULT 'day')
RETURNS TABLE (
    window_start timestamptz, window_end timestamptz, tier text, topic text, source text, model text,
    hardware text, labels jsonb, usage_from_tokens boolean, profile text, events bigint, late_events bigint,
    compute numeric, storage numeric, input_tokens numeric, output_tokens numeric, compute_price numeric,
    storage_price numeric, k1 numeric, k2 numeric, coefficients_assumed boolean, currency text,
    coefficient_version bigint, price_id text, finalizes_at timestamptz, updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT d.bucket_start, d.bucket_start + interval '24 hours', 'daily', d.topic, d.source, d.model, d.hardware,
           d.labels, d.usage_from_tokens, d.profile, d.events, d.late_events, d.compute, d.storage, d.input_tokens,
           d.output_tokens, d.compute_price, d.storage_price, d.k1, d.k2, d.coefficients_assumed, d.currency,
           d.coefficient_version, d.price_id, d.finalizes_at, d.updated_at
    FROM usage_daily d
    WHERE d.bucket_start >= costwatch_d_from(p_from, p_to, p_finest)
      AND d.bucket_start < costwatch_d_to(p_from, p_to, p_finest)
    UNION ALL
    SELECT h.bucket_start, h.bucket_start + interval '60 minutes', 'hourly', h.topic, h.source, h.model, h.hardware,
           h.labels, h.usage_from_tokens, h.profile, h.events, h.late_events, h.compute, h.storage, h.input_tokens,
           h.output_tokens, h.compute_price, h.storage_price, h.k1, h.k2, h.coefficients_assumed, h.currency,
           h.coefficient_version, h.price_id, h.finalizes_at, h.updated_at
    FROM usage_hourly h
    WHERE (h.bucket_start >= costwatch_h_from(p_from, p_to, p_finest)
           AND h.bucket_start < costwatch_d_from(p_from, p_to, p_finest))
       OR (h.bucket_start >= costwatch_d_to(p_from, p_to, p_finest)
           AND h.bucket_start < costwatch_h_to(p_from, p_to, p_finest))
    UNION ALL
    SELECT w.window_start, w.window_end, 'raw', w.topic, w.source, w.model, w.hardware, w.labels,
           w.usage_from_tokens, w.profile, w.events, w.late_events, w.compute, w.storage, w.input_tokens,
           w.output_tokens, w.compute_price, w.storage_price, w.k1, w.k2, w.coefficients_assumed, w.currency,
           w.coefficient_version, w.price_id, w.finalizes_at, w.updated_at
    FROM window_usage w
    WHERE (w.window_start >= p_from AND w.window_start < costwatch_h_from(p_from, p_to, p_finest))
       OR (w.window_start >= costwatch_h_to(p_from, p_to, p_finest) AND w.window_start < p_to)
$$;

-- The documented views, as before plus three columns at the end, with `final` per topic.
CREATE VIEW usage_costs AS
SELECT
    w.window_start,
    w.window_end,
    w.model,
    w.hardware,
    sum(w.events)::bigint      AS events,
    sum(w.late_events)::bigint AS late_events,
    sum(w.compute)             AS compute,
    sum(w.storage)             AS storage,
    -- A window is priced only if every row behind it is: a partial sum would read as a real cost.
    CASE WHEN bool_and(w.compute_price IS NOT NULL)
         THEN sum(w.compute * w.compute_price * w.k1) END AS compute_cost,
    CASE WHEN bool_and(w.storage_price IS NOT NULL)
         THEN sum(w.storage * w.storage_price * w.k2) END AS storage_cost,
    CASE WHEN bool_and(w.compute_price IS NOT NULL AND w.storage_price IS NOT NULL)
         THEN sum(w.compute * w.compute_price * w.k1 + w.storage * w.storage_price * w.k2) END AS total_cost,
    w.currency,
    COALESCE(bool_and(w.finalizes_at <= t.watermark), false) AS final,
    max(w.updated_at)          AS updated_at,
    bool_or(w.coefficients_assumed) AS coefficients_assumed,
    sum(w.input_tokens)        AS input_tokens,
    sum(w.output_tokens)       AS output_tokens
FROM window_usage w
LEFT JOIN topic_watermarks t ON t.topic = w.topic
GROUP BY w.window_start, w.window_end, w.model, w.hardware, w.currency;

-- The same, per label set, for group-by on labels (e.g. labels->>'tenant').
CREATE VIEW usage_costs_by_labels AS
SELECT
    w.window_start, w.window_end, w.model, w.hardware, w.labels,
    w.events, w.late_events, w.compute, w.storage,
    w.compute * w.compute_price * w.k1 AS compute_cost,
    w.storage * w.storage_price * w.k2 AS storage_cost,
    w.compute * w.compute_price * w.k1 + w.storage * w.storage_price * w.k2 AS total_cost,
    w.currency,
    w.topic, w.source, w.coefficients_assumed, w.input_tokens, w.output_tokens
FROM window_usage w;

-- usage_costs per UTC hour and per UTC day, from the roll-ups: `window_start`/`window_end` are
-- the bucket's bounds, `final` says every window in it is.
CREATE VIEW usage_costs_hourly AS
SELECT
    h.bucket_start AS window_start,
    h.bucket_start + interval '60 minutes' AS window_end,
    h.model,
    h.hardware,
    sum(h.events)::bigint      AS events,
    sum(h.late_events)::bigint AS late_events,
    sum(h.compute)             AS compute,
    sum(h.storage)             AS storage,
    CASE WHEN bool_and(h.compute_price IS NOT NULL)
         THEN sum(h.compute * h.compute_price * h.k1) END AS compute_cost,
    CASE WHEN bool_and(h.storage_price IS NOT NULL)
         THEN sum(h.storage * h.storage_price * h.k2) END AS storage_cost,
    CASE WHEN bool_and(h.compute_price IS NOT NULL AND h.storage_price IS NOT NULL)
         THEN sum(h.compute * h.compute_price * h.k1 + h.storage * h.storage_price * h.k2) END AS total_cost,
    h.currency,
    COALESCE(bool_and(h.finalizes_at <= t.watermark), false) AS final,
    max(h.updated_at)          AS updated_at,
    bool_or(h.coefficients_assumed) AS coefficients_assumed,
    sum(h.input_tokens)        AS input_tokens,
    sum(h.output_tokens)       AS output_tokens
FROM usage_hourly h
LEFT JOIN topic_watermarks t ON t.topic = h.topic
GROUP BY h.bucket_start, h.model, h.hardware, h.currency;

CREATE VIEW usage_costs_daily AS
SELECT
    d.bucket_start AS window_start,
    d.bucket_start + interval '24 hours' AS window_end,
    d.model,
    d.hardware,
    sum(d.events)::bigint      AS events,
    sum(d.late_events)::bigint AS late_events,
    sum(d.compute)             AS compute,
    sum(d.storage)             AS storage,
    CASE WHEN bool_and(d.compute_price IS NOT NULL)
         THEN sum(d.compute * d.compute_price * d.k1) END AS compute_cost,
    CASE WHEN bool_and(d.storage_price IS NOT NULL)
         THEN sum(d.storage * d.storage_price * d.k2) END AS storage_cost,
    CASE WHEN bool_and(d.compute_price IS NOT NULL AND d.storage_price IS NOT NULL)
         THEN sum(d.compute * d.compute_price * d.k1 + d.storage * d.storage_price * d.k2) END AS total_cost,
    d.currency,
    COALESCE(bool_and(d.finalizes_at <= t.watermark), false) AS final,
    max(d.updated_at)          AS updated_at,
    bool_or(d.coefficients_assumed) AS coefficients_assumed,
    sum(d.input_tokens)        AS input_tokens,
    sum(d.output_tokens)       AS output_tokens
FROM usage_daily d
LEFT JOIN topic_watermarks t ON t.topic = d.topic
GROUP BY d.bucket_start, d.model, d.hardware, d.currency;

-- rejected_event: which configured source the message came in by (issue 18); NULL before.
ALTER TABLE rejected_event ADD COLUMN source text;
