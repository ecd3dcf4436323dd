//! Reading the priced history back: cost totals and series per step over `usage_costs`, and the
//! latest rejected messages. What `/api/v1/costs` and `/api/v1/rejected` answer; the SQL is in
//! [`store`].

pub mod store;

pub use store::{CostQuery, CostRow, CostStep, CostTotals, Dimension, RejectedItem};
