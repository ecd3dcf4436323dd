//! Bills: parses a bills CSV (what a provider charged per period and hardware, optionally per
//! model) into validated [`Bill`]s, reporting every problem with its line number; pure, no I/O.
//!
//! The file is RFC 4180 CSV with a header naming the six columns in any order:
//!
//! ```text
//! period_start,period_end,hardware,model,amount,currency
//! 2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,a100-80g,qwen2-7b-instruct,1234.50,USD
//! 2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,jetson-orin,,88.20,USD
//! ```
//!
//! An empty `model` means the bill covers every model on that hardware. Fields may be quoted
//! (`"a,b"`, with `""` for a quote inside), quoted fields may span lines, lines end in LF or
//! CRLF, and a leading UTF-8 byte order mark (as spreadsheets write it) is skipped. Spaces
//! around a value are ignored. Blank lines are skipped.

use std::collections::HashMap;
use std::fmt;
use std::iter::Peekable;
use std::str::Chars;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;

use crate::domain::{HardwareName, ModelName, Money};

/// The columns of a bills file, in the order we write them in docs and examples.
pub const COLUMNS: [&str; 6] = ["period_start", "period_end", "hardware", "model", "amount", "currency"];

/// One billed amount: what `hardware` (and `model`, or every model when `None`) cost over
/// `[period_start, period_end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    /// The first instant billed.
    pub period_start: DateTime<Utc>,
    /// The end of the billed period (exclusive); after `period_start`.
    pub period_end: DateTime<Utc>,
    /// The hardware the bill is for, as events name it.
    pub hardware: HardwareName,
    /// `None` when the bill covers every model on the hardware.
    pub model: Option<ModelName>,
    /// The billed amount; not negative.
    pub amount: Money,
    /// An ISO 4217 code such as `USD`; comparing it with `pricing.currency` is up to the caller.
    pub currency: String,
    /// The line of the file the row starts on (1 is the header).
    pub line: usize,
}

/// One thing wrong with a bills file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillProblem {
    /// The line of the file the problem is on (1 is the header).
    pub line: usize,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for BillProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Why a bills file was refused: every problem found, in line order. Nothing of a file with
/// problems is used, so an import is all or nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid bills file:\n{}",
    .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
)]
pub struct BillsError {
    /// Every problem, sorted by line.
    pub problems: Vec<BillProblem>,
}

/// Parses a whole bills file. Returns every bill, in file order, or every problem.
pub fn parse_bills(input: &str) -> Result<Vec<Bill>, BillsError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let (records, mut problems) = split_records(input);
    let mut records = records.into_iter();

    let header = records.next();
    // A header with a CSV syntax error was left out by `split_records`: the next record is no
    // header, so nothing after it can be read.
    let header_unreadable = problems
        .first()
        .is_some_and(|first| header.as_ref().is_none_or(|h| first.line < h.line));
    if header_unreadable {
        return Err(sorted(problems));
    }
    let Some(header) = header else {
        problems.push(BillProblem {
            line: 1,
            message: format!(
                "the file is empty; its first line must be the header {}",
                COLUMNS.join(",")
            ),
        });
        return Err(sorted(problems));
    };
    let (positions, header_problems) = read_header(&header);
    problems.extend(header_problems);

    let mut bills = Vec::new();
    // Without each known column found exactly once the rows cannot be read, so only the
    // header's problems are reported; with only unknown extra columns they are still checked.
    if let Some(positions) = positions {
        let mut first_line_of: HashMap<BillIdentity, usize> = HashMap::new();
        for record in records {
            let Some(bill) = read_row(&record, header.fields.len(), &positions, &mut problems) else {
                continue;
            };
            let identity = (
                bill.period_start,
                bill.period_end,
                bill.hardware.clone(),
                bill.model.clone(),
            );
            if let Some(first) = first_line_of.get(&identity) {
                problems.push(BillProblem {
                    line: bill.line,
                    message: format!(
                        "duplicates the bill on line {first} (same period_start, period_end, hardware and model)"
                    ),
                });
                continue;
            }
            first_line_of.insert(identity, bill.line);
            bills.push(bill);
        }
    }

    if problems.is_empty() {
        Ok(bills)
    } else {
        Err(sorted(problems))
    }
}

