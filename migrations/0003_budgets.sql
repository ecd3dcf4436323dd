-- Budgets and the alert state machine. `budget` mirrors the configuration of the instance that
-- evaluates (for SQL users and Grafana); `budget_alert` is the memory that makes a restart neither
-- re-page nor forget a firing alert; `alert_delivery` is the outbox of webhook notifications.

CREATE TABLE budget (
    name          text        PRIMARY KEY,
    period        text        NOT NULL CHECK (period IN ('hourly', 'daily', 'weekly', 'monthly')),
    amount        numeric     NOT NULL CHECK (amount > 0),
    currency      text        NOT NULL,
    model_glob    text        NOT NULL,
    hardware_glob text        NOT NULL,
    thresholds    numeric[]   NOT NULL,
    forecast      boolean     NOT NULL,
    drift         jsonb,
    severity      text        NOT NULL,
    time_zone     text        NOT NULL,
    -- False once the budget left the configuration; its alerts are resolved.
    active        boolean     NOT NULL DEFAULT true,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per alert identity (budget, kind and the labels that tell instances apart). A row goes
-- firing -> resolved -> firing ...; every firing starts a new generation.
CREATE TABLE budget_alert (
    alert_key          text        PRIMARY KEY,
    budget             text        NOT NULL,
    kind               text        NOT NULL CHECK (kind IN ('threshold', 'forecast', 'drift', 'unpriced')),
    labels             jsonb       NOT NULL,
    annotations        jsonb       NOT NULL,
    state              text        NOT NULL CHECK (state IN ('firing', 'resolved')),
    generation         integer     NOT NULL DEFAULT 1,
    starts_at          timestamptz NOT NULL,
    ends_at            timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- True while Alertmanager has not acknowledged the current state (a firing alert is re-sent
    -- anyway; a resolution is re-sent until acknowledged).
    alertmanager_pending boolean   NOT NULL DEFAULT true,
    alertmanager_sent_at timestamptz
);
CREATE INDEX budget_alert_firing ON budget_alert (budget) WHERE state = 'firing';

-- One row per (transition, webhook): written in the transaction that records the transition, so
-- a transition is never without its notifications, and delivered once (`delivered_at`).
CREATE TABLE alert_delivery (
    id              bigserial   PRIMARY KEY,
    alert_key       text        NOT NULL REFERENCES budget_alert (alert_key),
    generation      integer     NOT NULL,
    status          text        NOT NULL CHECK (status IN ('firing', 'resolved')),
    receiver        text        NOT NULL,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text,
    UNIQUE (alert_key, generation, status, receiver)
);
CREATE INDEX alert_delivery_pending ON alert_delivery (receiver, id) WHERE delivered_at IS NULL;
