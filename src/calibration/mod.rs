//! Calibration and what builds on it: [`bills`] parses a provider's bills and [`fit`] fits k1
//! and k2 to them (both pure), [`run`] is `costwatch calibrate` (bills and usage history in,
//! coefficient versions out), [`rerate`] re-prices stored windows with the versions in force,
//! [`recommend`] ranks hardware targets per model (pure), and [`store`] holds their SQL.

pub mod bills;
pub mod fit;
pub mod recommend;
pub mod rerate;
pub mod run;
pub mod store;
