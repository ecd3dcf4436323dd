//! The core cost model and the price book it reads from:
//! `cost = C_C(hw) * k1(model, hw) * T + C_S(hw) * k2(model, hw) * S`.

pub mod profiles;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::config::{Deployment, PricingSettings};
use crate::domain::{
    exact_decimal, exact_decimal_opt, Coefficient, ComputeUnits, HardwareName, ModelName, Money, StorageUnits,
    UnitPrice,
};

/// The four numbers that price one (model, hardware) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Rates {
    /// C_C: what one compute unit costs on the hardware.
    pub compute_price: UnitPrice,
    /// C_S: what one storage unit costs on the hardware.
    pub storage_price: UnitPrice,
    /// How much of the hardware's compute this model uses per unit of T.
    pub k1: Coefficient,
    /// How much of the hardware's storage this model uses per unit of S.
    pub k2: Coefficient,
}

/// What a quantity of usage costs, split by component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CostBreakdown {
    // Serialized normalized ("50", not "50.000") by `Money`'s serde impl.
    /// `C_C * k1 * T`.
    pub compute_cost: Money,
    /// `C_S * k2 * S`.
    pub storage_cost: Money,
    /// The sum of both components.
    pub total_cost: Money,
}

/// Why a cost could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// A product or the sum needs more than a 96-bit decimal holds; nothing is rounded instead.
    #[error("the cost does not fit in a 96-bit decimal; check the prices and quantities for typos")]
    Overflow,
}

impl Rates {
    /// Prices `compute` and `storage` exactly; no rounding happens anywhere.
    pub fn price(&self, compute: ComputeUnits, storage: StorageUnits) -> Result<CostBreakdown, PricingError> {
        let component = |price: Decimal, k: Decimal, quantity: Decimal| {
            price
                .checked_mul(k)
                .and_then(|rate| rate.checked_mul(quantity))
                .ok_or(PricingError::Overflow)
        };
        let compute_cost = component(self.compute_price.0, self.k1.0, compute.0)?;
        let storage_cost = component(self.storage_price.0, self.k2.0, storage.0)?;
        let total_cost = compute_cost.checked_add(storage_cost).ok_or(PricingError::Overflow)?;
        Ok(CostBreakdown {
            compute_cost: Money(compute_cost.normalize()),
            storage_cost: Money(storage_cost.normalize()),
            total_cost: Money(total_cost.normalize()),
        })
    }
}

/// A stable identifier of one configured price entry (hardware, C_C, C_S, currency, and
/// `effective_from` when the entry has one): stored with every window row so that a row says
/// which entry priced it, and `rerate` can tell rows priced under an older price list. FNV-1a of
/// the entry's canonical text, so it is the same across restarts, hosts and Rust releases
/// (std's hasher promises none of that). An entry without `effective_from` keeps the id it had
/// before effective dates existed, so existing rows still name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PriceId(u64);