/// The stable identity of a bill, for idempotent re-import: the same (period, hardware, model)
/// always gives the same key, whatever offset the timestamps were written with, and the amount
/// is not part of it (a corrected amount replaces the bill instead of adding a second one).
///
/// The key is a compact JSON array, e.g.
/// `["2026-01-01T00:00:00Z","2026-02-01T00:00:00Z","a100-80g",null]`: names may contain any
/// separator one could pick, and JSON quoting keeps every key unambiguous.
pub fn bill_key(bill: &Bill) -> String {
    let instant = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    serde_json::json!([
        instant(&bill.period_start),
        instant(&bill.period_end),
        bill.hardware.as_str(),
        bill.model.as_ref().map(ModelName::as_str),
    ])
    .to_string()
}

type BillIdentity = (DateTime<Utc>, DateTime<Utc>, HardwareName, Option<ModelName>);

fn sorted(mut problems: Vec<BillProblem>) -> BillsError {
    // Stable: problems of one line keep the order they were found in (column order).
    problems.sort_by_key(|p| p.line);
    BillsError { problems }
}

/// One CSV record: its fields, unquoted, and the line it starts on.
#[derive(Debug)]
struct Record {
    line: usize,
    fields: Vec<String>,
}

/// How a field ended.
enum FieldEnd {
    Comma,
    LineEnd,
    Input,
}

/// Splits RFC 4180 CSV into records. A record with a syntax error is reported and left out;
/// reading goes on at the next line so that later problems are found too.
fn split_records(input: &str) -> (Vec<Record>, Vec<BillProblem>) {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let mut chars = input.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let record_line = line;
        let mut fields = Vec::new();
        loop {
            match read_field(&mut chars, &mut line) {
                Ok((field, FieldEnd::Comma)) => fields.push(field),
                Ok((field, FieldEnd::LineEnd | FieldEnd::Input)) => {
                    fields.push(field);
                    let blank = fields.len() == 1 && fields[0].trim().is_empty();
                    if !blank {
                        records.push(Record {
                            line: record_line,
                            fields,
                        });
                    }
                    break;
                }
                Err(problem) => {
                    problems.push(problem);
                    skip_rest_of_line(&mut chars, &mut line);
                    break;
                }
            }
        }
    }
    (records, problems)
}

