//! Whether an error may go away by itself: the one place that classifies database and broker
//! errors as transient (retry with backoff) or permanent (retrying the same thing cannot help:
//! log once, count, and act on it).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What a caller may do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The server is down, the connection dropped, a lock or a timeout under load: the same
    /// request may succeed later.
    Transient,
    /// The request itself is refused (a constraint, a permission, a limit, bad data or
    /// configuration): sending it again gets the same answer.
    Permanent,
}

impl ErrorClass {
    /// The `class` label of `costwatch_flush_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }

    pub fn is_transient(self) -> bool {
        self == ErrorClass::Transient
    }
}

/// Classifies a PostgreSQL client error.
pub fn of_sqlx(error: &sqlx::Error) -> ErrorClass {
    use sqlx::Error as E;
    match error {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) => ErrorClass::Transient,
        E::Database(db) => db.code().map_or(ErrorClass::Permanent, |code| of_sqlstate(&code)),
        _ => ErrorClass::Permanent,
    }
}

/// Classifies a SQLSTATE code: connection exceptions (08), operator intervention (57P: shutdown,
/// 57014: a statement timeout), transaction rollbacks (40: serialization failure, deadlock),
/// insufficient resources (53), lock not available (55P03) and system errors (58: I/O) may pass;
/// everything else (data exceptions 22, constraint violations 23, program limits 54 such as an
/// index row too large, permissions and syntax 42, cardinality 21) is the request's own fault.
pub fn of_sqlstate(code: &str) -> ErrorClass {
    let transient =
        ["08", "57P", "40", "53", "58"].iter().any(|p| code.starts_with(p)) || matches!(code, "57014" | "55P03");
    if transient {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// Classifies a Kafka client error: authentication, authorization, TLS and configuration
/// problems are permanent; the rest (brokers down, timeouts, rebalances) librdkafka retries.
pub fn of_kafka(error: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    let Some(code) = error.rdkafka_error_code() else {
        return match error {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Subscription(_) => {
                ErrorClass::Permanent
            }
            _ => ErrorClass::Transient,
        };
    };
    match code {
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::SSL
        | C::InvalidArgument
        | C::UnsupportedFeature
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::InvalidConfig => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_that_may_pass_are_transient_and_the_rest_permanent() {
        for transient in ["08006", "57P01", "57014", "40001", "40P01", "53300", "55P03", "58030"] {
            assert_eq!(of_sqlstate(transient), ErrorClass::Transient, "{transient}");
        }
        // 54000: "index row size 4272 exceeds btree version 4 maximum 2704"; 22021: a character
        // the database encoding cannot hold; 42501: permission denied; 21000: one row twice.
        for permanent in ["54000", "22021", "22P05", "23505", "42501", "42P01", "21000", "XX000"] {
            assert_eq!(of_sqlstate(permanent), ErrorClass::Permanent, "{permanent}");
        }
    }

    #[test]
    fn io_errors_are_transient_and_decoding_errors_permanent() {
        let io = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert_eq!(of_sqlx(&io), ErrorClass::Transient);
        assert_eq!(of_sqlx(&sqlx::Error::PoolTimedOut), ErrorClass::Transient);
        assert_eq!(of_sqlx(&sqlx::Error::RowNotFound), ErrorClass::Permanent);
    }

    #[test]
    fn kafka_authentication_and_tls_failures_are_permanent() {
        let auth = KafkaError::MessageConsumption(RDKafkaErrorCode::SaslAuthenticationFailed);
        assert_eq!(of_kafka(&auth), ErrorClass::Permanent);
        let tls = KafkaError::MessageConsumption(RDKafkaErrorCode::SSL);
        assert_eq!(of_kafka(&tls), ErrorClass::Permanent);
        let down = KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown);
        assert_eq!(of_kafka(&down), ErrorClass::Transient);
    }
}
