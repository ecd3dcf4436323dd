//! Secrets: values that must never be printed (passwords, client secrets, tokens), and the one
//! scrubber that takes them out of text costwatch does not write itself (librdkafka's errors and
//! logs quote property values, e.g. `Invalid value "..." for configuration property`).

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::{PoisonError, RwLock};

use serde::Deserialize;

/// A secret value. `Debug` and `Display` print `<redacted>`; [`Secret::expose`] is the one way to
/// read it, so every use is greppable.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`; from here on it prints as `<redacted>`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it (a connection option, a signature key).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret file (the `*_file` convention of Prometheus and Grafana): the whole file,
    /// less one trailing newline, which editors and `echo` add and no secret means.
    pub fn from_file(path: &Path) -> std::io::Result<Secret> {
        let text = std::fs::read_to_string(path)?;
        let value = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        Ok(Secret(value.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Every secret this process knows, longest first (so that a secret containing another is
/// replaced whole). Filled once the settings are loaded.
static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Makes `secrets` known to [`scrub`]. Empty values are ignored (they would match everywhere).
pub fn register<'a>(secrets: impl IntoIterator<Item = &'a Secret>) {
    let mut known = KNOWN.write().unwrap_or_else(PoisonError::into_inner);
    for secret in secrets {
        if !secret.0.is_empty() && !known.contains(&secret.0) {
            known.push(secret.0.clone());
        }
    }
    known.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret replaced by `<redacted>`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let known = KNOWN.read().unwrap_or_else(PoisonError::into_inner);
    scrub_with(&known, text)
}

fn scrub_with<'t>(known: &[String], text: &'t str) -> Cow<'t, str> {
    let mut out = Cow::Borrowed(text);
    for secret in known {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), "<redacted>"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_itself() {
        let s = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2-hunter2");
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret \n\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "s3cret \n");
        std::fs::write(&path, "s3cret").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "s3cret");
    }

    #[test]
    fn scrubbing_replaces_longer_secrets_first() {
        let known = vec!["abcdef".to_owned(), "abc".to_owned()];
        assert_eq!(scrub_with(&known, "x abcdef y abc z"), "x <redacted> y <redacted> z");
        assert!(matches!(scrub_with(&known, "nothing"), Cow::Borrowed(_)));
    }
}
