//! The SQL that reads the priced history: cost buckets from `usage_costs` and the newest rows of
//! `rejected_events`.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

use super::query::{Dimension, LabelFilter};
use crate::history::read::{self, Detail, Finest, Part, Slice};

/// The width of one bucket of a cost series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostStep {
    /// One bucket per window as stored.
    Window,
    /// UTC hours.
    Hour,
    /// UTC days.
    Day,
    /// UTC calendar months.
    Month,
}

impl CostStep {
    /// Parses `window`, `hour` or `day`.
    pub fn parse(name: &str) -> Option<Self> {
        [CostStep::Window, CostStep::Hour, CostStep::Day, CostStep::Month]
            .into_iter()
            .find(|s| s.as_str() == name)
    }

    /// A bucket's width in seconds, counting a window as a minute (the default size).
    pub fn approx_seconds(self) -> i64 {
        match self {
            CostStep::Window => 60,
            CostStep::Hour => 3600,
            CostStep::Day => 86_400,
            CostStep::Month => 30 * 86_400,
        }
    }

    /// The finest tier a bucket of this width can be answered from (`usage_between`'s third
    /// argument): a bucket never splits a roll-up row.
    pub fn finest_tier(step: Option<Self>) -> Finest {
        match step {
            Some(CostStep::Window) => Finest::Window,
            Some(CostStep::Hour) => Finest::Hour,
            Some(CostStep::Day | CostStep::Month) | None => Finest::Day,
        }
    }

    /// The value the `step` query parameter takes, and `date_trunc`'s unit for hours and days.
    pub fn as_str(self) -> &'static str {
        match self {
            CostStep::Window => "window",
            CostStep::Hour => "hour",
            CostStep::Day => "day",
            CostStep::Month => "month",
        }
    }
}

/// Which history to read: windows starting in `[from, to)`, optionally of one model, one
/// hardware target and some label values, per bucket of `step` (if any) and per value of each of
/// `by`.
#[derive(Debug, Clone)]
pub struct CostQuery<'a> {
    /// Windows starting at or after this.
    pub from: DateTime<Utc>,
    /// Windows starting before this.
    pub to: DateTime<Utc>,
    /// One row per bucket of this width; `None` for one row over the whole range.
    pub step: Option<CostStep>,
    /// Only this model, when set.
    pub model: Option<&'a str>,
    /// Only this hardware target, when set.
    pub hardware: Option<&'a str>,
    /// Only rows carrying every one of these labels with these values.
    pub labels: &'a LabelFilter,
    /// One row per value of each of these.
    pub by: &'a [Dimension],
}

impl CostQuery<'_> {
    /// What the query reads of each row: the totals across keys when it filters and groups by
    /// none (the dashboards' spend over time, a budget-like total), the keys otherwise.
    pub fn detail(&self) -> Detail {
        if self.model.is_none() && self.hardware.is_none() && self.labels.is_empty() && self.by.is_empty() {
            Detail::Totals
        } else {
            Detail::Keys
        }
    }
}

/// ΣT, ΣS and the three costs of some usage, exact. Unpriced usage is in `compute` and `storage`
/// but in no cost (a NULL cost is never a 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CostTotals {
    /// ΣT.
    pub compute: Decimal,
    /// ΣS.
    pub storage: Decimal,
    /// Σ C_C·k1·T over priced usage.
    pub compute_cost: Decimal,
    /// Σ C_S·k2·S over priced usage.
    pub storage_cost: Decimal,
    /// The sum of both costs.
    pub total_cost: Decimal,
}

impl CostTotals {
    /// Adds `other`'s sums to these, exactly.
    pub fn add(&mut self, other: &CostTotals) {
        self.compute += other.compute;
        self.storage += other.storage;
        self.compute_cost += other.compute_cost;
        self.storage_cost += other.storage_cost;
        self.total_cost += other.total_cost;
    }
}

/// One rejected message as `/api/v1/rejected` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedItem {
    /// When costwatch rejected the message.
    pub received_at: DateTime<Utc>,
    /// The topic it came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Why, machine-readable: a [`RejectCode`](crate::ingest::event::RejectCode) as text.
    pub reason_code: String,
    /// Why, for a person.
    pub reason: String,
    /// The kept payload as text, cut to `text_chars` characters.
    pub payload_text: Option<String>,
    /// Less than the whole message is shown (costwatch kept a prefix, or the text was cut).
    pub payload_truncated: bool,
    /// The whole message's size in bytes.
    pub payload_bytes: i64,
    /// SHA-256 of the whole message, hex, to find the producer's copy.
    pub payload_sha256: String,
}

