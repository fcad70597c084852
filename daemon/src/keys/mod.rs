//! API keys: loading them from the environment, a `.env` file and config
//! (SPEC §4), and holding them as secrets. This module owns [`KeyId`],
//! [`ApiKey`], [`KeyRing`], [`EnvSource`] and [`mask`]; limiters and the key
//! pool are built on top of these types elsewhere.
//!
//! # Conventions
//!
//! For a provider, the env *prefixes* are `keys_env` (default: the provider
//! name upper-cased, other non-alphanumerics → `_`), then `env_aliases`, then the built-in
//! aliases `CLAUDE` (for `anthropic`) and `GOOGLE` (for `gemini`). For each
//! prefix `P`:
//!
//! | variable | meaning |
//! |---|---|
//! | `P_API_KEY` | one key, instance 0 |
//! | `P_API_KEY_N` (any N ≥ 0) | one key, instance N |
//! | `P_API_KEYS=k1,k2,…` | one key per item, instance = position from 0 (blank items are skipped but keep their position) |
//! | `P_MODEL_i` | restricts key `i` to these models (comma list) |
//! | `P_MAX_TOKENS_PER_MINUTE_i`, `P_MAX_TOKENS_PER_DAY_i` | per-key `tpm`, `tpd` |
//! | `P_MAX_REQUESTS_PER_MINUTE_i`, `P_MAX_REQUESTS_PER_DAY_i` | per-key `rpm`, `rpd` |
//! | `P_WEIGHT_i`, `P_MAX_CONCURRENT_i` | per-key weight (default 1) and concurrency cap |
//! | `P_ACCOUNT_i` | the account (project) key `i` belongs to: keys of one account share one set of limits |
//!
//! Config keys (`providers.X.keys = [{ key | key_env, instance, weight,
//! models, limits, max_concurrent, account }]`) are added to the env ones. Blank
//! values are skipped. Keyless providers get one anonymous slot `X#0` when
//! they have no key. Env vars named like keys whose prefix no provider uses
//! are not loaded; they are listed in [`KeyReport::unknown_prefixes`].
//!
//! # Instance numbers (deterministic)
//!
//! Every key source *claims* an instance number, in this precedence order:
//!
//! 1. config keys with an explicit `instance`, in list order;
//! 2. `P_API_KEY_N`, primary prefix first, then each alias, N ascending;
//! 3. `P_API_KEYS[i]`, same prefix order;
//! 4. bare `P_API_KEY` (claims 0), same prefix order;
//! 5. config keys without `instance` (claim nothing).
//!
//! The same secret seen several times is one key: its claims are pooled and
//! it takes the lowest claimed number still free (the merge is reported by id).
//! Keys are placed in order of their first appearance above. A key whose
//! claims are all taken by a different secret (e.g. `P_API_KEY` when
//! `P_API_KEYS` also has an item 0) is renumbered to the lowest free number,
//! in the same order, after all claims are placed; this is reported too.
//!
//! Per-key overrides `P_*_i` apply to the key that ends up as `X#i`. When the
//! primary prefix and an alias both set one, the primary wins; env overrides
//! win over fields of a config key; for a merged key, config fields are taken
//! from its first source that sets them and `models` lists are united.
//!
//! # Secrets
//!
//! Secrets live in [`secrecy::SecretString`]. Nothing here prints them:
//! `Debug`/`Display` of every type, [`KeyError`] and [`KeyReport`] name keys
//! by id, variable name or [`mask`]ed form only. [`ApiKey::expose_secret`] is
//! for the request-building path alone.

mod env;
mod load;
mod mask;

pub use env::EnvSource;
pub use load::load_keys;
pub use mask::mask;

use crate::config::Limits;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// Errors while loading keys. None of them carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read env file {path}: {source}")]
    EnvFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("env file {path}: cannot parse {} (its text is not shown, it may hold a secret)", .line.map_or_else(|| "a line".to_string(), |l| format!("line {l}")))]
    EnvFileParse { path: PathBuf, line: Option<usize> },
    #[error("{var} = {value}: expected {expected}")]
    InvalidNumber {
        var: String,
        /// The value quoted, or its length only when it is long.
        value: String,
        expected: &'static str,
    },
    #[error("config providers.{provider}.keys[{index}]: {problem}")]
    ConfigKey {
        provider: String,
        index: usize,
        problem: String,
    },
    #[error("config providers.{provider}: {problem}")]
    Provider { provider: String, problem: String },
    #[error("invalid key id: expected `provider#N` with N a whole number")]
    InvalidKeyId,
}

impl From<KeyError> for crate::Error {
    fn from(e: KeyError) -> Self {
        crate::Error::Other(e.to_string())
    }
}

/// A key's id, `provider#N`. Orders by provider, then instance.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId {
    provider: Arc<str>,
    instance: u32,
}

impl KeyId {
    pub fn new(provider: impl Into<Arc<str>>, instance: u32) -> Self {
        KeyId {
            provider: provider.into(),
            instance,
        }
    }

    pub(crate) fn provider(&self) -> &str {
        &self.provider
    }

