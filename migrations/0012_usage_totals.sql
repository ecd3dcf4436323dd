-- Totals across keys: each window's, hour's and day's usage summed over every (model, hardware,
-- labels, topic, source) per currency and pricedness. A month of hourly roll-ups at 200 keys is
-- 144,000 rows; the same month here is 720 (1,440 with unpriced usage), and the 30 minutes a
-- range's ragged end may read are 30 rows instead of 6,000. Readers that neither filter nor
-- group by a key (`/api/v1/costs` without model, hardware, labels or `by`; budgets without a
-- scope or split) read these instead of the raw windows and roll-ups, and the totals are the
-- same to the last digit.
--
-- Kept by statement triggers on window_usage and the roll-ups, in the transaction of whatever
-- wrote them (a flush, rerate, a rebuild, a hand repair, an instance still on the previous
-- version during a rolling upgrade): they hold exactly the sums of what they total by
-- construction, whoever the writer. Retention drops partitions without firing triggers, and
-- deletes the same range here (a few thousand rows a day at most; src/history/retention.rs).
CREATE TABLE usage_totals (
    -- What is summed: 'window' (window_usage, per window start), 'hour' (usage_hourly) or 'day'
    -- (usage_daily).
    bucket_unit   text        NOT NULL CHECK (bucket_unit IN ('window', 'hour', 'day')),
    bucket_start  timestamptz NOT NULL,
    currency      text        NOT NULL,
    -- Both prices known: the usage is in the costs. Unpriced usage is only in the quantities
    -- (its costs are 0 here, never read as a price of 0).
    priced        boolean     NOT NULL,
    events        bigint      NOT NULL,
    late_events   bigint      NOT NULL,
    compute       numeric     NOT NULL,
    storage       numeric     NOT NULL,
    input_tokens  numeric     NOT NULL,
    output_tokens numeric     NOT NULL,
    -- The sums of the rows' costs (compute x compute price x k1, ...) over priced rows.
    compute_cost  numeric     NOT NULL,
    storage_cost  numeric     NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket_unit, bucket_start, currency, priced)
-- The current window's, hour's and day's rows are updated by nearly every flush: room for HOT
-- updates.
) WITH (fillfactor = 50);

-- Adds `sign` x the rows of a roll-up's transition table to the totals of unit TG_ARGV[0].
-- Two static statements (plans cached for the session), one per transition table: an UPDATE
-- adds its new rows and takes back its old ones.
CREATE FUNCTION costwatch_roll_up_totals() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    unit text := TG_ARGV[0];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM usage_totals WHERE bucket_unit = unit;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO usage_totals AS x (bucket_unit, bucket_start, currency, priced, events, late_events, compute,
            storage, input_tokens, output_tokens, compute_cost, storage_cost)
        SELECT unit, bucket_start, currency, priced, sum(events), sum(late_events), sum(compute), sum(storage),
               sum(input_tokens), sum(output_tokens),
               COALESCE(sum(compute_cost) FILTER (WHERE priced), 0), COALESCE(sum(storage_cost) FILTER (WHERE priced), 0)
        FROM (SELECT *, compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced FROM new_rows) r
        GROUP BY bucket_start, currency, priced
        ON CONFLICT (bucket_unit, bucket_start, currency, priced)
        DO UPDATE SET events = x.events + excluded.events, late_events = x.late_events + excluded.late_events,
                      compute = x.compute + excluded.compute, storage = x.storage + excluded.storage,
                      input_tokens = x.input_tokens + excluded.input_tokens,
                      output_tokens = x.output_tokens + excluded.output_tokens,
                      compute_cost = x.compute_cost + excluded.compute_cost,
                      storage_cost = x.storage_cost + excluded.storage_cost, updated_at = now();
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO usage_totals AS x (bucket_unit, bucket_start, currency, priced, events, late_events, compute,
            storage, input_tokens, output_tokens, compute_cost, storage_cost)
        SELECT unit, bucket_start, currency, priced, -sum(events), -sum(late_events), -sum(compute), -sum(storage),
               -sum(input_tokens), -sum(output_tokens),
               -COALESCE(sum(compute_cost) FILTER (WHERE priced), 0), -COALESCE(sum(storage_cost) FILTER (WHERE priced), 0)
        FROM (SELECT *, compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced FROM old_rows) r
        GROUP BY bucket_start, currency, priced
        ON CONFLICT (bucket_unit, bucket_start, currency, priced)
        DO UPDATE SET events = x.events + excluded.events, late_events = x.late_events + excluded.late_events,
                      compute = x.compute + excluded.compute, storage = x.storage + excluded.storage,
                      input_tokens = x.input_tokens + excluded.input_tokens,
                      output_tokens = x.output_tokens + excluded.output_tokens,
                      compute_cost = x.compute_cost + excluded.compute_cost,
                      storage_cost = x.storage_cost + excluded.storage_cost, updated_at = now();
        -- A total whose usage all moved away (rerate: priced <-> unpriced, another currency) or
        -- was deleted is no row at all, as in the roll-ups.
        DELETE FROM usage_totals
        WHERE bucket_unit = unit AND events = 0 AND late_events = 0 AND compute = 0 AND storage = 0
          AND input_tokens = 0 AND output_tokens = 0 AND compute_cost = 0 AND storage_cost = 0
          AND bucket_start IN (SELECT DISTINCT bucket_start FROM old_rows);
    END IF;
    RETURN NULL;
