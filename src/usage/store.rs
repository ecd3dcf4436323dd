//! The SQL that reads the priced history: cost buckets from `usage_costs` and the newest rows of
//! `rejected_events`.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

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
    pub fn finest_tier(step: Option<Self>) -> &'static str {
        match step {
            Some(CostStep::Window) => "window",
            Some(CostStep::Hour) => "hour",
            Some(CostStep::Day | CostStep::Month) | None => "day",
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

/// Which history to read: windows starting in `[from, to)`, optionally of one model and one
/// hardware target, per bucket of `step` (if any) and per value of each of `by`.
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
    /// One row per value of each of these.
    pub by: &'a [Dimension],
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

/// What a cost table can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// The model's name.
    Model,
    /// The hardware target's name.
    Hardware,
}

impl Dimension {
    /// The column of `usage_costs` it groups by; also its name on the command line.
    pub fn column(self) -> &'static str {
        match self {
            Dimension::Model => "model",
            Dimension::Hardware => "hardware",
        }
    }

    /// Parses `model` or `hardware`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "model" => Some(Dimension::Model),
            "hardware" => Some(Dimension::Hardware),
            _ => None,
        }
    }
}

/// One row of a cost table: a bucket (when a step is asked for) and a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRow {
    /// The bucket's start; `None` without a step (the row covers the whole range).
    pub start: Option<DateTime<Utc>>,
    /// The group's values, in the order of the dimensions asked for.
    pub group: Vec<String>,
    /// Accepted events (duplicates excluded).
    pub events: i64,
    /// Events on unpriced hardware: in the quantities, in no cost.
    pub unpriced_events: i64,
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
            totals: CostTotals::default(),
        };
        for r in rows {
            total.events += r.events;
            total.unpriced_events += r.unpriced_events;
            total.totals.add(&r.totals);
        }
        total
    }
}

/// The cost table of `query`, ordered by bucket and group: the numbers `/api/v1/costs` and
/// `costwatch costs` answer. The SQL is built from fixed column names only ([`Dimension`]).
///
/// Rows come from `usage_between`, so each part of the range is read from the coarsest tier
/// that covers it and the step allows; the totals are the same whichever tier answers. A row
/// without a price is in the quantities and in `unpriced_events`, never in a cost.
pub async fn cost_table(pool: &PgPool, query: &CostQuery<'_>) -> Result<Vec<CostRow>, sqlx::Error> {
    let bucket = match query.step {
        Some(_) => "CASE WHEN $5 = 'window' THEN window_start ELSE date_trunc($5, window_start, 'UTC') END",
        None => "NULL::timestamptz",
    };
    let finest = CostStep::finest_tier(query.step);
    let columns: Vec<&str> = query.by.iter().map(|d| d.column()).collect();
    let group_select: String = columns.iter().map(|c| format!(", {c}")).collect();
    let mut group_by = vec!["1".to_owned()];
    group_by.extend((0..columns.len()).map(|i| (i + 2).to_string()));
    let sql = format!(
        "SELECT {bucket} AS bucket{group_select},
                sum(events)::int8 AS events, sum(compute) AS compute, sum(storage) AS storage,
                COALESCE(sum(compute * compute_price * k1) FILTER (WHERE priced), 0) AS compute_cost,
                COALESCE(sum(storage * storage_price * k2) FILTER (WHERE priced), 0) AS storage_cost,
                COALESCE(sum(compute * compute_price * k1 + storage * storage_price * k2) FILTER (WHERE priced), 0)
                    AS total_cost,
                COALESCE(sum(events) FILTER (WHERE NOT priced), 0)::int8 AS unpriced_events
         FROM (SELECT *, compute_price IS NOT NULL AND storage_price IS NOT NULL AS priced
               FROM usage_between($1, $2, '{finest}')) u
         WHERE ($3::text IS NULL OR model = $3) AND ($4::text IS NULL OR hardware = $4)
         GROUP BY {g} ORDER BY {g}",
        g = group_by.join(", ")
    );
    let mut statement = sqlx::query(&sql)
        .bind(query.from)
        .bind(query.to)
        .bind(query.model)
        .bind(query.hardware);
    if let Some(step) = query.step {
        statement = statement.bind(step.as_str());
    }
    let rows = statement.fetch_all(pool).await?;
    Ok(rows
        .iter()
        .map(|r| CostRow {
            start: r.get("bucket"),
            group: columns.iter().map(|c| r.get::<String, _>(*c)).collect(),
            events: r.get("events"),
            unpriced_events: r.get("unpriced_events"),
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