    pub fn instance(&self) -> u32 {
        self.instance
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.provider, self.instance)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for KeyId {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (provider, n) = s.rsplit_once('#').ok_or(KeyError::InvalidKeyId)?;
        if provider.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(KeyError::InvalidKeyId);
        }
        let instance = n.parse().map_err(|_| KeyError::InvalidKeyId)?;
        Ok(KeyId::new(provider, instance))
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Masked form shown for the anonymous slot of a keyless provider.
pub(crate) const KEYLESS_MASK: &str = "(keyless)";

/// A key as loaded. The secret is never part of `Debug`/`Display`.
#[derive(Clone)]
pub struct ApiKey {
    pub id: KeyId,
    /// `None` for the anonymous slot of a keyless provider.
    secret: Option<SecretString>,
    /// `gsk_…x9f2`, or [`KEYLESS_MASK`].
    pub masked: String,
    /// Relative share for weighted strategies (default 1).
    pub weight: u32,
    /// Models this key may serve; empty means all.
    pub models: Vec<String>,
    /// Per-key overrides only; see [`ApiKey::effective_limits`].
    pub limits: Limits,
    /// Per-key concurrency cap override.
    pub max_concurrent: Option<u32>,
    /// The account (project) the key belongs to: keys of one provider with
    /// the same account share one set of limits. Not a secret.
    pub account: Option<String>,
    /// Where it came from (`env GROQ_API_KEY_2`, `.env line 7 (GROQ_API_KEY_2)`,
    /// `config providers.groq.keys[0]`), never the value.
    pub source: String,
}

impl ApiKey {
    /// A key with default settings (weight 1, all models, no overrides).
    pub fn new(id: KeyId, secret: Option<SecretString>, source: impl Into<String>) -> Self {
        let masked = match &secret {
            Some(s) => mask(s.expose_secret()),
            None => KEYLESS_MASK.to_string(),
        };
        ApiKey {
            id,
            secret,
            masked,
            weight: 1,
            models: Vec::new(),
            limits: Limits::default(),
            max_concurrent: None,
            account: None,
            source: source.into(),
        }
    }

    /// The secret, for building the upstream request only. `None` when keyless.
    pub fn expose_secret(&self) -> Option<&str> {
        self.secret.as_ref().map(|s| s.expose_secret())
    }

    pub fn is_keyless(&self) -> bool {
        self.secret.is_none()
    }

    /// True if this key may serve `model` (an empty list allows all).
    pub fn serves_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// This key's overrides on top of the provider's per-key defaults.
    pub(crate) fn effective_limits(&self, provider_defaults: &Limits) -> Limits {
        self.limits.or(*provider_defaults)
    }

    /// This key's concurrency cap, else the provider's.
    pub(crate) fn effective_max_concurrent(&self, provider_default: Option<u32>) -> Option<u32> {
        self.max_concurrent.or(provider_default)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("masked", &self.masked)
            .field("weight", &self.weight)
            .field("models", &self.models)
            .field("limits", &self.limits)
            .field("max_concurrent", &self.max_concurrent)
            .field("account", &self.account)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.id, self.masked, self.source)
    }
}

/// What loading did besides producing keys: merges, renumbering, skipped
/// variables and env prefixes no provider uses. Ids and names only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyReport {
    /// Keys whose secret appeared under several names.
    pub merged: Vec<MergedKey>,
    /// Keys that lost their claimed instance number to another secret.
    pub renumbered: Vec<Renumbered>,
    /// Key sources that were not loaded (blank value, unset `key_env`, …).
    pub skipped: Vec<Skipped>,
    /// Prefixes `P` of `P_API_KEY*` variables that no provider reads.
    pub unknown_prefixes: Vec<String>,
    /// Per-key override variables naming an instance that has no key.
    pub unused_overrides: Vec<String>,
    /// Enabled, non-keyless providers that got no key.
    pub providers_without_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MergedKey {
    pub id: KeyId,
    /// Every source of this secret, the kept one included.
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Renumbered {
    pub id: KeyId,
    /// The lowest instance number it claimed.
    pub wanted: u32,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub provider: String,
    pub source: String,
    pub reason: String,
}

/// All loaded keys, grouped by provider and sorted by instance.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    by_provider: BTreeMap<String, Vec<ApiKey>>,
    report: KeyReport,
}

impl KeyRing {
    /// A ring from ready-made keys (tests, embedding). A later key with the
    /// same id as an earlier one is dropped.
    pub fn from_keys(keys: impl IntoIterator<Item = ApiKey>) -> Self {
        let mut by_provider: BTreeMap<String, Vec<ApiKey>> = BTreeMap::new();
        for key in keys {
            let list = by_provider
                .entry(key.id.provider().to_string())
                .or_default();
            if let Err(pos) = list.binary_search_by_key(&key.id.instance(), |k| k.id.instance()) {
                list.insert(pos, key);
            }
        }
        KeyRing {
            by_provider,
            report: KeyReport::default(),
        }
    }

    /// All keys: providers by name, then instance.
    pub fn iter(&self) -> impl Iterator<Item = &ApiKey> {
        self.by_provider.values().flatten()
    }