/// The newest `limit` rejected messages. Payload text is cut in the query, so that not even the
/// rows fetched hold whole payloads.
pub async fn newest_rejected(pool: &PgPool, limit: i64, text_chars: i32) -> Result<Vec<RejectedItem>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT received_at, topic, partition, kafka_offset, reason_code, reason_message,
                left(payload_text, $2) AS payload_text,
                payload_truncated
                    OR COALESCE(octet_length(payload_text) > octet_length(left(payload_text, $2)), false)
                    AS payload_truncated,
                payload_size AS payload_bytes, payload_sha256
         FROM rejected_events ORDER BY received_at DESC, kafka_offset DESC LIMIT $1",
    )
    .bind(limit)
    .bind(text_chars)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| RejectedItem {
            received_at: r.get("received_at"),
            topic: r.get("topic"),
            partition: r.get("partition"),
            offset: r.get("kafka_offset"),
            reason_code: r.get("reason_code"),
            reason: r.get("reason_message"),
            payload_text: r.get("payload_text"),
            payload_truncated: r.get("payload_truncated"),
            payload_bytes: r.get("payload_bytes"),
            payload_sha256: r.get("payload_sha256"),
        })
        .collect())
}

/// How many rejected messages were received before `before` (what retention would delete).
pub async fn rejected_before(pool: &PgPool, before: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM rejected_event WHERE received_at < $1")
        .bind(before)
        .fetch_one(pool)
        .await
}

/// One row of a cost table: a bucket (when a step is asked for) and a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRow {
    /// The bucket's start; `None` without a step (the row covers the whole range).
    pub start: Option<DateTime<Utc>>,
    /// The group's values, in the order of the dimensions asked for; `None` for rows without
    /// the label grouped by.
    pub group: Vec<Option<String>>,
    /// Accepted events (duplicates excluded).
    pub events: i64,
    /// Events on unpriced hardware: in the quantities, in no cost.
    pub unpriced_events: i64,
    /// ΣT of the unpriced events (part of `totals.compute`, in no cost).
    pub unpriced_compute: Decimal,
    /// ΣS of the unpriced events (part of `totals.storage`, in no cost).
    pub unpriced_storage: Decimal,
    /// The row's quantities and costs.
    pub totals: CostTotals,
}

impl CostRow {
    /// The sum of `rows`: no bucket, no group.
    pub fn total(rows: &[CostRow]) -> CostRow {
        let mut total = CostRow {
            start: None,
            group: Vec::new(),
            events: 0,
            unpriced_events: 0,
            unpriced_compute: Decimal::ZERO,
            unpriced_storage: Decimal::ZERO,
            totals: CostTotals::default(),
        };
        for r in rows {
            total.events += r.events;
            total.unpriced_events += r.unpriced_events;
            total.unpriced_compute += r.unpriced_compute;
            total.unpriced_storage += r.unpriced_storage;
            total.totals.add(&r.totals);
        }
        total
    }
}

/// The figures of a cost table, summed over the rows of a group. A row is priced when both its
/// rates are known; an unpriced row's usage is in the quantities and in the `unpriced_*`
/// figures, never in a cost (a NULL cost is never a 0). Priced rows keep their cost even when a
/// window has unpriced rows too (`usage_costs` prices such a window not at all).
/// The sums of the first stage, per stored bucket start, group and pricedness: five plain
/// sums (each numeric aggregate costs about a microsecond a row; thirty days of hourly roll-ups
/// for 200 keys are 144,000 rows).
const PER_START: &str = "sum(events) AS events, sum(compute) AS compute, sum(storage) AS storage,
    sum(compute_cost) AS compute_cost, sum(storage_cost) AS storage_cost";

/// The figures of a cost row from the first stage's sums: costs over priced usage only, and the
/// unpriced usage apart (a NULL cost is never a 0).
const FIGURES: &str = "sum(events)::int8 AS events, sum(compute) AS compute, sum(storage) AS storage,
    COALESCE(sum(compute_cost) FILTER (WHERE priced), 0) AS compute_cost,
    COALESCE(sum(storage_cost) FILTER (WHERE priced), 0) AS storage_cost,
    COALESCE(sum(compute_cost + storage_cost) FILTER (WHERE priced), 0) AS total_cost,
    COALESCE(sum(events) FILTER (WHERE NOT priced), 0)::int8 AS unpriced_events,
    COALESCE(sum(compute) FILTER (WHERE NOT priced), 0) AS unpriced_compute,
    COALESCE(sum(storage) FILTER (WHERE NOT priced), 0) AS unpriced_storage";

