//! Budgets and alerts: [`budget`] decides what a budget's spend means (pure: periods, scopes,
//! forecast, drift, which alerts should fire), [`store`] reads spend from the priced history and
//! keeps the alert state machine, the webhook outbox and the evaluator's advisory lock,
//! [`evaluator`] runs the loop (every instance evaluates, the lock holder records and delivers),
//! and [`notify`] only sends (Alertmanager API v2, signed webhooks).

pub mod budget;
pub mod evaluator;
pub mod notify;
pub mod store;

pub use evaluator::{run, SharedBoard};
