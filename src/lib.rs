//! costwatch: prices AI inference usage from Kafka into exact per-window costs in PostgreSQL.
//!
//! The layout follows the pipeline. At the bottom, [`domain`] (typed values) and [`config`]
//! (settings) depend on nothing else of ours; [`pricing`] (the cost model and price book),
//! [`error_class`] (transient or permanent), [`telemetry`] (metric names, logs) and [`store`]
//! (connections, migrations, the flush transaction) sit on them. The features use those:
//! [`ingest`] (Kafka to window sums), [`alerting`] (budgets and alerts), [`calibration`]
//! (bills, fits, re-rating, recommendations) and [`usage`] (reading the priced history back). At the top, [`http`] (metrics, probes, the API),
//! [`daemon`] (wiring for `costwatch run`), [`cli`], [`exit`] (exit codes), [`loadgen`] (synthetic load),
//! [`shutdown`] (signals) and [`faults`] (fault injection for the fault suite).
//! Connections: [`kafka`] (the librdkafka client configuration, checked without connecting)
//! and [`secret`] (values never printed).

#![warn(missing_docs)]

pub mod alerting;
pub mod calibration;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod error_class;
pub mod exit;
pub mod faults;
pub mod history;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod loadgen;
pub mod pricing;
pub mod secret;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod usage;