/// Reads one field and what ended it; `line` follows every line break consumed, including
/// those inside quotes. A syntax error comes with the line it is on.
fn read_field(chars: &mut Peekable<Chars<'_>>, line: &mut usize) -> Result<(String, FieldEnd), BillProblem> {
    let problem = |line: usize, message: String| BillProblem { line, message };
    let mut field = String::new();
    // Only a quote as the very first character opens a quoted field (RFC 4180 section 2.5).
    if chars.peek() != Some(&'"') {
        loop {
            match chars.next() {
                None => return Ok((field, FieldEnd::Input)),
                Some(',') => return Ok((field, FieldEnd::Comma)),
                Some('\n') => {
                    *line += 1;
                    return Ok((field, FieldEnd::LineEnd));
                }
                Some('\r') if chars.peek() == Some(&'\n') => {}
                Some('"') => {
                    return Err(problem(
                        *line,
                        "a quote inside an unquoted field; quote the whole field and write a quote inside it \
                         as \"\""
                            .into(),
                    ))
                }
                Some(c) => field.push(c),
            }
        }
    }
    chars.next();
    let opened_on = *line;
    loop {
        match chars.next() {
            None => return Err(problem(opened_on, "a quoted field opened here is never closed".into())),
            Some('"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            Some('"') => break,
            Some(c) => {
                if c == '\n' {
                    *line += 1;
                }
                field.push(c);
            }
        }
    }
    match chars.next() {
        None => Ok((field, FieldEnd::Input)),
        Some(',') => Ok((field, FieldEnd::Comma)),
        Some('\n') => {
            *line += 1;
            Ok((field, FieldEnd::LineEnd))
        }
        Some('\r') if chars.peek() == Some(&'\n') => {
            chars.next();
            *line += 1;
            Ok((field, FieldEnd::LineEnd))
        }
        Some(c) => Err(problem(
            *line,
            format!("{c:?} after the closing quote of a field; a quoted field ends at a comma or the end of the line"),
        )),
    }
}

fn skip_rest_of_line(chars: &mut Peekable<Chars<'_>>, line: &mut usize) {
    for c in chars.by_ref() {
        if c == '\n' {
            *line += 1;
            return;
        }
    }
}

/// Where each known column is in a row.
#[derive(Debug, Clone, Copy)]
struct Positions {
    period_start: usize,
    period_end: usize,
    hardware: usize,
    model: usize,
    amount: usize,
    currency: usize,
}

/// Reads the header: the six known columns, each once, in any order, nothing else. Returns
/// where each column is (`None` when one is missing or repeated) and the header's problems.
fn read_header(header: &Record) -> (Option<Positions>, Vec<BillProblem>) {
    let mut problems = Vec::new();
    let mut problem = |message: String| {
        problems.push(BillProblem {
            line: header.line,
            message,
        })
    };
    let mut found: [Vec<usize>; 6] = Default::default();
    for (i, name) in header.fields.iter().enumerate() {
        let normalized = name.trim().to_ascii_lowercase();
        match COLUMNS.iter().position(|c| *c == normalized) {
            Some(known) => found[known].push(i),
            None => problem(format!(
                "unknown column {:?} in the header; the columns are {}",
                name.trim(),
                COLUMNS.join(",")
            )),
        }
    }
    for (name, at) in COLUMNS.iter().zip(&found) {
        match at.len() {
            0 => problem(format!("the header has no {name:?} column")),
            1 => {}
            _ => problem(format!(
                "column {name:?} appears {} times in the header; give it once",
                at.len()
            )),
        }
    }
    let positions = found.iter().all(|at| at.len() == 1).then(|| Positions {
        period_start: found[0][0],
        period_end: found[1][0],
        hardware: found[2][0],
        model: found[3][0],
        amount: found[4][0],
        currency: found[5][0],
    });
    (positions, problems)
}

/// Checks one data row; every problem of the row is pushed, and the bill is returned only when
/// there is none.
fn read_row(record: &Record, width: usize, at: &Positions, problems: &mut Vec<BillProblem>) -> Option<Bill> {
    let line = record.line;
    let before = problems.len();
    let mut problem = |message: String| problems.push(BillProblem { line, message });

    if record.fields.len() != width {
        problem(format!("expected {width} columns, found {}", record.fields.len()));
        return None;
    }
    let field = |i: usize| record.fields[i].trim();

    let timestamp = |name: &str, value: &str| {
        DateTime::parse_from_rfc3339(value)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| format!("{name} {value:?} is not an RFC 3339 timestamp such as 2026-01-01T00:00:00Z"))
    };
    let period_start = timestamp("period_start", field(at.period_start))
        .map_err(&mut problem)
        .ok();
    let period_end = timestamp("period_end", field(at.period_end)).map_err(&mut problem).ok();
    if let (Some(start), Some(end)) = (period_start, period_end) {
        if end <= start {
            problem("period_end must be after period_start".into());
        }
    }

    let hardware = HardwareName::parse(field(at.hardware))
        .map_err(|e| problem(format!("hardware {e}")))
        .ok();
    let model = match field(at.model) {
        "" => Some(None),
        name => ModelName::parse(name)
            .map(Some)
            .map_err(|e| problem(format!("model {e}")))
            .ok(),
    };

    let amount = match parse_amount(field(at.amount)) {
        Some(amount) if amount < Decimal::ZERO => {
            problem(format!("amount must not be negative, got {amount}"));
            None
        }
        Some(amount) => Some(Money(amount)),
        None => {
            problem(format!("amount {:?} is not a decimal number", field(at.amount)));
            None
        }
    };

    let currency = field(at.currency);
    if !(currency.len() == 3 && currency.chars().all(|c| c.is_ascii_uppercase())) {
        problem(format!(
            "currency {currency:?} is not a three-letter ISO 4217 code such as \"USD\""
        ));
    }

    if problems.len() > before {
        return None;
    }
    Some(Bill {
        period_start: period_start?,
        period_end: period_end?,
        hardware: hardware?,
        model: model?,
        amount: amount?,
        currency: currency.to_owned(),
        line,
    })
}

