//! Cost tables as people and programs read them: JSON objects, CSV and aligned text, one set of
//! helpers for `costwatch costs`, `costwatch report`, `/api/v1/costs` and `/api/v1/report`, so
//! their figures are spelled the same everywhere; pure.

use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::query::LabelFilter;
use super::store::{CostRow, CostStep};

/// What a cost table is of, for its JSON document.
#[derive(Debug, Clone, Copy)]
pub struct TableScope<'a> {
    /// Windows starting at or after this.
    pub from: chrono::DateTime<chrono::Utc>,
    /// Windows starting before this.
    pub to: chrono::DateTime<chrono::Utc>,
    /// The bucket width, if the table has buckets.
    pub step: Option<CostStep>,
    /// The names of the dimensions grouped by, in order.
    pub names: &'a [String],
    /// The label filters applied.
    pub labels: &'a LabelFilter,
    /// The currency of every cost.
    pub currency: &'a str,
}

/// A cost table as one JSON document: its scope, its `rows` and their `totals`. What
/// `costwatch costs --format json`, `costwatch report --format json` and `/api/v1/report` print.
pub fn table_json(scope: &TableScope<'_>, rows: &[CostRow], total: &CostRow) -> Value {
    json!({
        "from": scope.from,
        "to": scope.to,
        "step": scope.step.map(CostStep::as_str),
        "by": scope.names,
        "labels": scope.labels.to_json(),
        "currency": scope.currency,
        "rows": rows.iter().map(|r| cost_json(r, scope.names)).collect::<Vec<_>>(),
        "totals": cost_json(total, &[]),
    })
}

/// The figures of a cost row, in every format's order. The `unpriced_*` figures are part of
/// `events`, `compute` and `storage` and of no cost.
pub const COST_FIGURES: [&str; 9] = [
    "events",
    "compute",
    "storage",
    "compute_cost",
    "storage_cost",
    "total_cost",
    "unpriced_events",
    "unpriced_compute",
    "unpriced_storage",
];

/// How a table shows a row without the label grouped by (JSON has `null`, CSV an empty field).
pub const NO_VALUE: &str = "(none)";

/// A decimal exactly, without trailing zeros.
fn exact(d: Decimal) -> String {
    d.normalize().to_string()
}

/// A row's figures as text, in [`COST_FIGURES`] order.
pub fn cost_figures(r: &CostRow) -> Vec<String> {
    let t = &r.totals;
    vec![
        r.events.to_string(),
        exact(t.compute),
        exact(t.storage),
        exact(t.compute_cost),
        exact(t.storage_cost),
        exact(t.total_cost),
        r.unpriced_events.to_string(),
        exact(r.unpriced_compute),
        exact(r.unpriced_storage),
    ]
}

/// A row as a JSON object: its bucket (if any), its group (named by `names`, `null` where a
/// row has no such label) and its figures, the counts as numbers and the decimals as strings
/// (exact).
pub fn cost_json(r: &CostRow, names: &[String]) -> Value {
    let mut v = json!({});
    if let Some(start) = r.start {
        v["start"] = json!(start);
    }
    for (name, value) in names.iter().zip(&r.group) {
        v[name.as_str()] = json!(value);
    }
    for (name, figure) in COST_FIGURES.iter().zip(cost_figures(r)) {
        v[*name] = match *name {
            "events" => json!(r.events),
            "unpriced_events" => json!(r.unpriced_events),
            _ => json!(figure),
        };
    }
    v
}

/// The header and one line per row, for the table and the CSV; `none` stands for a missing
/// label value.
pub fn cost_lines(rows: &[CostRow], names: &[String], with_start: bool, none: &str) -> Vec<Vec<String>> {
    let mut header: Vec<String> = Vec::new();
    if with_start {
        header.push("start".into());
    }
    header.extend(names.iter().cloned());
    header.extend(COST_FIGURES.map(String::from));
    let mut lines = vec![header];
    for r in rows {
        let mut line: Vec<String> = r
            .start
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            .into_iter()
            .collect();
        line.extend(r.group.iter().map(|g| g.clone().unwrap_or_else(|| none.to_owned())));
        line.extend(cost_figures(r));
        lines.push(line);
    }
    lines
}

/// The rows as CSV with a header line (RFC 4180 quoting); no total line, a CSV reader sums the
/// rows itself.
pub fn cost_csv(rows: &[CostRow], names: &[String], with_start: bool) -> String {
    let mut out = String::new();
    for line in cost_lines(rows, names, with_start, "") {
        let fields: Vec<String> = line.iter().map(|f| csv_field(f)).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// The rows as an aligned text table, with a last line `total (<currency>)` carrying `total`.
pub fn cost_text(rows: &[CostRow], total: &CostRow, names: &[String], with_start: bool, currency: &str) -> String {
    let mut table = cost_lines(rows, names, with_start, NO_VALUE);
    let mut last = vec![format!("total ({currency})")];
    last.resize(table[0].len() - COST_FIGURES.len(), String::new());
    last.extend(cost_figures(total));
    table.push(last);
    let widths: Vec<usize> = (0..table[0].len())
        .map(|i| table.iter().map(|l| l[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in &table {
        let cells: Vec<String> = line.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One CSV field, quoted when it must be (RFC 4180).
pub fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::CostTotals;

    fn row(group: &[Option<&str>], events: i64, cost: &str, unpriced: i64) -> CostRow {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        CostRow {
            start: None,
            group: group.iter().map(|g| g.map(str::to_owned)).collect(),
            events,
            unpriced_events: unpriced,
            unpriced_compute: d("1.50"),
            unpriced_storage: Decimal::ZERO,
            totals: CostTotals {
                compute: d("10.50"),
                storage: d("2"),
                compute_cost: d(cost),
                storage_cost: Decimal::ZERO,
                total_cost: d(cost),
            },
        }
    }

    #[test]
    fn a_missing_label_is_null_in_json_empty_in_csv_and_named_in_the_table() {
        let names = vec!["tenant".to_owned(), "model".to_owned()];
        let rows = vec![
            row(&[Some("a,b"), Some("m")], 3, "1.20", 1),
            row(&[None, Some("m")], 1, "0", 0),
        ];
        let v = cost_json(&rows[1], &names);
        assert_eq!(v["tenant"], Value::Null);
        assert_eq!(v["compute"], "10.5");
        assert_eq!(v["unpriced_compute"], "1.5");
        assert_eq!(v["events"], 1);
        assert_eq!(
            cost_csv(&rows, &names, false),
            "tenant,model,events,compute,storage,compute_cost,storage_cost,total_cost,unpriced_events,unpriced_compute,unpriced_storage\n\
             \"a,b\",m,3,10.5,2,1.2,0,1.2,1,1.5,0\n\
             ,m,1,10.5,2,0,0,0,0,1.5,0\n"
        );
        let total = CostRow::total(&rows);
        let text = cost_text(&rows, &total, &names, false, "USD");
        assert_eq!(
            text,
            "tenant       model  events  compute  storage  compute_cost  storage_cost  total_cost  unpriced_events  unpriced_compute  unpriced_storage\n\
             a,b          m      3       10.5     2        1.2           0             1.2         1                1.5               0\n\
             (none)       m      1       10.5     2        0             0             0           0                1.5               0\n\
             total (USD)         4       21       4        1.2           0             1.2         1                3                 0\n"
        );
    }
}
