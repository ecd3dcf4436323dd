//! Ingestion: from Kafka messages to exact window sums in PostgreSQL. The [`consumer`] (a
//! consumer-group member on its own thread) feeds each message to the [`aggregate`]d state of its
//! partition, which [`event`] decodes and validates, [`dedup`] checks against the ids already
//! counted, and [`window`] assigns to its event-time window; each flush goes to
//! `crate::store` in one transaction. [`health`] is what the consumer reports about itself.
//!
//! Everything but the consumer is pure: given the state stored in PostgreSQL and the messages
//! after the stored offset, the same rows come out (see `docs/architecture.md`).

pub mod aggregate;
pub mod consumer;
pub mod dedup;
pub mod event;
pub mod health;
pub mod source;
pub mod store;
pub mod window;

pub use consumer::{build_consumer, consume, Pipeline};