END $$;

-- The same for window_usage (unit 'window', bucket_start = window_start), whose rows store no
-- cost: it is computed here as readers of raw windows compute it. Written out rather than one
-- EXECUTE'd template for both shapes: static statements keep their plans for the session, and a
-- flush fires these triggers four to six times.
CREATE FUNCTION costwatch_window_totals() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM usage_totals WHERE bucket_unit = 'window';
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO usage_totals AS x (bucket_unit, bucket_start, currency, priced, events, late_events, compute,
            storage, input_tokens, output_tokens, compute_cost, storage_cost)
        SELECT 'window', window_start, currency, priced, sum(events), sum(late_events), sum(compute), sum(storage),
               sum(input_tokens), sum(output_tokens),
               COALESCE(sum(compute * compute_price * k1) FILTER (WHERE priced), 0),
               COALESCE(sum(storage * storage_price * k2) FILTER (WHERE priced), 0)
        FROM (SELECT *, compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced FROM new_rows) r
        GROUP BY window_start, currency, priced
        ON CONFLICT (bucket_unit, bucket_start, currency, priced)
        DO UPDATE SET events = x.events + excluded.events, late_events = x.late_events + excluded.late_events,
                      compute = x.compute + excluded.compute, storage = x.storage + excluded.storage,
                      input_tokens = x.input_tokens + excluded.input_tokens,
                      output_tokens = x.output_tokens + excluded.output_tokens,
                      compute_cost = x.compute_cost + excluded.compute_cost,
                      storage_cost = x.storage_cost + excluded.storage_cost, updated_at = now();
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO usage_totals AS x (bucket_unit, bucket_start, currency, priced, events, late_events, compute,
            storage, input_tokens, output_tokens, compute_cost, storage_cost)
        SELECT 'window', window_start, currency, priced, -sum(events), -sum(late_events), -sum(compute),
               -sum(storage), -sum(input_tokens), -sum(output_tokens),
               -COALESCE(sum(compute * compute_price * k1) FILTER (WHERE priced), 0),
               -COALESCE(sum(storage * storage_price * k2) FILTER (WHERE priced), 0)
        FROM (SELECT *, compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced FROM old_rows) r
        GROUP BY window_start, currency, priced
        ON CONFLICT (bucket_unit, bucket_start, currency, priced)
        DO UPDATE SET events = x.events + excluded.events, late_events = x.late_events + excluded.late_events,
                      compute = x.compute + excluded.compute, storage = x.storage + excluded.storage,
                      input_tokens = x.input_tokens + excluded.input_tokens,
                      output_tokens = x.output_tokens + excluded.output_tokens,
                      compute_cost = x.compute_cost + excluded.compute_cost,
                      storage_cost = x.storage_cost + excluded.storage_cost, updated_at = now();
        DELETE FROM usage_totals
        WHERE bucket_unit = 'window' AND events = 0 AND late_events = 0 AND compute = 0 AND storage = 0
          AND input_tokens = 0 AND output_tokens = 0 AND compute_cost = 0 AND storage_cost = 0
          AND bucket_start IN (SELECT DISTINCT window_start FROM old_rows);
    END IF;
    RETURN NULL;
END $$;

