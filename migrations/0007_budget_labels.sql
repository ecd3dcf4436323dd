-- Budgets by label (issue 19): the label globs of a budget's `match` and its `split_by` labels,
-- mirrored like the rest of the budget's configuration for SQL users and Grafana. Each split's
-- alerts are rows of `budget_alert` as before: the split labels are part of their key.
ALTER TABLE budget
    ADD COLUMN label_globs jsonb  NOT NULL DEFAULT '{}',
    ADD COLUMN split_by    text[] NOT NULL DEFAULT '{}';

-- 0003 allowed only the periods that existed then; quarterly and yearly budgets could not be
-- recorded, so no instance could lead alerting with one configured.
ALTER TABLE budget DROP CONSTRAINT IF EXISTS budget_period_check;
ALTER TABLE budget ADD CONSTRAINT budget_period_check
    CHECK (period IN ('hourly', 'daily', 'weekly', 'monthly', 'quarterly', 'yearly'));