    /// A provider's keys, sorted by instance (empty if none).
    pub fn for_provider(&self, provider: &str) -> &[ApiKey] {
        self.by_provider.get(provider).map_or(&[], Vec::as_slice)
    }

    pub fn get(&self, id: &KeyId) -> Option<&ApiKey> {
        let list = self.by_provider.get(id.provider())?;
        let pos = list
            .binary_search_by_key(&id.instance(), |k| k.id.instance())
            .ok()?;
        list.get(pos)
    }

    /// Providers that have at least one key, by name.
    pub(crate) fn providers(&self) -> impl Iterator<Item = &str> {
        self.by_provider.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_provider.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn report(&self) -> &KeyReport {
        &self.report
    }
}

impl<'a> IntoIterator for &'a KeyRing {
    type Item = &'a ApiKey;
    type IntoIter =
        std::iter::Flatten<std::collections::btree_map::Values<'a, String, Vec<ApiKey>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.by_provider.values().flatten()
    }
}

impl fmt::Display for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} key(s)", self.len())?;
        for key in self.iter() {
            write!(f, "\n  {key}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trips() {
        let id: KeyId = "groq#2".parse().unwrap();
        assert_eq!(id.provider(), "groq");
        assert_eq!(id.instance(), 2);
        assert_eq!(id.to_string(), "groq#2");
        assert_eq!(format!("{id:?}"), "groq#2");
        let odd: KeyId = "my#provider#10".parse().unwrap();
        assert_eq!((odd.provider(), odd.instance()), ("my#provider", 10));
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"groq#2\"");
        let back: KeyId = serde_json::from_str("\"groq#2\"").unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn key_id_rejects_garbage_without_echoing_it() {
        for bad in [
            "groq",
            "#1",
            "groq#",
            "groq#-1",
            "groq#x",
            "groq#99999999999",
            "groq#+1",
        ] {
            let err = bad.parse::<KeyId>().unwrap_err();
            assert!(matches!(err, KeyError::InvalidKeyId), "{bad}");
            assert!(!err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn key_ids_order_by_provider_then_instance() {
        let mut ids = [
            KeyId::new("groq", 10),
            KeyId::new("anthropic", 1),
            KeyId::new("groq", 2),
        ];
        ids.sort();
        let shown: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["anthropic#1", "groq#2", "groq#10"]);
    }

    #[test]
    fn api_key_output_never_contains_the_secret() {
        let secret = "gsk_FAKEFAKEFAKEsecretMIDDLEx9f2";
        let key = ApiKey::new(
            KeyId::new("groq", 0),
            Some(secret.into()),
            "env GROQ_API_KEY",
        );
        assert_eq!(key.masked, "gsk_…x9f2");
        assert_eq!(key.expose_secret(), Some(secret));
        for out in [format!("{key:?}"), format!("{key}"), format!("{key:#?}")] {
            assert!(!out.contains("secretMIDDLE"), "{out}");
            assert!(out.contains("groq#0"), "{out}");
        }
        let ring = KeyRing::from_keys([key]);
        for out in [format!("{ring:?}"), format!("{ring}")] {
            assert!(!out.contains("secretMIDDLE"), "{out}");
            assert!(out.contains("gsk_…x9f2"), "{out}");
        }
    }

    #[test]
    fn ring_lookup_and_order() {
        let ring = KeyRing::from_keys([
            ApiKey::new(KeyId::new("groq", 3), Some("a-123456789012".into()), "t"),
            ApiKey::new(KeyId::new("groq", 1), Some("b-123456789012".into()), "t"),
            ApiKey::new(
                KeyId::new("anthropic", 0),
                Some("c-123456789012".into()),
                "t",
            ),
            ApiKey::new(KeyId::new("groq", 1), Some("dup-12345678901".into()), "t"),
        ]);
        assert_eq!(ring.len(), 3);
        let ids: Vec<String> = ring.iter().map(|k| k.id.to_string()).collect();
        assert_eq!(ids, ["anthropic#0", "groq#1", "groq#3"]);
        assert_eq!(ring.get(&KeyId::new("groq", 1)).unwrap().masked, "b-…9012");
        assert!(ring.get(&KeyId::new("groq", 2)).is_none());
        assert!(ring.for_provider("mistral").is_empty());
        assert_eq!((&ring).into_iter().count(), 3);
    }

    #[test]
    fn effective_settings_fall_back_to_provider() {
        let mut key = ApiKey::new(KeyId::new("ollama", 0), None, "keyless provider");
        assert!(key.is_keyless());
        assert_eq!(key.masked, KEYLESS_MASK);
        key.limits.tpm = Some(10);
        let base = Limits {
            rpm: Some(30),
            tpm: Some(6000),
            ..Limits::default()
        };
        let eff = key.effective_limits(&base);
        assert_eq!((eff.rpm, eff.tpm, eff.rpd), (Some(30), Some(10), None));
        assert_eq!(key.effective_max_concurrent(Some(5)), Some(5));
        key.models = vec!["m1".into()];
        assert!(key.serves_model("m1") && !key.serves_model("m2"));
    }
}