/// The SQL of [`cost_table`] over `slices` of its range. Each part is read from the coarsest tier
/// (window rows, hourly or daily roll-ups, all with the same columns, labels included) that
/// covers it and the step allows, as `usage_between` would ([`read::slices`]), or from the totals
/// across keys when the query reads no key ([`CostQuery::detail`]); a part taken back
/// out of a widened hour has its quantities negated. The figures are the same whichever tier
/// answers. Parameters: $1 and $2 the range (bound, read through the parts), $3 model, $4
/// hardware, $5 the label filter (a JSON object the row's labels must contain), $6 the step,
/// then one per label dimension (its name), then each slice's bounds. Column names come
/// from [`GROUP_COLUMNS`](super::query::GROUP_COLUMNS) only; label names are always bound,
/// never spliced.
fn cost_sql(query: &CostQuery<'_>, slices: &[Slice]) -> String {
    let bucket = match query.step {
        Some(_) => "CASE WHEN $6 = 'window' THEN window_start ELSE date_trunc($6, window_start, 'UTC') END",
        None => "NULL::timestamptz",
    };
    let mut next_parameter = 7;
    let group_select: String = query
        .by
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dimension::Column(column) => format!(", {column}::text AS g{i}"),
            Dimension::Label(_) => {
                next_parameter += 1;
                format!(", labels->>${}::text AS g{i}", next_parameter - 1)
            }
        })
        .collect();
    let group_by: Vec<String> = (1..=query.by.len() + 1).map(|i| i.to_string()).collect();
    let outer_select: String = (0..query.by.len()).map(|i| format!(", g{i}")).collect();
    // Two stages: the rows are summed per stored bucket start (and group, and whether priced)
    // first, with no per-row time zone arithmetic and few aggregates; only those sums are cut
    // into the step's buckets and split into priced and unpriced figures. Thirty days of hourly
    // roll-ups for 200 keys took 750 ms in one stage. A bucket or group whose parts cancel out
    // (usage only in minutes taken back out) had no usage in the range: it is left out.
    format!(
        "SELECT {bucket} AS bucket{outer_select}, {FIGURES}
         FROM (SELECT window_start{group_select}, priced, {PER_START}
               FROM ({slices}) AS u
               WHERE ($3::text IS NULL OR model = $3) AND ($4::text IS NULL OR hardware = $4)
                 AND ($5::jsonb = '{{}}'::jsonb OR labels @> $5::jsonb)
               GROUP BY {g}, priced) AS per_start
         GROUP BY {g} HAVING sum(events) <> 0 ORDER BY {g}",
        slices = read::union_sql(slices, next_parameter),
        g = group_by.join(", ")
    )
}

/// The cost table of `query`, ordered by bucket and group: the numbers `/api/v1/costs`,
/// `/api/v1/report`, `costwatch costs` and `costwatch report` answer.
pub async fn cost_table(pool: &PgPool, query: &CostQuery<'_>) -> Result<Vec<CostRow>, sqlx::Error> {
    // Buckets of windows are answered from windows: no part of an hour may be taken back out.
    let parts = match query.step {
        Some(CostStep::Window) => vec![Part {
            sign: 1,
            from: query.from,
            to: query.to,
        }],
        _ => read::parts(query.from, query.to, Utc::now()),
    };
    let finest = CostStep::finest_tier(query.step);
    let slices: Vec<Slice> = parts
        .iter()
        .flat_map(|part| read::slices(*part, finest, query.detail()))
        .collect();
    let sql = cost_sql(query, &slices);
    let mut statement = sqlx::query(&sql)
        .bind(query.from)
        .bind(query.to)
        .bind(query.model)
        .bind(query.hardware)
        .bind(query.labels.to_json())
        .bind(query.step.map(CostStep::as_str));
    for dimension in query.by {
        if let Dimension::Label(name) = dimension {
            statement = statement.bind(name);
        }
    }
    for slice in &slices {
        statement = statement.bind(slice.from).bind(slice.to);
    }
    let rows = statement.fetch_all(pool).await?;
    Ok(rows
        .iter()
        .map(|r| CostRow {
            start: r.get("bucket"),
            group: (0..query.by.len()).map(|i| r.get(format!("g{i}").as_str())).collect(),
            events: r.get("events"),
            unpriced_events: r.get("unpriced_events"),
            unpriced_compute: r.get("unpriced_compute"),
            unpriced_storage: r.get("unpriced_storage"),
            totals: CostTotals {
                compute: r.get("compute"),
                storage: r.get("storage"),
                compute_cost: r.get("compute_cost"),
                storage_cost: r.get("storage_cost"),
                total_cost: r.get("total_cost"),
            },
        })
        .collect())
}
