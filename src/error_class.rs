//! Whether an error may go away by itself: the one place that classifies database and broker
//! errors as transient (retry with backoff) or permanent (retrying the same thing cannot help:
//! log once, count, and act on it). PostgreSQL errors by SQLSTATE ([`of_sqlx`]); Kafka client
//! errors by librdkafka's code ([`kafka_failure`]: only TLS and authentication failures are
//! permanent, librdkafka retries everything else by itself).

use std::fmt;

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

    /// Whether waiting and retrying may help.
    pub fn is_transient(self) -> bool {
        self == ErrorClass::Transient
    }
}

/// Classifies a PostgreSQL client error.
pub fn of_sqlx(error: &sqlx::Error) -> ErrorClass {
    use sqlx::Error as E;
    match error {
        // A TLS setup that fails (no TLS on the server, an unreadable certificate) fails the
        // same way next time; a certificate that does not verify arrives as I/O and is caught
        // by `StoreError::connect_failure` first.
        E::Tls(_) => ErrorClass::Permanent,
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => ErrorClass::Transient,
        E::Database(db) => db.code().map_or(ErrorClass::Permanent, |code| of_sqlstate(&code)),
        _ => ErrorClass::Permanent,
    }
}

/// Classifies a SQLSTATE code: connection exceptions (08), operator intervention (57P: shutdown,
/// 57014: a statement timeout), transaction rollbacks (40: serialization failure, deadlock),
/// insufficient resources (53), lock not available (55P03) and system errors (58: I/O) may pass;
/// everything else (data exceptions 22, constraint violations 23, invalid authorization 28, a
/// database that does not exist 3D000, program limits 54 such as an index row too large,
/// permissions and syntax 42, cardinality 21) is the request's own fault.
pub fn of_sqlstate(code: &str) -> ErrorClass {
    let transient =
        ["08", "57P", "40", "53", "58"].iter().any(|p| code.starts_with(p)) || matches!(code, "57014" | "55P03");
    if transient {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// A broker failure that retrying will not fix: the daemon stops and says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaFailure {
    /// The broker's certificate does not verify against `ssl.ca.location` (or the system's
    /// roots), or not for the broker's host name.
    Certificate,
    /// Any other TLS failure: a plaintext port, no common protocol version, a client
    /// certificate the broker refuses.
    Tls,
    /// SASL: wrong user or password, a mechanism the broker does not enable, a token refused.
    Authentication,
}

impl fmt::Display for KafkaFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KafkaFailure::Certificate => {
                "TLS certificate verification failed (check ssl.ca.location and that the certificate names the broker's host)"
            }
            KafkaFailure::Tls => "TLS handshake failed (check security.protocol and the broker's TLS listener)",
            KafkaFailure::Authentication => {
                "authentication failed (check sasl.mechanisms, sasl.username and the password or token)"
            }
        })
    }
}

/// Which broker errors are permanent. librdkafka reports a certificate or handshake failure as
/// `__SSL` (a disconnect during the handshake is `__TRANSPORT`, so a restarting broker is not
/// mistaken for one) and a refused login as `__AUTHENTICATION`; it would retry both forever.
pub fn kafka_failure(error: &KafkaError, reason: &str) -> Option<KafkaFailure> {
    match error.rdkafka_error_code()? {
        RDKafkaErrorCode::SSL => {
            let certificate = [
                "certificate verify failed",
                "verify broker certificate",
                "did not provide a certificate",
            ]
            .iter()
            .any(|s| reason.contains(s));
            Some(if certificate {
                KafkaFailure::Certificate
            } else {
                KafkaFailure::Tls
            })
        }
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
            Some(KafkaFailure::Authentication)
        }
        _ => None,
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
    fn certificate_and_login_failures_are_permanent_and_disconnects_are_not() {
        let ssl = KafkaError::Global(RDKafkaErrorCode::SSL);
        assert_eq!(
            kafka_failure(
                &ssl,
                "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed"
            ),
            Some(KafkaFailure::Certificate)
        );
        assert_eq!(
            kafka_failure(&ssl, "SSL handshake failed: wrong version number"),
            Some(KafkaFailure::Tls)
        );
        assert_eq!(
            kafka_failure(
                &KafkaError::Global(RDKafkaErrorCode::Authentication),
                "SASL authentication error"
            ),
            Some(KafkaFailure::Authentication)
        );
        assert_eq!(
            kafka_failure(
                &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
                "Disconnected"
            ),
            None
        );
        assert_eq!(
            kafka_failure(&KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), ""),
            None
        );
    }
}
