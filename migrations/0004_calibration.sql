-- Calibration: imported bills, fitted coefficient versions, and which prices and coefficients
-- priced each window row.

-- One row per billed (period, hardware, model). `bill_key` is the identity of the bill
-- (src/bills.rs `bill_key`): re-importing a file finds every bill already there, and a corrected
-- amount replaces the old one instead of adding a second bill.
CREATE TABLE bill (
    id           bigserial   PRIMARY KEY,
    bill_key     text        NOT NULL UNIQUE,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    hardware     text        NOT NULL,
    -- NULL: the bill covers every model on the hardware.
    model        text,
    amount       numeric     NOT NULL CHECK (amount >= 0),
    currency     text        NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (period_end > period_start)
);
CREATE INDEX bill_period ON bill (period_start, period_end);

-- k1 and k2 fitted by `costwatch calibrate`. The newest (highest id) version in force for a
-- window's start prices it: a (model, hardware) version first, then the hardware default
-- (model NULL), then the configured coefficients, then 1 and 1. Rows are never updated, so a
-- window row's `coefficient_version` always says which numbers priced it.
CREATE TABLE coefficient_version (
    id             bigserial   PRIMARY KEY,
    model          text,
    hardware       text        NOT NULL,
    k1             numeric     NOT NULL CHECK (k1 >= 0),
    k2             numeric     NOT NULL CHECK (k2 >= 0),
    effective_from timestamptz NOT NULL,
    -- Fit statistics, as `calibrate` printed them.
    periods        integer     NOT NULL,
    r_squared      numeric,
    mape           numeric,
    max_residual   numeric     NOT NULL,
    warnings       jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- The bills fitted: those inside [fitted_from, fitted_to) (NULL: unbounded).
    fitted_from    timestamptz,
    fitted_to      timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX coefficient_version_pair ON coefficient_version (hardware, model, id DESC);

-- NULL coefficient_version: priced with configured coefficients (or 1 and 1); NULL price_id:
-- unpriced (or written before this migration). `price_id` identifies the configured price entry
-- (hardware, C_C, C_S, currency) by a stable hash, see src/pricing.rs `PriceId`.
ALTER TABLE window_usage
    ADD COLUMN coefficient_version bigint REFERENCES coefficient_version (id),
    ADD COLUMN price_id text;