impl PriceId {
    /// The id of the price entry of `hardware` with these prices, in `currency`, in force from
    /// `effective_from` (`None`: since forever).
    pub fn of(
        hardware: &HardwareName,
        compute_price: UnitPrice,
        storage_price: UnitPrice,
        currency: &str,
        effective_from: Option<DateTime<Utc>>,
    ) -> Self {
        let mut canonical = format!("{hardware}\0{compute_price}\0{storage_price}\0{currency}");
        if let Some(from) = effective_from {
            canonical.push('\0');
            canonical.push_str(&from.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
        }
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in canonical.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Self(hash)
    }
}

impl fmt::Display for PriceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One coefficient version stored by `costwatch calibrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CoefficientVersion {
    /// The `coefficient_version` row's id; higher is newer.
    pub id: i64,
    /// `None`: the hardware default, for models without a version of their own.
    pub model: Option<ModelName>,
    /// The hardware the version is for.
    pub hardware: HardwareName,
    /// The calibrated compute coefficient.
    pub k1: Coefficient,
    /// The calibrated storage coefficient.
    pub k2: Coefficient,
    /// The version prices windows that start at or after this instant.
    pub effective_from: DateTime<Utc>,
}

/// Where the k1 and k2 that priced something came from, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoefficientSource {
    /// A calibrated version for the (model, hardware) pair.
    ModelVersion(i64),
    /// A calibrated hardware default version.
    HardwareVersion(i64),
    /// `pricing.coefficients` in the configuration.
    Configured,
    /// Nothing known: k1 = k2 = 1.
    Unit,
}

impl CoefficientSource {
    /// The `coefficient_version` id, `None` for configured or default coefficients.
    pub fn version(self) -> Option<i64> {
        match self {
            CoefficientSource::ModelVersion(id) | CoefficientSource::HardwareVersion(id) => Some(id),
            CoefficientSource::Configured | CoefficientSource::Unit => None,
        }
    }

    /// The label used in reports and the API: `calibrated`, `calibrated_hardware_default`, `configured` or `default`.
    pub fn as_str(self) -> &'static str {
        match self {
            CoefficientSource::ModelVersion(_) => "calibrated",
            CoefficientSource::HardwareVersion(_) => "calibrated_hardware_default",
            CoefficientSource::Configured => "configured",
            CoefficientSource::Unit => "default",
        }
    }
}

/// The rates for one (model, hardware) at one instant, and what they came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    /// The four numbers to price with.
    pub rates: Rates,
    /// Where k1 and k2 came from.
    pub source: CoefficientSource,
    /// The price entry C_C and C_S came from, stored with the row.
    pub price_id: PriceId,
}

/// A priced hardware target of the price book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardwarePricing {
    /// C_C, from `pricing.hardware`.
    pub compute_price: UnitPrice,
    /// C_S, from `pricing.hardware`.
    pub storage_price: UnitPrice,
    /// Cloud or edge, when the entry says; `None` otherwise.
    pub deployment: Option<Deployment>,
    /// The entry's stable id (see [`PriceId`]).
    pub price_id: PriceId,
    /// From when the entry is in force; `None`: since forever.
    pub effective_from: Option<DateTime<Utc>>,
}

/// Prices per hardware target and coefficients per (model, hardware): the configuration, plus
/// the calibrated coefficient versions stored in PostgreSQL.
///
/// k1 and k2 of a (model, hardware) pair for a window starting at `t` are, in this order of
/// precedence:
/// 1. the newest (highest id) version for the pair in force at `t` (`effective_from <= t`);
/// 2. the newest hardware-default version for the hardware in force at `t`;
/// 3. the configured `pricing.coefficients` entry;
/// 4. k1 = k2 = 1.
///
/// "Newest" is the latest stored, not the latest `effective_from`: a recalibration dated back
/// replaces earlier versions from its effective time on.
///
/// C_C and C_S of a hardware at `t` come from its `pricing.hardware` entry with the latest
/// `effective_from` not after `t` (an entry without one is in force since forever).
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    currency: String,
    /// Per hardware, its price entries, latest `effective_from` first (`None` last).
    hardware: HashMap<HardwareName, Vec<HardwarePricing>>,
    coefficients: HashMap<(ModelName, HardwareName), (Coefficient, Coefficient)>,
    /// Per (model or `None` for the hardware default, hardware), highest id first.
    versions: HashMap<(Option<ModelName>, HardwareName), Vec<CoefficientVersion>>,
    newest_version: Option<i64>,
}

impl PriceBook {
    /// Builds the book from validated settings, without calibrated versions.
    pub fn from_settings(settings: &PricingSettings) -> Self {
        let mut hardware: HashMap<HardwareName, Vec<HardwarePricing>> = HashMap::new();
        for h in &settings.hardware {
            let entry = HardwarePricing {
                compute_price: h.compute_price,
                storage_price: h.storage_price,
                deployment: h.deployment,
                price_id: PriceId::of(
                    &h.name,
                    h.compute_price,
                    h.storage_price,
                    &settings.currency,
                    h.effective_from,
                ),
                effective_from: h.effective_from,
            };
            hardware.entry(h.name.clone()).or_default().push(entry);
        }
        for entries in hardware.values_mut() {
            // `None` sorts before any `Some`, so reversed it comes last: the fallback.
            entries.sort_by_key(|e| std::cmp::Reverse(e.effective_from));
        }
        let coefficients = settings
            .coefficients
            .iter()
            .map(|c| ((c.model.clone(), c.hardware.clone()), (c.k1, c.k2)))
            .collect();
        Self {
            currency: settings.currency.clone(),
            hardware,
            coefficients,
            versions: HashMap::new(),
            newest_version: None,
        }
    }

    /// The same book with the prices and configured coefficients of `settings`, keeping its
    /// calibrated versions: what a configuration reload swaps in.
    pub fn with_settings(&self, settings: &PricingSettings) -> Self {
        let mut book = Self::from_settings(settings);
        book.versions = self.versions.clone();
        book.newest_version = self.newest_version;
        book
    }

    /// The same book with `versions` (all stored versions, in any order) as its calibrated
    /// coefficients, replacing any it had.
    pub fn with_versions(mut self, versions: Vec<CoefficientVersion>) -> Self {
        self.newest_version = versions.iter().map(|v| v.id).max();
        self.versions.clear();
        for v in versions {
            self.versions
                .entry((v.model.clone(), v.hardware.clone()))
                .or_default()
                .push(v);
        }
        for list in self.versions.values_mut() {
            list.sort_unstable_by_key(|v| std::cmp::Reverse(v.id));
        }
        self
    }

    /// How many coefficient versions the book holds.
    pub fn version_count(&self) -> usize {
        self.versions.values().map(Vec::len).sum()
    }

    /// The highest coefficient version id the book holds.
    pub fn newest_version(&self) -> Option<i64> {
        self.newest_version
    }

    /// The currency every price is in (`pricing.currency`).
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The hardware targets with a price in force at `at`, by name, each with that price.
    pub fn hardware_targets(&self, at: DateTime<Utc>) -> Vec<(&HardwareName, &HardwarePricing)> {
        let mut targets: Vec<_> = self
            .hardware
            .keys()
            .filter_map(|name| Some((name, self.hardware(name, at)?)))
            .collect();
        targets.sort_unstable_by(|a, b| a.0.cmp(b.0));
        targets
    }

    /// The price entry of `hardware` in force at `at`; `None` when it has none then (its usage
    /// is unpriced).
    pub fn hardware(&self, hardware: &HardwareName, at: DateTime<Utc>) -> Option<&HardwarePricing> {
        self.hardware
            .get(hardware)?
            .iter()
            .find(|e| e.effective_from.is_none_or(|from| from <= at))
    }

    /// The rates of a pair for a window starting at `at`, or `None` when the hardware has no
    /// price (the pair is *unpriced*).
    pub fn priced(&self, model: &ModelName, hardware: &HardwareName, at: DateTime<Utc>) -> Option<Priced> {
        let pricing = self.hardware(hardware, at)?;
        let (k1, k2, source) = self.known_coefficients(model, hardware, at).unwrap_or((
            Coefficient::ONE,
            Coefficient::ONE,
            CoefficientSource::Unit,
        ));
        Some(Priced {
            rates: Rates {
                compute_price: pricing.compute_price,
                storage_price: pricing.storage_price,
                k1,
                k2,
            },
            source,
            price_id: pricing.price_id,
        })
    }

    /// [`PriceBook::priced`] without the provenance.
    pub fn rates(&self, model: &ModelName, hardware: &HardwareName, at: DateTime<Utc>) -> Option<Rates> {
        self.priced(model, hardware, at).map(|p| p.rates)
    }

    /// The newest hardware-default version for `hardware` in force at `at`.
    pub fn hardware_default(&self, hardware: &HardwareName, at: DateTime<Utc>) -> Option<&CoefficientVersion> {
        self.versions
            .get(&(None, hardware.clone()))
            .and_then(|list| list.iter().find(|v| v.effective_from <= at))
    }

    /// k1 and k2 of a pair at `at` by the precedence above, or `None` when nothing is known
    /// about the pair (no version, no hardware default, no configured entry), where pricing
    /// falls back to 1 and 1.
    pub fn known_coefficients(
        &self,
        model: &ModelName,
        hardware: &HardwareName,
        at: DateTime<Utc>,
    ) -> Option<(Coefficient, Coefficient, CoefficientSource)> {
        // Without versions (most flushes, until a first calibration) skip the key clones.
        if self.newest_version.is_some() {
            let own = self
                .versions
                .get(&(Some(model.clone()), hardware.clone()))
                .and_then(|list| list.iter().find(|v| v.effective_from <= at));
            if let Some(v) = own {
                return Some((v.k1, v.k2, CoefficientSource::ModelVersion(v.id)));
            }
            if let Some(v) = self.hardware_default(hardware, at) {
                return Some((v.k1, v.k2, CoefficientSource::HardwareVersion(v.id)));
            }
        }
        self.coefficients
            .get(&(model.clone(), hardware.clone()))
            .map(|&(k1, k2)| (k1, k2, CoefficientSource::Configured))
    }
}

/// The price book the daemon prices with, swapped whole when new coefficient versions are
/// loaded. Readers take a snapshot (`current`) and price a whole flush with it, so one flush
/// never mixes two books.
#[derive(Debug, Clone)]
pub struct LivePrices(Arc<RwLock<Arc<PriceBook>>>);

impl LivePrices {
    /// Live prices starting from `book`.
    pub fn new(book: PriceBook) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(book))))
    }

    /// A snapshot of the book in force now; later swaps do not change it.
    pub fn current(&self) -> Arc<PriceBook> {
        // A panic while holding the lock cannot leave a half-written Arc behind.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps in `book` for every later [`LivePrices::current`]; snapshots already taken keep the old one.
    pub fn replace(&self, book: PriceBook) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(book);
    }

    /// Swaps in the book `change` makes of the current one, holding the lock throughout, so
    /// that a configuration reload and a coefficient reload never undo each other.
    pub fn update(&self, change: impl FnOnce(&PriceBook) -> PriceBook) {
        let mut book = self.0.write().unwrap_or_else(|p| p.into_inner());
        *book = Arc::new(change(&book));
    }
}

/// What to price in an estimate: explicit prices, or a (model, hardware) from the price book;
/// explicit k1/k2 override either.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstimateRequest {
    /// T to price.
    #[serde(deserialize_with = "exact_decimal")]
    pub compute: ComputeUnits,
    /// S to price.
    #[serde(deserialize_with = "exact_decimal")]
    pub storage: StorageUnits,
    /// C_C to price with; give it with `storage_price`, instead of `model` and `hardware`.
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub compute_price: Option<UnitPrice>,
    /// C_S to price with; give it with `compute_price`.
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub storage_price: Option<UnitPrice>,
    /// Overrides k1 (explicit prices otherwise use 1; a pair uses the book's).
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub k1: Option<Coefficient>,
    /// Overrides k2 (explicit prices otherwise use 1; a pair uses the book's).
    #[serde(default, deserialize_with = "exact_decimal_opt")]
    pub k2: Option<Coefficient>,
    /// Take the rates of this model on `hardware` from the price book, as a flush now would.
    #[serde(default)]
    pub model: Option<ModelName>,
    /// The hardware whose prices to take from the price book; give it with `model`.
    #[serde(default)]
    pub hardware: Option<HardwareName>,
}

/// A priced estimate, with everything that went into it.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// T priced.
    pub compute: ComputeUnits,
    /// S priced.
    pub storage: StorageUnits,
    /// The rates used, after overrides.
    #[serde(flatten)]
    pub rates: Rates,
    /// The cost, by component and total.
    #[serde(flatten)]
    pub cost: CostBreakdown,
    /// The currency of the price book; `None` with explicit prices and no configuration loaded.
    pub currency: Option<String>,
    /// True when k1 or k2 is the assumed 1: not given, and nothing configured or calibrated
    /// for the pair (the rule every flush prices by). Which ones: [`Estimate::assumed`].
    pub coefficients_assumed: bool,
    /// Which of k1 and k2 are assumed, for the text output.
    #[serde(skip)]
    pub assumed: (bool, bool),
}

/// Why an estimate could not be made; each message says what to pass instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    /// Neither prices nor a (model, hardware) pair were given, or both were.
    #[error("give either compute_price and storage_price, or model and hardware")]
    NoRates,
    /// Only one of `compute_price` and `storage_price` was given.
    #[error("give both compute_price and storage_price")]
    HalfPrices,
    /// Only one of `model` and `hardware` was given.
    #[error("give both model and hardware")]
    HalfPair,
    /// A (model, hardware) pair was given but no configuration was loaded to look it up in.
    #[error("model and hardware read the price book, which is not loaded (pass --config)")]
    NoPriceBook,
    /// The hardware has no price in the price book.
    #[error("hardware {0} has no price in the price book (pricing.hardware), so its usage is unpriced")]
    Unpriced(HardwareName),
    /// An input is negative: its name and value.
    #[error("{0} must not be negative, got {1}")]
    Negative(&'static str, Decimal),
    /// The cost overflowed a 96-bit decimal.
    #[error(transparent)]
    Pricing(#[from] PricingError),
}

impl EstimateRequest {
    /// Resolves the rates (explicit, or from `book`) and prices the request.
    pub fn price(&self, book: Option<&PriceBook>) -> Result<Estimate, EstimateError> {
        // The third value: whether k1 and k2 are the assumed 1 and 1 unless given.
        let (mut rates, currency, unit) = match (&self.model, &self.hardware, self.compute_price, self.storage_price) {
            (Some(model), Some(hardware), None, None) => {
                let book = book.ok_or(EstimateError::NoPriceBook)?;
                let priced = book
                    .priced(model, hardware, Utc::now())
                    .ok_or_else(|| EstimateError::Unpriced(hardware.clone()))?;
                let unit = priced.source == CoefficientSource::Unit;
                (priced.rates, Some(book.currency().to_owned()), unit)
            }
            (None, None, Some(compute_price), Some(storage_price)) => (
                Rates {
                    compute_price,
                    storage_price,
                    k1: Coefficient::ONE,
                    k2: Coefficient::ONE,
                },
                book.map(|b| b.currency().to_owned()),
                true,
            ),
            (Some(_), None, _, _) | (None, Some(_), _, _) => return Err(EstimateError::HalfPair),
            (None, None, Some(_), None) | (None, None, None, Some(_)) => return Err(EstimateError::HalfPrices),
            _ => return Err(EstimateError::NoRates),
        };
        if let Some(k1) = self.k1 {
            rates.k1 = k1;
        }
        if let Some(k2) = self.k2 {
            rates.k2 = k2;
        }
        for (name, v) in [
            ("compute", self.compute.0),
            ("storage", self.storage.0),
            ("compute_price", rates.compute_price.0),
            ("storage_price", rates.storage_price.0),
            ("k1", rates.k1.0),
            ("k2", rates.k2.0),
        ] {
            if v < Decimal::ZERO {
                return Err(EstimateError::Negative(name, v));
            }
        }
        let cost = rates.price(self.compute, self.storage)?;
        let assumed = (unit && self.k1.is_none(), unit && self.k2.is_none());
        Ok(Estimate {
            compute: self.compute,
            storage: self.storage,
            rates,
            cost,
            currency,
            coefficients_assumed: assumed.0 || assumed.1,
            assumed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HardwarePrice;
    use crate::test_support::{book, coefficient, d, hardware_price, t};

    #[test]
    fn worked_example_costs_130() {
        let rates = Rates {
            compute_price: UnitPrice(d("0.1")),
            storage_price: UnitPrice(d("0.2")),
            k1: Coefficient(d("0.5")),
            k2: Coefficient(d("0.8")),
        };
        let cost = rates.price(ComputeUnits(d("1000")), StorageUnits(d("500"))).unwrap();
        assert_eq!(cost.compute_cost.to_string(), "50");
        assert_eq!(cost.storage_cost.to_string(), "80");
        assert_eq!(cost.total_cost.to_string(), "130");
    }

    fn version(id: i64, model: Option<&str>, hardware: &str, k1: &str, k2: &str, from: &str) -> CoefficientVersion {
        CoefficientVersion {
            id,
            model: model.map(|m| ModelName::parse(m).unwrap()),
            hardware: HardwareName::parse(hardware).unwrap(),
            k1: Coefficient(d(k1)),
            k2: Coefficient(d(k2)),
            effective_from: t(from),
        }
    }

    fn configured_book() -> PriceBook {
        book(
            vec![
                hardware_price("a100", "0.1", "0.2", None),
                hardware_price("h100", "0.1", "0.2", None),
            ],
            vec![coefficient("m", "a100", "0.5", "0.8")],
        )
    }

    #[test]
    fn coefficients_follow_the_documented_precedence_at_the_window_start() {
        let book = configured_book().with_versions(vec![
            version(1, None, "a100", "2", "2", "2026-01-01T00:00:00Z"),
            version(2, Some("m"), "a100", "3", "3", "2026-02-01T00:00:00Z"),
            // Stored later but dated back: it replaces version 2 from its effective time on.
            version(3, Some("m"), "a100", "4", "4", "2026-01-15T00:00:00Z"),
        ]);
        let (m, other) = (ModelName::parse("m").unwrap(), ModelName::parse("other").unwrap());
        let (a100, h100) = (
            HardwareName::parse("a100").unwrap(),
            HardwareName::parse("h100").unwrap(),
        );
        let at = |model: &ModelName, hw: &HardwareName, when: &str| {
            let p = book.priced(model, hw, t(when)).unwrap();
            (p.rates.k1.to_string(), p.source)
        };
        // Before any version: the configured pair, then 1 and 1.
        assert_eq!(
            at(&m, &a100, "2025-12-31T23:59:00Z"),
            ("0.5".into(), CoefficientSource::Configured)
        );
        assert_eq!(
            at(&other, &h100, "2026-03-01T00:00:00Z"),
            ("1".into(), CoefficientSource::Unit)
        );
        // The hardware default outranks the configured pair.
        assert_eq!(
            at(&m, &a100, "2026-01-01T00:00:00Z"),
            ("2".into(), CoefficientSource::HardwareVersion(1))
        );
        assert_eq!(
            at(&other, &a100, "2026-03-01T00:00:00Z"),
            ("2".into(), CoefficientSource::HardwareVersion(1))
        );
        // The pair's own versions outrank it; the highest id in force wins.
        assert_eq!(
            at(&m, &a100, "2026-01-20T00:00:00Z"),
            ("4".into(), CoefficientSource::ModelVersion(3))
        );
        assert_eq!(
            at(&m, &a100, "2026-03-01T00:00:00Z"),
            ("4".into(), CoefficientSource::ModelVersion(3))
        );
        assert_eq!(book.newest_version(), Some(3));
        assert_eq!(book.version_count(), 3);
    }

    #[test]
    fn a_price_id_names_the_price_entry_and_is_stable() {
        let book = configured_book();
        let now = t("2026-01-01T00:00:00Z");
        let a100 = book
            .hardware(&HardwareName::parse("a100").unwrap(), now)
            .unwrap()
            .price_id;
        let h100 = book
            .hardware(&HardwareName::parse("h100").unwrap(), now)
            .unwrap()
            .price_id;
        assert_ne!(a100, h100);
        // Pinned: a row written today must carry the same id as one written by the next release.
        assert_eq!(
            PriceId::of(
                &HardwareName::parse("a100").unwrap(),
                UnitPrice(d("0.1")),
                UnitPrice(d("0.2")),
                "USD",
                None
            )
            .to_string()
            .len(),
            16
        );
        assert_eq!(
            PriceId::of(
                &HardwareName::parse("a100").unwrap(),
                UnitPrice(d("0.10")),
                UnitPrice(d("0.2")),
                "USD",
                None
            ),
            a100,
            "0.10 and 0.1 are one price"
        );
    }

    #[test]
    fn each_window_is_priced_by_the_entry_in_force_at_its_start() {
        let entry = |cc: &str, from: Option<&str>| HardwarePrice {
            effective_from: from.map(t),
            ..hardware_price("a100", cc, "0.2", None)
        };
        // Listed out of order on purpose: the order of the file does not matter.
        let book = book(
            vec![
                entry("0.3", Some("2026-11-01T00:00:00Z")),
                entry("0.1", None),
                entry("0.2", Some("2026-10-01T00:00:00Z")),
            ],
            vec![],
        );
        let (m, a100) = (ModelName::parse("m").unwrap(), HardwareName::parse("a100").unwrap());
        let price_at = |at: &str| {
            book.rates(&m, &a100, t(at))
                .unwrap()
                .compute_price
                .0
                .normalize()
                .to_string()
        };
        assert_eq!(price_at("2020-01-01T00:00:00Z"), "0.1");
        assert_eq!(price_at("2026-09-30T23:59:59.999Z"), "0.1");
        assert_eq!(
            price_at("2026-10-01T00:00:00Z"),
            "0.2",
            "the boundary belongs to the new entry"
        );
        assert_eq!(price_at("2026-10-31T23:59:59Z"), "0.2");
        assert_eq!(price_at("2026-11-01T00:00:00Z"), "0.3");
        let id = |at: &str| book.priced(&m, &a100, t(at)).unwrap().price_id;
        assert_ne!(id("2026-10-01T00:00:00Z"), id("2026-11-01T00:00:00Z"));
        assert_ne!(id("2026-09-01T00:00:00Z"), id("2026-10-01T00:00:00Z"));
        // The same prices from another date are another entry.
        let hw = HardwareName::parse("a100").unwrap();
        assert_ne!(
            PriceId::of(&hw, UnitPrice(d("0.1")), UnitPrice(d("0.2")), "USD", None),
            PriceId::of(
                &hw,
                UnitPrice(d("0.1")),
                UnitPrice(d("0.2")),
                "USD",
                Some(t("2026-10-01T00:00:00Z"))
            )
        );

        // Without an entry since forever, the hardware is unpriced before its first one.
        let later = book_of_one(entry("0.2", Some("2026-10-01T00:00:00Z")));
        assert!(later.rates(&m, &a100, t("2026-09-30T23:59:59Z")).is_none());
        assert!(later.rates(&m, &a100, t("2026-10-01T00:00:00Z")).is_some());
        assert_eq!(later.hardware_targets(t("2026-09-01T00:00:00Z")).len(), 0);
        assert_eq!(later.hardware_targets(t("2026-10-01T00:00:00Z")).len(), 1);
    }

    fn book_of_one(entry: HardwarePrice) -> PriceBook {
        book(vec![entry], vec![])
    }

    #[test]
    fn overflow_is_an_error_not_a_wrong_number() {
        let rates = Rates {
            compute_price: UnitPrice(Decimal::MAX),
            storage_price: UnitPrice(Decimal::ZERO),
            k1: Coefficient(d("2")),
            k2: Coefficient::ONE,
        };
        assert_eq!(
            rates.price(ComputeUnits(Decimal::ONE), StorageUnits::ZERO),
            Err(PricingError::Overflow)
        );
    }
}

#[cfg(test)]
mod estimate_tests {
    use super::*;

    #[test]
    fn json_numbers_and_strings_both_work_but_floats_are_refused() {
        let r: EstimateRequest = serde_json::from_str(
            r#"{"compute": 1000, "storage": "500", "compute_price": "0.1", "storage_price": "0.2", "k1": "0.5", "k2": "0.8"}"#,
        )
        .unwrap();
        let e = r.price(None).unwrap();
        assert_eq!(e.cost.total_cost.to_string(), "130");
        assert!(!e.coefficients_assumed);
        let err = serde_json::from_str::<EstimateRequest>(r#"{"compute": 0.1, "storage": 1}"#).unwrap_err();
        assert!(err.to_string().contains("write 0.1 as a string"), "{err}");
    }

    #[test]
    fn coefficients_neither_given_configured_nor_calibrated_are_assumed_and_say_so() {
        use crate::test_support::{book, coefficient, hardware_price};
        let book = book(
            vec![hardware_price("a100", "0.1", "0.2", None)],
            vec![coefficient("m", "a100", "0.5", "0.8")],
        );
        let request = |json: &str| serde_json::from_str::<EstimateRequest>(json).unwrap();
        let known = request(r#"{"compute": 1000, "storage": 500, "model": "m", "hardware": "a100"}"#);
        let e = known.price(Some(&book)).unwrap();
        assert_eq!(
            (e.cost.total_cost.to_string(), e.coefficients_assumed),
            ("130".into(), false)
        );
        let unknown = request(r#"{"compute": 1000, "storage": 500, "model": "other", "hardware": "a100"}"#);
        let e = unknown.price(Some(&book)).unwrap();
        assert_eq!((e.cost.total_cost.to_string(), e.assumed), ("200".into(), (true, true)));
        assert_eq!(serde_json::to_value(&e).unwrap()["coefficients_assumed"], true);
        let half = request(r#"{"compute": 1, "storage": 1, "compute_price": "1", "storage_price": "1", "k1": "2"}"#);
        assert_eq!(half.price(None).unwrap().assumed, (false, true));
    }

    #[test]
    fn incomplete_requests_say_what_is_missing() {
        let r: EstimateRequest = serde_json::from_str(r#"{"compute": 1, "storage": 1, "compute_price": "1"}"#).unwrap();
        assert_eq!(r.price(None).unwrap_err(), EstimateError::HalfPrices);
        let r: EstimateRequest = serde_json::from_str(r#"{"compute": 1, "storage": 1, "model": "m"}"#).unwrap();
        assert_eq!(r.price(None).unwrap_err(), EstimateError::HalfPair);
        let r: EstimateRequest =
            serde_json::from_str(r#"{"compute": "-1", "storage": 1, "compute_price": "1", "storage_price": "1"}"#)
                .unwrap();
        assert_eq!(
            r.price(None).unwrap_err().to_string(),
            "compute must not be negative, got -1"
        );
    }
}
