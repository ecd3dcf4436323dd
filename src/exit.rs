//! Exit codes: one scheme for every command, in the spirit of sysexits(3), decided in one place
//! ([`ExitClass::of`]) from the error a command failed with.

use crate::calibration::bills::BillsError;
use crate::calibration::run::CalibrationError;
use crate::config::ConfigError;
use crate::ingest::consumer::{BrokerRefused, FinalFlushFailed};
use crate::pricing::EstimateError;
use crate::store::StoreError;

/// How a command failed, as its exit code tells a script or a service manager. Usage, data,
/// input and configuration failures need a person: restarting does not fix them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// 64 (`EX_USAGE`): the command line is wrong: an unknown flag, a bad time or number, a
    /// missing argument.
    Usage,
    /// 65 (`EX_DATAERR`): input the command was given is invalid: a bills file with bad lines,
    /// too few bills to fit, usage on hardware without a price.
    Data,
    /// 66 (`EX_NOINPUT`): a file the command was told to read is missing or unreadable (a
    /// bills file, the `--config` file).
    NoInput,
    /// 69 (`EX_UNAVAILABLE`): PostgreSQL or the Kafka broker is unreachable or refuses
    /// costwatch (TLS, login), or the database cannot be used as it is; also a final flush at
    /// shutdown that could not be written.
    Unavailable,
    /// 70 (`EX_SOFTWARE`): anything else; the message says what.
    Internal,
    /// 78 (`EX_CONFIG`): the configuration does not parse or is invalid; every problem is
    /// listed with its key.
    Config,
}

impl ExitClass {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            ExitClass::Usage => 64,
            ExitClass::Data => 65,
            ExitClass::NoInput => 66,
            ExitClass::Unavailable => 69,
            ExitClass::Internal => 70,
            ExitClass::Config => 78,
        }
    }

    /// The class of the first error in `error`'s chain (outermost first) that has one;
    /// [`ExitClass::Internal`] when none has.
    pub fn of(error: &anyhow::Error) -> ExitClass {
        error.chain().find_map(class_of_one).unwrap_or(ExitClass::Internal)
    }
}

fn class_of_one(error: &(dyn std::error::Error + 'static)) -> Option<ExitClass> {
    if let Some(failure) = error.downcast_ref::<Failure>() {
        return Some(failure.class);
    }
    if error.is::<UsageError>() {
        return Some(ExitClass::Usage);
    }
    if error.is::<InputError>() {
        return Some(ExitClass::NoInput);
    }
    if let Some(e) = error.downcast_ref::<ConfigError>() {
        return Some(match e {
            ConfigError::Unreadable(..) => ExitClass::NoInput,
            ConfigError::Load(_) | ConfigError::Invalid(_) => ExitClass::Config,
        });
    }
    if error.is::<BillsError>() {
        return Some(ExitClass::Data);
    }
    if let Some(e) = error.downcast_ref::<CalibrationError>() {
        return Some(match e {
            CalibrationError::NoBills(_) => ExitClass::Data,
            CalibrationError::Database(_) => ExitClass::Unavailable,
        });
    }
    if let Some(e) = error.downcast_ref::<EstimateError>() {
        return Some(match e {
            EstimateError::Unpriced(_) | EstimateError::Pricing(_) => ExitClass::Data,
            _ => ExitClass::Usage,
        });
    }
    if let Some(StoreError::BadUrl(_)) = error.downcast_ref::<StoreError>() {
        return Some(ExitClass::Config);
    }
    let unavailable = error.is::<StoreError>()
        || error.is::<sqlx::Error>()
        || error.is::<FinalFlushFailed>()
        || error.is::<BrokerRefused>()
        || error.is::<rdkafka::error::KafkaError>();
    unavailable.then_some(ExitClass::Unavailable)
}

/// A bad argument: exit code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A failure whose class only the code that meets it knows (a message built from a
/// librdkafka or PostgreSQL failure, a fit that cannot be made).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The exit class.
    pub class: ExitClass,
    /// What failed, for the user.
    pub message: String,
}

impl Failure {
    /// A failure of `class` saying `message`.
    pub fn new(class: ExitClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
}

/// A file the command was told to read cannot be read: exit code 66.
#[derive(Debug, thiserror::Error)]
// `error` is not a `#[source]`: the message holds it, and `{:#}` would print it twice.
#[error("cannot read {}: {error}", .path.display())]
pub struct InputError {
    /// The file.
    pub path: std::path::PathBuf,
    /// Why it cannot be read.
    pub error: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_have_the_sysexits_codes_and_the_outermost_typed_error_decides() {
        let codes: Vec<u8> = [
            ExitClass::Usage,
            ExitClass::Data,
            ExitClass::NoInput,
            ExitClass::Unavailable,
            ExitClass::Internal,
            ExitClass::Config,
        ]
        .map(ExitClass::code)
        .into();
        assert_eq!(codes, [64, 65, 66, 69, 70, 78]);
        let store = anyhow::Error::new(StoreError::Encoding("LATIN1".into())).context("cannot prepare");
        assert_eq!(ExitClass::of(&store), ExitClass::Unavailable);
        let config = anyhow::Error::new(ConfigError::Invalid(vec!["x".into()])).context("loadgen needs ...");
        assert_eq!(ExitClass::of(&config), ExitClass::Config);
        assert_eq!(ExitClass::of(&anyhow::anyhow!("a task panicked")), ExitClass::Internal);
    }
}
