//! Sources: one topic each, and how its messages become usage events. The costwatch format is
//! decoded by [`crate::ingest::event`] itself (the hot path, untouched); the mapped formats
//! (`openai`, `cloudevents`, `json`: [`mapped`]) find their fields by JSON Pointer ([`pointer`]),
//! and the OTLP formats ([`otlp`]) read GenAI spans. Token-only events get T and S from the
//! first matching usage profile ([`crate::pricing::profiles`]), or stay unpriced. Pure.

pub mod mapped;
pub mod otlp;
pub mod pointer;

/// The limits and clock the decoders' unit tests share.
#[cfg(test)]
pub(crate) mod test_values {
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use crate::ingest::event::Limits;

    pub(crate) fn limits() -> Limits {
        Limits {
            max_event_bytes: 65536,
            max_future_skew: Duration::from_secs(300),
            max_event_age: Duration::from_secs(7 * 86400),
        }
    }

    pub(crate) fn now() -> DateTime<Utc> {
        "2026-11-29T03:05:00Z".parse().unwrap()
    }
}

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::config::{SourceFormat, SourceSettings};
use crate::ingest::event::{
    self, Basis, Limits, RejectCode, Rejection, UsageEventRef, MAX_FRACTION_DIGITS, MAX_QUANTITY,
};
use std::sync::{Arc, LazyLock};

use crate::pricing::profiles::{LiveProfiles, UsageProfiles};

/// What one message holds: zero or more events (each valid or refused on its own), and how many
/// parts of it carried no usage and were skipped (non-GenAI spans, filtered CloudEvent types).
#[derive(Debug)]
pub struct Decoded<'a> {
    /// One entry per usage record in the message, in message order.
    pub events: Vec<Result<UsageEventRef<'a>, Rejection>>,
    /// Parts without usage, skipped and counted, not rejected.
    pub skipped: u64,
    /// The usage profiles the events' T and S were derived with.
    pub profiles: Arc<UsageProfiles>,
}

impl Default for Decoded<'_> {
    /// No events, and the empty profile set shared: [`Source::decode`] puts the profiles in
    /// force in their place, and a new `Arc` per message was an allocation for nothing.
    fn default() -> Self {
        static NONE: LazyLock<Arc<UsageProfiles>> = LazyLock::new(Arc::default);
        Self {
            events: Vec::new(),
            skipped: 0,
            profiles: Arc::clone(&NONE),
        }
    }
}

impl Decoded<'_> {
    /// The name of the profile a [`Basis::Profile`] of these events refers to.
    pub fn profile_name(&self, basis: Basis) -> Option<&str> {
        match basis {
            Basis::Profile(i) => self.profiles.get(usize::from(i)).map(|p| p.name.as_str()),
            _ => None,
        }
    }
}

/// One configured source, ready to decode its topic's messages.
#[derive(Debug, Clone)]
pub struct Source {
    /// `sources[].name`, recorded with every window row and rejection.
    pub name: String,
    /// The topic it reads.
    pub topic: String,
    /// The format of its messages.
    pub format: SourceFormat,
    decoder: Decoder,
    profiles: LiveProfiles,
}

#[derive(Debug, Clone)]
enum Decoder {
    Native,
    Mapped(Box<mapped::Mapping>),
    Otlp(otlp::Mapping),
}

impl Source {
    /// The source `settings` describe, deriving T and S of token events with the profiles in
    /// force (a reload may replace them).
    pub fn new(settings: &SourceSettings, profiles: impl Into<LiveProfiles>) -> Self {
        let decoder = match settings.format {
            SourceFormat::Costwatch => Decoder::Native,
            SourceFormat::OtlpJson | SourceFormat::OtlpProto => Decoder::Otlp(otlp::Mapping::new(settings)),
            SourceFormat::Openai | SourceFormat::Cloudevents | SourceFormat::Json => {
                Decoder::Mapped(Box::new(mapped::Mapping::new(settings)))
            }
        };
        Self {
            name: settings.name.clone(),
            topic: settings.topic.clone(),
            format: settings.format,
            decoder,
            profiles: profiles.into(),
        }
    }

    /// Whether this is costwatch's own format, which the aggregator decodes itself.
    pub fn is_native(&self) -> bool {
        matches!(self.decoder, Decoder::Native)
    }

    /// Decodes one message. `Err` refuses the whole message (it could not be read at all);
    /// otherwise each event in it is valid or refused on its own.
    pub fn decode<'a>(
        &'a self,
        payload: Option<&'a [u8]>,
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Decoded<'a>, Rejection> {
        let mut decoded = match &self.decoder {
            Decoder::Native => Decoded {
                events: vec![Ok(event::decode_ref(payload, limits, now)?)],
                ..Decoded::default()
            },
            Decoder::Mapped(m) => m.decode(payload, limits, now)?,
            Decoder::Otlp(m) => m.decode(self.format, payload, limits, now)?,
        };
        let profiles = self.profiles.current();
        for result in &mut decoded.events {
            if let Ok(e) = result {
                if let Err(rejection) = derive(&profiles, e) {
                    *result = Err(rejection);
                }
            }
        }
        decoded.profiles = profiles;
        Ok(decoded)
    }
}

/// T and S of a token event from the first matching profile; a token event with none stays
/// [`Basis::NoProfile`] (T and S zero, unpriced).
fn derive(profiles: &UsageProfiles, e: &mut UsageEventRef<'_>) -> Result<(), Rejection> {
    if e.basis == Basis::Measured {
        return Ok(());
    }
    let Some(index) = profiles.find(&e.model, &e.hardware) else {
        e.basis = Basis::NoProfile;
        return Ok(());
    };
    let profile = profiles.get(index).expect("found");
    let out_of_range = |what: &str| {
        Rejection::new(
            RejectCode::OutOfRange,
            format!(
                "{what} derived by usage profile {:?} from {} input and {} output tokens is outside the precision contract",
                profile.name, e.tokens.input, e.tokens.output
            ),
        )
    };
    let (compute, storage) = profile
        .derive(e.tokens.input, e.tokens.output)
        .map_err(|_| out_of_range("T"))?;
    for (what, v) in [("T", compute.value()), ("S", storage.value())] {
        if v > MAX_QUANTITY || v.scale() > MAX_FRACTION_DIGITS {
            return Err(out_of_range(what));
        }
    }
    e.compute = compute;
    e.storage = storage;
    // Fewer than 65 536 profiles: configuration lists them by hand.
    e.basis = Basis::Profile(index as u16);
    Ok(())
}

/// Input and output tokens: at least one must be present; the absent one is 0.
pub(crate) fn token_pair(
    input: Option<Decimal>,
    output: Option<Decimal>,
    what: &dyn std::fmt::Display,
) -> Result<event::Tokens, Rejection> {
    if input.is_none() && output.is_none() {
        return Err(Rejection::new(
            RejectCode::MissingField,
            format!("missing field `input_tokens` and `output_tokens` ({what})"),
        ));
    }
    Ok(event::Tokens {
        input: input.unwrap_or_default(),
        output: output.unwrap_or_default(),
    })
}
