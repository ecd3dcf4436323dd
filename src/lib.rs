//! costwatch: prices AI inference usage from Kafka into exact per-window costs in PostgreSQL.
//!
//! The pipeline, stage by stage: [`config`] (settings) → [`consumer`] (Kafka) → [`event`]
//! (decode and validate) → [`aggregate`] and [`window`] (event-time windows, dedup, lateness)
//! → [`store`] (one transaction per flush) with [`pricing`] (the cost model). [`telemetry`]
//! logs and counts, [`daemon`] wires it all, [`loadgen`] makes synthetic load.
//! Budgets: [`budget`] (periods, forecast, drift: what should alert), [`budget_store`] (spend
//! from PostgreSQL, alert state, outbox), [`alerting`] (the single evaluator) and [`notify`]
//! (Alertmanager and signed webhooks).
//! Connections: [`kafka`] (the librdkafka client configuration, checked without connecting,
//! and which broker errors are permanent) and [`secret`] (values never printed).
//! Calibration: [`bills`] (bills CSV) and [`calibrate`] (the k1/k2 fit) are pure,
//! [`calibration`] runs `costwatch calibrate`, [`calibration_store`] is its PostgreSQL side,
//! [`rerate`] re-prices stored windows and [`recommend`] ranks hardware targets per model.

pub mod aggregate;
pub mod alerting;
pub mod bills;
pub mod budget;
pub mod budget_store;
pub mod calibrate;
pub mod calibration;
pub mod calibration_store;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod daemon;
pub mod dedup;
pub mod domain;
pub mod event;
pub mod faults;
pub mod http;
pub mod kafka;
pub mod loadgen;
pub mod notify;
pub mod pricing;
pub mod recommend;
pub mod rerate;
pub mod secret;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod window;
