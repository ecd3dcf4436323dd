-- costwatch backbone schema. The views `usage_costs` and `rejected_events` are the stable,
-- documented contract; the tables behind them may change between releases.

-- One row per (window, model, hardware, label set). Sums are added to in place by every flush;
-- prices are the ones in force at the row's last write. Costs are derived in the view so that
-- they are always exactly price * coefficient * sum.
CREATE TABLE window_usage (
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    model         text        NOT NULL,
    hardware      text        NOT NULL,
    labels        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    events        bigint      NOT NULL,
    late_events   bigint      NOT NULL DEFAULT 0,
    compute       numeric     NOT NULL,
    storage       numeric     NOT NULL,
    -- NULL prices mean the hardware is unpriced: its cost is unknown, never zero.
    compute_price numeric,
    storage_price numeric,
    k1            numeric,
    k2            numeric,
    currency      text        NOT NULL,
    -- window_end + allowed lateness: the row is final once every partition's watermark is past it.
    finalizes_at  timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, model, hardware, labels)
);
CREATE INDEX window_usage_model_hardware ON window_usage (model, hardware, window_start);

-- Where each partition's consumption stands. Written in the same transaction as the sums it
-- produced: this row is the exactly-once guarantee.
CREATE TABLE partition_progress (
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    -- The first offset not yet counted; NULL until something was.
    next_offset  bigint,
    -- The largest accepted event time in the partition.
    watermark    timestamptz,
    -- Fencing token, bumped by every claim; a flush only lands while it still holds the epoch.
    epoch        bigint      NOT NULL,
    owner        text        NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Event ids inside the dedup horizon, per partition.
CREATE TABLE seen_event (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    event_id    text        NOT NULL,
    event_time  timestamptz NOT NULL,
    PRIMARY KEY (topic, partition, event_id)
);
CREATE INDEX seen_event_time ON seen_event (topic, partition, event_time);

CREATE TABLE rejected_event (
    id             bigserial   PRIMARY KEY,
    received_at    timestamptz NOT NULL DEFAULT now(),
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    kafka_offset   bigint      NOT NULL,
    reason_code    text        NOT NULL,
    reason_message text        NOT NULL,
    payload        bytea       NOT NULL,
    -- The payload as text where it is valid UTF-8 without NUL bytes, for humans.
    payload_text   text,
    UNIQUE (topic, partition, kafka_offset)
);
CREATE INDEX rejected_event_received ON rejected_event (received_at);

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
    COALESCE(bool_and(w.finalizes_at <= (SELECT min(p.watermark) FROM partition_progress p)), false) AS final,
    max(w.updated_at)          AS updated_at
FROM window_usage w
GROUP BY w.window_start, w.window_end, w.model, w.hardware, w.currency;

-- The same, per label set, for group-by on labels (e.g. labels->>'tenant').
CREATE VIEW usage_costs_by_labels AS
SELECT
    w.window_start, w.window_end, w.model, w.hardware, w.labels,
    w.events, w.late_events, w.compute, w.storage,
    w.compute * w.compute_price * w.k1 AS compute_cost,
    w.storage * w.storage_price * w.k2 AS storage_cost,
    w.compute * w.compute_price * w.k1 + w.storage * w.storage_price * w.k2 AS total_cost,
    w.currency
FROM window_usage w;

CREATE VIEW rejected_events AS
SELECT
    r.received_at,
    r.topic,
    r.partition,
    r.kafka_offset,
    r.reason_code || ': ' || r.reason_message AS reason,
    r.reason_code,
    r.reason_message,
    r.payload,
    r.payload_text
FROM rejected_event r;
