//! The standard `process_*` metrics (as every Prometheus client library exports them), read from
//! `/proc/self` at each scrape. Empty where there is no `/proc` (not Linux).

use std::fmt::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// `/proc` reports CPU times in clock ticks of USER_HZ, which the kernel fixes at 100 for
/// userspace on every architecture (the Prometheus Go client assumes the same).
const TICKS_PER_SECOND: f64 = 100.0;

static STARTED: OnceLock<f64> = OnceLock::new();

/// Remembers when the process started, for `process_start_time_seconds` where `/proc/stat` is
/// hidden (systemd's `ProcSubset=pid`, which the shipped unit sets). Call early.
pub fn mark_start() {
    STARTED.get_or_init(now);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The fields of `/proc/self/stat` the metrics need.
#[derive(Debug, PartialEq)]
struct Stat {
    cpu_ticks: u64,
    threads: u64,
    start_ticks_after_boot: u64,
    virtual_bytes: u64,
}

/// Parses `/proc/<pid>/stat`. The second field is the command name in parentheses, which may
/// itself hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    // After the name comes field 3 (state); field n is at index n - 3.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)?,
        start_ticks_after_boot: field(22)?,
        virtual_bytes: field(23)?,
    })
}

/// The soft limit of one row of `/proc/<pid>/limits` (e.g. "Max open files"); `None` when
/// unlimited.
fn parse_limit(text: &str, row: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(row))?;
    line[row.len()..].split_whitespace().next()?.parse().ok()
}

/// A `kB` row of `/proc/<pid>/status` (e.g. "VmRSS:"), in bytes.
fn parse_status_kib(text: &str, row: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(row))?;
    let kib: u64 = line[row.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The boot time (`btime`) from `/proc/stat`, in Unix seconds.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

pub fn render() -> String {
    let Some(stat) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
    else {
        return String::new();
    };
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).ok();
    let start = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_boot_time(&s))
        .map(|boot| boot as f64 + stat.start_ticks_after_boot as f64 / TICKS_PER_SECOND)
        .or_else(|| STARTED.get().copied());

    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(value) = value {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
    };
    metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        Some(stat.cpu_ticks as f64 / TICKS_PER_SECOND),
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        parse_status_kib(&status, "VmRSS:").map(|b| b as f64),
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        Some(stat.virtual_bytes as f64),
    );
    metric(
        "process_virtual_memory_max_bytes",
        "gauge",
        "Maximum amount of virtual memory available in bytes.",
        // Unlimited is reported as the largest u64, as the Go client does, so that dashboards
        // dividing by it get a ratio near 0 rather than a negative one.
        Some(parse_limit(&limits, "Max address space").map_or(u64::MAX as f64, |b| b as f64)),
    );
    metric(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        // The directory listing itself holds one descriptor while it is read.
        open_fds.map(|n| n.saturating_sub(1) as f64),
    );
    metric(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        parse_limit(&limits, "Max open files").map(|n| n as f64),
    );
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        start,
    );
    metric(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        Some(stat.threads as f64),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (cost (watch) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                cpu_ticks: 300,
                threads: 7,
                start_ticks_after_boot: 123456,
                virtual_bytes: 987654321,
            })
        );
    }

    #[test]
    fn limits_status_and_boot_time_are_read_by_row() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n\
                      Max address space         unlimited            unlimited            bytes     \n";
        assert_eq!(parse_limit(limits, "Max open files"), Some(1024));
        assert_eq!(parse_limit(limits, "Max address space"), None);
        assert_eq!(
            parse_status_kib("Name:\tcostwatch\nVmRSS:\t   8192 kB\n", "VmRSS:"),
            Some(8 << 20)
        );
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1767225600\nprocesses 9\n"),
            Some(1767225600)
        );
    }
}
