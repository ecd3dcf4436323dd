//! The librdkafka client configuration and its failures: costwatch's own properties plus the
//! operator's, checked by librdkafka itself without connecting (every problem with where it was
//! set, never with a secret's value), and which broker errors no retry can fix.

use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;

use crate::config::{KafkaSettings, PropertyValue};
use crate::secret;

/// costwatch's properties, then the operator's on top (they win, as `kafka.properties` always
/// did). Each operator property is first set on its own, so that every bad one is reported,
/// with its origin and librdkafka's reason, and a secret value is never part of it.
pub fn client_config(base: &[(&str, String)], settings: &KafkaSettings) -> Result<ClientConfig, Vec<String>> {
    let mut config = ClientConfig::new();
    for (name, value) in base {
        config.set(*name, value);
    }
    let mut problems = Vec::new();
    for property in settings.operator_properties() {
        let value = property.value.expose();
        if let Err(reason) = check_property(&property.name, value) {
            let reason = match &property.value {
                PropertyValue::Secret(_) if !value.is_empty() => reason.replace(value, "<redacted>"),
                _ => reason,
            };
            problems.push(format!("{}: {}", property.origin, secret::scrub(&reason)));
        }
        config.set(&property.name, value);
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// librdkafka's verdict on one property, without the value (the error type quotes it).
fn check_property(name: &str, value: &str) -> Result<(), String> {
    match ClientConfig::new().set(name, value).create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(_, reason, _, _)) => Err(reason),
        Err(_) => Err("names or holds a NUL character".into()),
    }
}

/// Builds the whole client as `costwatch run` would, but with no broker to connect to: this
/// finds what only shows when the properties meet, such as a SASL mechanism this build lacks,
/// TLS files that do not load, or OIDC settings missing. Returns librdkafka's warnings.
pub fn check(base: &[(&str, String)], settings: &KafkaSettings) -> Result<Vec<String>, Vec<String>> {
    let mut config = client_config(base, settings)?;
    config.remove("bootstrap.servers");
    config.set_log_level(RDKafkaLogLevel::Warning);
    let context = CheckContext::default();
    let consumer: BaseConsumer<CheckContext> = config
        .create_with_context(context)
        .map_err(|e| vec![format!("kafka: librdkafka refuses the configuration: {}", scrubbed(&e))])?;
    // librdkafka queues its log lines (configuration warnings among them, logged while the
    // client was created) for the next poll, which serves them without waiting.
    let _ = consumer.poll(std::time::Duration::ZERO);
    let warnings = std::mem::take(&mut *consumer.context().warnings.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(warnings)
}

/// Collects librdkafka's configuration warnings instead of logging them.
#[derive(Default)]
struct CheckContext {
    warnings: Mutex<Vec<String>>,
}

impl ClientContext for CheckContext {
    fn log(&self, level: RDKafkaLogLevel, _fac: &str, message: &str) {
        // Without brokers librdkafka says so; that is the point of the check, not a warning.
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) && !message.contains("bootstrap.servers") {
            let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
            warnings.push(secret::scrub(message).into_owned());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log(RDKafkaLogLevel::Error, "ERROR", &format!("{error}: {reason}"));
    }
}

impl ConsumerContext for CheckContext {}

/// A Kafka error as text with every known secret scrubbed; `KafkaError::ClientConfig` quotes
/// the property's value, so only its reason is kept.
pub fn scrubbed(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, reason, name, _) => {
            format!("property {name:?}: {}", secret::scrub(reason))
        }
        other => secret::scrub(&other.to_string()).into_owned(),
    }
}

/// librdkafka's own build: `builtin.features` (e.g. `gzip,snappy,ssl,sasl,...`).
pub fn builtin_features() -> String {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(properties: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            topic: "t".into(),
            group_id: "g".into(),
            start_from: Default::default(),
            session_timeout: std::time::Duration::from_secs(10),
            properties: properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            property_files: Default::default(),
            resolved: None,
        }
    }

    #[test]
    fn this_build_has_tls_every_sasl_mechanism_and_every_codec() {
        let features = builtin_features();
        for feature in [
            "gzip",
            "snappy",
            "lz4",
            "zstd",
            "ssl",
            "sasl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
            "sasl_gssapi",
            "http",
            "oidc",
        ] {
            assert!(
                features.split(',').any(|f| f == feature),
                "{feature} missing from {features}"
            );
        }
    }

    #[test]
    fn a_misspelt_secret_property_is_reported_without_its_value() {
        let s = settings(&[("sasl.passwrod", "hunter2-hunter2"), ("security.protocol", "SASL_SSLX")]);
        let problems = client_config(&[], &s).unwrap_err();
        let text = problems.join("\n");
        assert!(
            text.contains(r#"kafka.properties."sasl.passwrod": No such configuration property"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kafka.properties."security.protocol": Invalid value "SASL_SSLX""#),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn every_supported_mechanism_builds_and_an_unknown_one_is_refused() {
        for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] {
            let s = settings(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanisms", mechanism),
                ("sasl.username", "u"),
                ("sasl.password", "p"),
                (
                    "enable.sasl.oauthbearer.unsecure.jwt",
                    if mechanism == "OAUTHBEARER" { "true" } else { "false" },
                ),
                // librdkafka's default kinit command names the keytab, so GSSAPI needs one.
                ("sasl.kerberos.keytab", "/etc/costwatch/costwatch.keytab"),
                ("sasl.kerberos.principal", "costwatch@EXAMPLE.COM"),
            ]);
            check(&[("group.id", "g".into())], &s).unwrap_or_else(|e| panic!("{mechanism}: {e:?}"));
        }
        let oidc = settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "OAUTHBEARER"),
            ("sasl.oauthbearer.method", "oidc"),
            ("sasl.oauthbearer.client.id", "costwatch"),
            ("sasl.oauthbearer.client.secret", "oidc-secret-value"),
            (
                "sasl.oauthbearer.token.endpoint.url",
                "https://login.example.invalid/token",
            ),
        ]);
        check(&[("group.id", "g".into())], &oidc).unwrap();
        let bad = settings(&[
            ("security.protocol", "SASL_SSL"),
            // What an MSK user might try first: IAM is not a SASL mechanism librdkafka has.
            ("sasl.mechanisms", "AWS_MSK_IAM"),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
        ]);
        let problems = check(&[("group.id", "g".into())], &bad).unwrap_err().join("\n");
        assert!(
            problems.contains("Unsupported SASL mechanism: AWS_MSK_IAM"),
            "{problems}"
        );
    }
}
