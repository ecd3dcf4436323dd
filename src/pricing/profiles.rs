//! Usage profiles: the step from token counts to compute T and storage S per (model, hardware),
//! T = input × a + output × b, S = (input + output) × c, exact. Pure; shared by ingestion (new
//! events) and `rerate` (rows stored before a profile was added or changed).

use std::sync::{Arc, RwLock};

use rust_decimal::Decimal;

use crate::config::UsageProfileSettings;
use crate::domain::{ComputeUnits, StorageUnits};

/// One configured profile, ready to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageProfile {
    /// What rows derived by it record in `window_usage.profile`.
    pub name: String,
    model: String,
    hardware: String,
    compute_per_input_token: Decimal,
    compute_per_output_token: Decimal,
    storage_per_token: Decimal,
}

/// The profiles in configured order; the first whose globs match a pair applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageProfiles(Vec<UsageProfile>);

/// Why T and S could not be derived from tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeriveError {
    /// A product or sum needs more digits than a 96-bit decimal holds; nothing is rounded.
    #[error("T or S derived from these tokens does not fit in a 96-bit decimal")]
    Overflow,
}

impl UsageProfiles {
    /// The profiles of `[[usage_profiles]]`, in order.
    pub fn new(settings: &[UsageProfileSettings]) -> Self {
        Self(
            settings
                .iter()
                .map(|s| UsageProfile {
                    name: s.display_name(),
                    model: s.model.clone(),
                    hardware: s.hardware.clone(),
                    compute_per_input_token: s.compute_per_input_token,
                    compute_per_output_token: s.compute_per_output_token,
                    storage_per_token: s.storage_per_token,
                })
                .collect(),
        )
    }

    /// The index of the first profile matching `model` and `hardware`.
    pub fn find(&self, model: &str, hardware: &str) -> Option<usize> {
        self.0
            .iter()
            .position(|p| glob_match(&p.model, model) && glob_match(&p.hardware, hardware))
    }

    /// The profile at `index` (from [`UsageProfiles::find`]).
    pub fn get(&self, index: usize) -> Option<&UsageProfile> {
        self.0.get(index)
    }

    /// Whether no profile is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The profiles in force, shared by every source's decoder and swapped by a configuration
/// reload: each message is decoded with one snapshot of them.
#[derive(Debug, Clone, Default)]
pub struct LiveProfiles(Arc<RwLock<Arc<UsageProfiles>>>);

impl LiveProfiles {
    /// The profiles in force now.
    pub fn current(&self) -> Arc<UsageProfiles> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `profiles` in force for every message decoded from now on.
    pub fn replace(&self, profiles: UsageProfiles) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(profiles);
    }
}

impl From<UsageProfiles> for LiveProfiles {
    fn from(profiles: UsageProfiles) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(profiles))))
    }
}

impl UsageProfile {
    /// T and S of `input` and `output` tokens, exact.
    pub fn derive(&self, input: Decimal, output: Decimal) -> Result<(ComputeUnits, StorageUnits), DeriveError> {
        let mul = |a: Decimal, b: Decimal| a.checked_mul(b).ok_or(DeriveError::Overflow);
        let compute = mul(input, self.compute_per_input_token)?
            .checked_add(mul(output, self.compute_per_output_token)?)
            .ok_or(DeriveError::Overflow)?;
        let tokens = input.checked_add(output).ok_or(DeriveError::Overflow)?;
        let storage = mul(tokens, self.storage_per_token)?;
        Ok((ComputeUnits(compute.normalize()), StorageUnits(storage.normalize())))
    }
}

/// `*` matches any run of characters (none included), `?` exactly one; everything else itself.
pub fn glob_match(glob: &str, text: &str) -> bool {
    // The shapes profiles are written in, without collecting characters (this runs for every
    // token event): everything, a prefix, or a name.
    let literal = |s: &str| !s.contains(['*', '?']);
    if glob == "*" {
        return true;
    }
    if let Some(prefix) = glob.strip_suffix('*').filter(|p| literal(p)) {
        return text.starts_with(prefix);
    }
    if literal(glob) {
        return glob == text;
    }
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    // The classic greedy match with one backtrack point: linear for practical globs.
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match g.get(gi) {
            Some('*') => {
                star = Some((gi, ti));
                gi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                gi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sg, st)) => {
                    gi = sg + 1;
                    ti = st + 1;
                    star = Some((sg, st + 1));
                }
                None => return false,
            },
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(model: &str, hardware: &str, a: &str, b: &str, c: &str) -> UsageProfileSettings {
        UsageProfileSettings {
            name: None,
            model: model.into(),
            hardware: hardware.into(),
            compute_per_input_token: a.parse().unwrap(),
            compute_per_output_token: b.parse().unwrap(),
            storage_per_token: c.parse().unwrap(),
        }
    }

    #[test]
    fn globs_match_runs_and_single_characters() {
        assert!(glob_match("llama-*", "llama-3-70b"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*-80g", "a100-80g"));
        assert!(glob_match("a*b*c", "aXXbYYbZc"));
        assert!(!glob_match("a*b*c", "aXXbYYbZ"));
        assert!(glob_match("gpt-4o", "gpt-4o"));
        assert!(!glob_match("gpt-4o", "gpt-4o-mini"));
    }

    #[test]
    fn the_first_matching_profile_derives_t_and_s_exactly() {
        let profiles = UsageProfiles::new(&[
            profile("llama-*", "a100-*", "0.5", "2", "0.001"),
            profile("*", "*", "1", "1", "0"),
        ]);
        let at = profiles.find("llama-3-8b", "a100-80g").unwrap();
        assert_eq!(at, 0);
        let p = profiles.get(at).unwrap();
        assert_eq!(p.name, "llama-*@a100-*");
        let (t, s) = p.derive(Decimal::from(1200), Decimal::from(300)).unwrap();
        assert_eq!(t.to_string(), "1200"); // 1200 * 0.5 + 300 * 2
        assert_eq!(s.to_string(), "1.5"); // 1500 * 0.001
        assert_eq!(profiles.find("qwen", "h100"), Some(1));
        assert_eq!(UsageProfiles::default().find("qwen", "h100"), None);
    }

    #[test]
    fn a_derivation_that_cannot_be_exact_is_refused() {
        let p = UsageProfiles::new(&[profile("*", "*", "79228162514264337593543950335", "0", "0")]);
        assert_eq!(
            p.get(0).unwrap().derive(Decimal::from(2), Decimal::ZERO),
            Err(DeriveError::Overflow)
        );
    }
}
