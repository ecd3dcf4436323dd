//! Delivery to receivers: Alertmanager's API v2 and generic webhooks signed with HMAC-SHA256.
//! Only the sending lives here; what to send and when is decided by `alerting`, and what was
//! sent is remembered by `store`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

use crate::config::AlertingSettings;

/// The header carrying `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "x-costwatch-signature";
/// The header carrying the delivery id: the same for every retry of one notification, so a
/// receiver can drop a repeat.
pub const DELIVERY_HEADER: &str = "x-costwatch-delivery";

/// Why a notification was not delivered; the outbox keeps it and retries (see [`retry_delay`]).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Connection refused, timeout, TLS: the URL is left out because it may hold a token.
    #[error("cannot reach {receiver}: {source}")]
    Unreachable {
        /// The receiver's name (`alertmanager` or the webhook's name).
        receiver: String,
        /// The client's error, with the URL removed.
        #[source]
        source: reqwest::Error,
    },
    /// The receiver answered with a non-2xx status.
    #[error("{receiver} answered {status}: {body}")]
    Refused {
        /// The receiver's name (`alertmanager` or the webhook's name).
        receiver: String,
        /// The HTTP status code it answered with.
        status: u16,
        /// The start of its answer (at most 300 characters), trimmed, for the log and `last_error`.
        body: String,
    },
    /// An outbox entry names a webhook the configuration no longer has; it stays queued until the webhook returns or the row is deleted.
    #[error("no webhook named {0:?} is configured any more")]
    UnknownReceiver(String),
    /// The HTTP client could not be built (e.g. no TLS backend); costwatch cannot notify at all.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What Alertmanager is to be told about one alert: the wire shape this module sends, which
/// `alerting::store` reads from and acknowledges in `budget_alert`.
#[derive(Debug, Clone)]
pub struct AlertmanagerAlert {
    /// The alert's identity ([`alert_key`](crate::alerting::budget::alert_key)).
    pub key: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// Which firing this is: each time the alert fires again the generation goes up by one.
    pub generation: i32,
    /// The labels Alertmanager groups and routes by.
    pub labels: BTreeMap<String, String>,
    /// The annotations shown to people (summary, description, spend, ...).
    pub annotations: BTreeMap<String, String>,
    /// When this generation started firing.
    pub starts_at: DateTime<Utc>,
    /// When it resolved; `None` while it fires (then `endsAt` is sent a few evaluations ahead).
    pub ends_at: Option<DateTime<Utc>>,
}

struct Webhook {
    name: String,
    url: String,
    secret: Vec<u8>,
    timeout: Duration,
}

/// Sends alerts to the configured Alertmanager and webhooks; one shared HTTP client for all.
pub struct Notifier {
    client: reqwest::Client,
    alertmanager: Option<String>,
    webhooks: Vec<Webhook>,
    generator_url: Option<String>,
    /// How far ahead a firing alert's `endsAt` is set: if costwatch stops re-sending it (it
    /// died and nobody took over), Alertmanager resolves it by itself after this long.
    resend_horizon: Duration,
}

/// Alertmanager API v2's postable alert.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert<'a> {
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    #[serde(rename = "generatorURL", skip_serializing_if = "Option::is_none")]
    generator_url: Option<&'a str>,
}

impl Notifier {
    /// A notifier for `[alerting]`: the Alertmanager URL, the webhooks with their secrets and timeouts. Fails only when the HTTP client cannot be built.
    pub fn new(settings: &AlertingSettings) -> Result<Self, NotifyError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("costwatch/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(NotifyError::Client)?;
        let webhooks = settings
            .webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| Webhook {
                name: w.name_or_default(i),
                url: w.url.clone(),
                secret: w.resolve_secret().unwrap_or_default().into_bytes(),
                timeout: w.timeout,
            })
            .collect();
        Ok(Self {
            client,
            alertmanager: settings
                .alertmanager_url
                .as_ref()
                .map(|u| format!("{}/api/v2/alerts", u.trim_end_matches('/'))),
            webhooks,
            generator_url: settings.external_url.clone(),
            resend_horizon: (settings.evaluation_interval * 4).max(Duration::from_secs(60)),
        })
    }

    /// Whether `alerting.alertmanager_url` is set; without it [`Notifier::post_alertmanager`] sends nothing.
    pub fn has_alertmanager(&self) -> bool {
        self.alertmanager.is_some()
    }

    /// The webhooks' names (`webhook-<index>` when unnamed): the receivers each transition queues a notification for.
    pub fn webhook_names(&self) -> Vec<String> {
        self.webhooks.iter().map(|w| w.name.clone()).collect()
    }

    /// Posts alerts to Alertmanager: firing ones with `endsAt` a few evaluations ahead, resolved
    /// ones with their real end.
    pub async fn post_alertmanager(&self, alerts: &[AlertmanagerAlert], now: DateTime<Utc>) -> Result<(), NotifyError> {
        let Some(url) = &self.alertmanager else {
            return Ok(());
        };
        let horizon = chrono::Duration::from_std(self.resend_horizon).unwrap_or(chrono::Duration::minutes(1));
        let body: Vec<PostableAlert> = alerts
            .iter()
            .map(|a| PostableAlert {
                labels: &a.labels,
                annotations: &a.annotations,
                starts_at: a.starts_at,
                ends_at: match a.ends_at {
                    Some(end) if a.state == "resolved" => end,
                    _ => now + horizon,
                },
                generator_url: self.generator_url.as_deref(),
            })
            .collect();
        let request = self.client.post(url).json(&body);
        send(request, "alertmanager").await
    }

    /// Posts one outbox entry to its webhook, signed. The body is the stored payload plus the
    /// delivery id, so every retry sends the same bytes.
    pub async fn post_webhook(&self, receiver: &str, delivery_id: i64, payload: &Value) -> Result<(), NotifyError> {
        let hook = self
            .webhooks
            .iter()
            .find(|w| w.name == receiver)
            .ok_or_else(|| NotifyError::UnknownReceiver(receiver.to_owned()))?;
        let mut body = payload.clone();
        if let Value::Object(map) = &mut body {
            map.insert("delivery_id".into(), Value::from(delivery_id));
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let request = self
            .client
            .post(&hook.url)
            .timeout(hook.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sign(&hook.secret, &bytes))
            .header(DELIVERY_HEADER, delivery_id.to_string())
            .body(bytes);
        send(request, receiver).await
    }
}

async fn send(request: reqwest::RequestBuilder, receiver: &str) -> Result<(), NotifyError> {
    let unreachable = |e: reqwest::Error| NotifyError::Unreachable {
        receiver: receiver.to_owned(),
        source: e.without_url(),
    };
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body: String = response.text().await.unwrap_or_default().chars().take(300).collect();
    Err(NotifyError::Refused {
        receiver: receiver.to_owned(),
        status: status.as_u16(),
        body: body.trim().to_owned(),
    })
}

/// `sha256=<hex>` of HMAC-SHA256 over `body`: what a receiver recomputes with its copy of the
/// secret and compares (in constant time) with the header.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How long to wait before retrying a delivery that failed `attempts` times: 1 s doubling to
/// five minutes. Retries never stop: a notification is only dropped by deleting it.
pub fn retry_delay(attempts: i32) -> Duration {
    let exp = attempts.clamp(0, 9) as u32;
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc_4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_back_off_to_five_minutes() {
        let delays: Vec<u64> = (0..12).map(|a| retry_delay(a).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
