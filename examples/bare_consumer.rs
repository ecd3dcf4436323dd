//! The benchmark baseline: a bare rdkafka consumer that joins a fresh group, reads a topic from
//! the beginning and only counts messages (and their bytes) until it has seen `--count`. What it
//! reaches is the ceiling this machine and broker allow; `scripts/bench.sh` runs it side by side
//! with `costwatch run`.
//!
//! Prints one JSON line: messages, bytes, seconds from process start to the first and the last
//! message, and the process's own CPU time and peak RSS (from /proc/self) at that moment.
//!
//! cargo run --release --example bare_consumer -- --brokers 127.0.0.1:9092 --topic T --count N

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Stop after this many messages.
    #[arg(long)]
    count: u64,
    /// Consumer group (default: a fresh one, so the topic is read from its beginning).
    #[arg(long)]
    group: Option<String>,
    /// Give up (exit 1) when the count is not reached within this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let args = Args::parse();
    let group = args.group.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("bare-{}-{nanos}", std::process::id())
    });
    // The same librdkafka defaults costwatch runs with, minus everything costwatch adds.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create()?;
    consumer.subscribe(&[args.topic.as_str()])?;

    let deadline = Duration::from_secs(args.timeout_secs);
    let mut messages = 0u64;
    let mut bytes = 0u64;
    let mut first_message_s = None;
    while messages < args.count {
        if started.elapsed() > deadline {
            eprintln!(
                "bare_consumer: only {messages} of {} messages within {deadline:?}",
                args.count
            );
            std::process::exit(1);
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(error)) => eprintln!("bare_consumer: {error}"),
            Some(Ok(message)) => {
                first_message_s.get_or_insert_with(|| started.elapsed().as_secs_f64());
                messages += 1;
                bytes += message.payload().map_or(0, <[u8]>::len) as u64;
            }
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let (cpu_s, peak_rss_kb) = own_usage();
    println!(
        r#"{{"messages":{messages},"bytes":{bytes},"first_message_s":{:.6},"elapsed_s":{elapsed_s:.6},"cpu_s":{cpu_s:.3},"peak_rss_kb":{peak_rss_kb}}}"#,
        first_message_s.unwrap_or(elapsed_s)
    );
    Ok(())
}

/// User + system CPU seconds and VmHWM of this process, read as `scripts/bench.sh` reads them
/// for costwatch, so both sides are measured the same way.
fn own_usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // Field n (1-based) is at index n - 3 after the command name; clock ticks are 100 Hz on Linux.
    let cpu_s = (ticks(14 - 3) + ticks(15 - 3)) as f64 / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu_s, peak_rss_kb)
}