/// An exact decimal such as `1234.50`, `-3` or `1.2E+3`. Stricter than [`Decimal`]'s parser,
/// which also takes `1_000`: a bill amount is either plainly a number or a mistake.
fn parse_amount(text: &str) -> Option<Decimal> {
    let plain = text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E'));
    if text.is_empty() || !plain || !text.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str_exact(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "period_start,period_end,hardware,model,amount,currency\n";

    fn problems(input: &str) -> Vec<String> {
        parse_bills(input)
            .expect_err("the file should be refused")
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_valid_file_gives_typed_bills_with_their_lines() {
        let input = format!(
            "{HEADER}\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,a100-80g,qwen2-7b-instruct,1234.50,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,jetson-orin,,88.2,USD\n"
        );
        let bills = parse_bills(&input).unwrap();
        assert_eq!(bills.len(), 2);
        assert_eq!(
            bills[0],
            Bill {
                period_start: utc("2026-01-01T00:00:00Z"),
                period_end: utc("2026-02-01T00:00:00Z"),
                hardware: HardwareName::parse("a100-80g").unwrap(),
                model: Some(ModelName::parse("qwen2-7b-instruct").unwrap()),
                amount: Money("1234.50".parse().unwrap()),
                currency: "USD".into(),
                line: 2,
            }
        );
        assert_eq!(bills[1].model, None, "an empty model means every model on the hardware");
        assert_eq!(bills[1].line, 3);
    }

    #[test]
    fn amounts_are_exact_decimals() {
        let input =
            format!("{HEADER}2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,h,,0.1000000000000000000000000001,USD\n");
        let bills = parse_bills(&input).unwrap();
        assert_eq!(bills[0].amount.0.to_string(), "0.1000000000000000000000000001");
        let input = format!("{HEADER}2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,h,,1.25E+3,USD\n");
        assert_eq!(parse_bills(&input).unwrap()[0].amount.to_string(), "1250");
    }

    #[test]
    fn quoted_fields_follow_rfc_4180() {
        // A comma and a doubled quote inside quotes, a quoted field spanning two lines, CRLF
        // line ends, a byte order mark, spaces around values, blank lines and columns in
        // another order.
        let input = "\u{feff}currency,amount,model,hardware,period_end,period_start\r\n\
                     \r\n\
                     \"USD\",\"1,5\",\"say \"\"hi\"\"\",\"rack, left\",2026-02-01T00:00:00Z,2026-01-01T00:00:00Z\r\n\
                     USD, 7 ,\"two\nlines\",h,2026-02-01T00:00:00Z,2026-01-01T00:00:00Z\r\n\
                     \n\
                     USD,8,,h,2026-02-01T00:00:00Z,2026-01-01T00:00:00Z";
        let err = parse_bills(input).unwrap_err();
        // "1,5" is one field (so the row has six columns) but not a number.
        assert_eq!(err.problems.len(), 1);
        assert_eq!(
            err.problems[0].to_string(),
            "line 3: amount \"1,5\" is not a decimal number"
        );

        let bills = parse_bills(&input.replace("\"1,5\"", "\"1.5\"")).unwrap();
        assert_eq!(bills[0].model.as_ref().unwrap().as_str(), "say \"hi\"");
        assert_eq!(bills[0].hardware.as_str(), "rack, left");
        assert_eq!(bills[0].amount.to_string(), "1.5");
        assert_eq!(bills[1].model.as_ref().unwrap().as_str(), "two\nlines");
        assert_eq!(bills[1].amount.to_string(), "7");
        assert_eq!(bills[1].line, 4);
        // The quoted line break moved the next row to line 7, after the blank line 6.
        assert_eq!(bills[2].line, 7);
        assert_eq!(bills[2].model, None);
    }

    #[test]
    fn timestamps_with_any_offset_are_the_same_instant() {
        let input = format!(
            "{HEADER}2026-01-01T01:00:00+01:00,2026-01-31T19:00:00-05:00,h,m,1,EUR\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,m,1,EUR\n"
        );
        assert_eq!(
            problems(&input),
            ["line 3: duplicates the bill on line 2 (same period_start, period_end, hardware and model)"]
        );
    }

    #[test]
    fn every_problem_is_listed_with_its_line() {
        let input = format!(
            "{HEADER}\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,m,10,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,m,10\n\
             2026-01-01,2026-02-01T00:00:00Z,h,,10,USD\n\
             2026-02-01T00:00:00Z,2026-02-01T00:00:00Z,h,,10,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,,m,-3.50,usd\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,,12,5,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,,\"12,5\",USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,m,11,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,{},1_000,USD\n",
            "m".repeat(129)
        );
        assert_eq!(
            problems(&input),
            [
                "line 3: expected 6 columns, found 5",
                "line 4: period_start \"2026-01-01\" is not an RFC 3339 timestamp such as 2026-01-01T00:00:00Z",
                "line 5: period_end must be after period_start",
                "line 6: hardware must not be empty",
                "line 6: amount must not be negative, got -3.50",
                "line 6: currency \"usd\" is not a three-letter ISO 4217 code such as \"USD\"",
                "line 7: expected 6 columns, found 7",
                "line 8: amount \"12,5\" is not a decimal number",
                "line 9: duplicates the bill on line 2 (same period_start, period_end, hardware and model)",
                "line 10: model is 129 characters long, the limit is 128",
                "line 10: amount \"1_000\" is not a decimal number",
            ]
        );
        let err = parse_bills(&input).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid bills file:\n  - line 3: expected 6 columns, found 5\n  - line 4: "),
            "{err}"
        );
    }

    #[test]
    fn the_header_must_name_each_column_once() {
        assert_eq!(
            problems("period_start,period_end,hardware,modle,amount,amount\n"),
            [
                "line 1: unknown column \"modle\" in the header; the columns are \
                 period_start,period_end,hardware,model,amount,currency",
                "line 1: the header has no \"model\" column",
                "line 1: column \"amount\" appears 2 times in the header; give it once",
                "line 1: the header has no \"currency\" column",
            ]
        );
        assert_eq!(
            problems(""),
            ["line 1: the file is empty; its first line must be the header \
              period_start,period_end,hardware,model,amount,currency"]
        );
        // Header names are matched without regard to case or surrounding spaces.
        let input = " Period_Start ,PERIOD_END,hardware,model,amount,currency\n";
        assert_eq!(parse_bills(input).unwrap(), []);
    }

    #[test]
    fn rows_are_still_checked_when_the_header_only_has_an_extra_column() {
        let input = "period_start,period_end,hardware,model,amount,currency,note\n\
                     2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,,ten,USD,x\n";
        assert_eq!(
            problems(input),
            [
                "line 1: unknown column \"note\" in the header; the columns are \
                 period_start,period_end,hardware,model,amount,currency",
                "line 2: amount \"ten\" is not a decimal number",
            ]
        );
    }

    #[test]
    fn csv_syntax_errors_are_reported_and_reading_goes_on() {
        let input = format!(
            "{HEADER}\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h\"x,,1,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,\"h\"x,,1,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,,1,EUR,\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,\"h,,1,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,,1,USD\n"
        );
        assert_eq!(
            problems(&input),
            [
                "line 2: a quote inside an unquoted field; quote the whole field and write a quote inside it as \"\"",
                "line 3: 'x' after the closing quote of a field; a quoted field ends at a comma or the end of the line",
                "line 4: expected 6 columns, found 7",
                "line 5: a quoted field opened here is never closed",
            ]
        );
    }

    #[test]
    fn a_header_with_a_syntax_error_is_not_mistaken_for_the_next_line() {
        let input = "period_start,\"period_end\"x,hardware,model,amount,currency\n\
                     2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,h,,1,USD\n";
        assert_eq!(
            problems(input),
            ["line 1: 'x' after the closing quote of a field; a quoted field ends at a comma or the end of the line"]
        );
        assert_eq!(
            problems("period_start,\"period_end"),
            ["line 1: a quoted field opened here is never closed"]
        );
    }

    #[test]
    fn a_header_without_rows_is_no_bills() {
        assert_eq!(parse_bills(HEADER).unwrap(), []);
        assert_eq!(parse_bills(HEADER.trim_end()).unwrap(), []);
    }

    #[test]
    fn bill_key_identifies_period_hardware_and_model_only() {
        let input = format!(
            "{HEADER}\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,a100-80g,,10,USD\n\
             2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,a100-80g,m,10,USD\n\
             2026-01-01T00:00:00.5Z,2026-02-01T00:00:00Z,\"a\"\",b\",\"|\",10,USD\n"
        );
        let bills = parse_bills(&input).unwrap();
        let keys: Vec<String> = bills.iter().map(bill_key).collect();
        assert_eq!(
            keys,
            [
                r#"["2026-01-01T00:00:00Z","2026-02-01T00:00:00Z","a100-80g",null]"#,
                r#"["2026-01-01T00:00:00Z","2026-02-01T00:00:00Z","a100-80g","m"]"#,
                r#"["2026-01-01T00:00:00.500Z","2026-02-01T00:00:00Z","a\",b","|"]"#,
            ]
        );

        // The same bill written with another offset, another amount and on another line keeps
        // its key, so importing a corrected file replaces instead of adding.
        let again = format!("{HEADER}2026-01-01T02:00:00+02:00,2026-02-01T00:00:00Z,a100-80g,,12.5,USD\n");
        assert_eq!(bill_key(&parse_bills(&again).unwrap()[0]), keys[0]);
    }
}
