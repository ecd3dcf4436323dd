//! Reading the priced history back: cost tables over `window_usage` (per step, grouped by
//! model, hardware or labels, filtered by labels) and the latest rejected messages. What
//! `/api/v1/costs`, `/api/v1/report` and `/api/v1/rejected` answer; the checks of a query are in
//! [`query`], the SQL is in [`store`].

pub mod query;
pub mod render;
pub mod store;

pub use query::{Dimension, LabelFilter, Month, QueryError};
pub use store::{CostQuery, CostRow, CostStep, CostTotals, RejectedItem};