-- Writers wait here until the totals are filled and the triggers are in place (CREATE
-- TRIGGER's lock conflicts with theirs): no write falls between the fill and the triggers.
LOCK TABLE window_usage, usage_hourly, usage_daily IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER window_usage_totals_insert AFTER INSERT ON window_usage
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION costwatch_window_totals();
CREATE TRIGGER window_usage_totals_update AFTER UPDATE ON window_usage
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION costwatch_window_totals();
CREATE TRIGGER window_usage_totals_delete AFTER DELETE ON window_usage
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION costwatch_window_totals();
CREATE TRIGGER window_usage_totals_truncate AFTER TRUNCATE ON window_usage
    FOR EACH STATEMENT EXECUTE FUNCTION costwatch_window_totals();

CREATE TRIGGER usage_hourly_totals_insert AFTER INSERT ON usage_hourly
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('hour');
CREATE TRIGGER usage_hourly_totals_update AFTER UPDATE ON usage_hourly
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('hour');
CREATE TRIGGER usage_hourly_totals_delete AFTER DELETE ON usage_hourly
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('hour');
CREATE TRIGGER usage_hourly_totals_truncate AFTER TRUNCATE ON usage_hourly
    FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('hour');

CREATE TRIGGER usage_daily_totals_insert AFTER INSERT ON usage_daily
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('day');
CREATE TRIGGER usage_daily_totals_update AFTER UPDATE ON usage_daily
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('day');
CREATE TRIGGER usage_daily_totals_delete AFTER DELETE ON usage_daily
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('day');
CREATE TRIGGER usage_daily_totals_truncate AFTER TRUNCATE ON usage_daily
    FOR EACH STATEMENT EXECUTE FUNCTION costwatch_roll_up_totals('day');

-- The history as it is now (an upgrade with history in place): about 10 s for 10 million raw
-- windows on the benchmark machine, during which flushes wait.
INSERT INTO usage_totals (bucket_unit, bucket_start, currency, priced, events, late_events, compute, storage,
    input_tokens, output_tokens, compute_cost, storage_cost)
SELECT unit, bucket_start, currency, priced, sum(events), sum(late_events), sum(compute), sum(storage),
       sum(input_tokens), sum(output_tokens),
       COALESCE(sum(compute_cost) FILTER (WHERE priced), 0), COALESCE(sum(storage_cost) FILTER (WHERE priced), 0)
FROM (SELECT 'window' AS unit, window_start AS bucket_start, currency,
             compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced, events, late_events, compute, storage,
             input_tokens, output_tokens, compute * compute_price * k1 AS compute_cost,
             storage * storage_price * k2 AS storage_cost
      FROM window_usage
      UNION ALL
      SELECT 'hour', bucket_start, currency, compute_price IS NOT NULL AND storage_price IS NOT NULL,
             events, late_events, compute, storage, input_tokens, output_tokens, compute_cost, storage_cost
      FROM usage_hourly
      UNION ALL
      SELECT 'day', bucket_start, currency, compute_price IS NOT NULL AND storage_price IS NOT NULL,
             events, late_events, compute, storage, input_tokens, output_tokens, compute_cost, storage_cost
      FROM usage_daily) r
GROUP BY unit, bucket_start, currency, priced;

-- The totals per UTC hour for dashboards (the shipped one's "Exact spend in range" stat): the
-- columns of usage_costs_hourly without model and hardware. Costs sum priced usage only; the
-- unpriced usage is in the quantities and in unpriced_events.
CREATE VIEW usage_costs_totals_hourly AS
SELECT
    bucket_start AS window_start,
    bucket_start + interval '60 minutes' AS window_end,
    currency,
    sum(events)::bigint      AS events,
    sum(late_events)::bigint AS late_events,
    sum(compute)             AS compute,
    sum(storage)             AS storage,
    COALESCE(sum(compute_cost) FILTER (WHERE priced), 0) AS compute_cost,
    COALESCE(sum(storage_cost) FILTER (WHERE priced), 0) AS storage_cost,
    COALESCE(sum(compute_cost + storage_cost) FILTER (WHERE priced), 0) AS total_cost,
    COALESCE(sum(events) FILTER (WHERE NOT priced), 0)::bigint AS unpriced_events,
    sum(input_tokens)        AS input_tokens,
    sum(output_tokens)       AS output_tokens,
    max(updated_at)          AS updated_at
FROM usage_totals
WHERE bucket_unit = 'hour'
GROUP BY bucket_start, currency;
