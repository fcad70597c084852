//! Configuration: the TOML file, `LLMQ__SECTION__FIELD` env overrides and
//! the built-in catalog underneath (SPEC §5).
//!
//! The types here are the validated, in-memory form every other module reads.
//! Loading, merging with the catalog and the file/field error messages are in
//! this module too; the catalog data itself is in `catalog`.

use crate::job::{Strategy, Tier};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub redis: RedisConfig,
    pub queue: QueueConfig,
    pub routing: RoutingConfig,
    pub keys: KeysConfig,
    pub plugins: PluginsConfig,
    pub admin: AdminConfig,
    /// Providers by name. After loading, this is the catalog merged with the
    /// user's file, field by field.
    pub providers: BTreeMap<String, ProviderConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub lanes: Vec<String>,
    /// Jobs run at once by this daemon.
    pub concurrency: usize,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde_compat")]
    pub visibility_timeout: Duration,
    pub retry: RetryConfig,
    #[serde(with = "humantime_serde_compat")]
    pub result_ttl: Duration,
    /// Largest job body accepted, in bytes.
    pub max_job_bytes: usize,
    /// Approximate cap of the `llmq:results` stream.
    pub results_maxlen: usize,
    /// How long in-flight jobs may run after SIGTERM before the rest is left pending.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde_compat")]
    pub initial_delay: Duration,
    pub factor: f64,
    #[serde(with = "humantime_serde_compat")]
    pub max_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOrder {
    /// Tier, then estimated cost.
    #[default]
    Cost,
    /// Explicit `priority` numbers (lower first), as in seed 002's table.
    Priority,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub order: RouteOrder,
    /// How long a job waits for a cheaper tier before spilling to the next.
    #[serde(with = "humantime_serde_compat")]
    pub wait_for_cheaper: Duration,
    /// Deadline of a job that gives none.
    #[serde(with = "humantime_serde_compat")]
    pub default_deadline: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// A `.env` file to read keys from (in addition to the process env).
    pub env_file: Option<String>,
    /// How often a disabled key (auth failed / out of credit) is re-probed.
    #[serde(with = "humantime_serde_compat")]
    pub reprobe_interval: Duration,
    /// Default cooldown after a 429 without a retry hint.
    #[serde(with = "humantime_serde_compat")]
    pub default_cooldown: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    pub dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port`; empty disables the admin API.
    pub listen: String,
    /// Name of the env var holding the bearer token.
    pub token_env: String,
}

/// The shape of a limit: how a per-window budget is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitShape {
    /// At most N in any rolling window (the safe default).
    #[default]
    Rolling,
    /// GCRA / token bucket (governor): burst N, refilled continuously.
    TokenBucket,
}

/// Per-key limits. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpd: Option<u64>,
}

impl Limits {
    /// Each field from `self`, else from `base`.
    pub fn or(self, base: Limits) -> Limits {
        Limits {
            rpm: self.rpm.or(base.rpm),
            tpm: self.tpm.or(base.tpm),
            rpd: self.rpd.or(base.rpd),
            tpd: self.tpd.or(base.tpd),
        }
    }
}

/// A provider: where it is, what it costs, how its keys are limited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Plugin name (`openai`, `anthropic`, `gemini`, or a third-party one).
    pub plugin: String,
    pub base_url: String,
    pub tier: Tier,
    /// Env prefix for keys: `GROQ` reads GROQ_API_KEY, GROQ_API_KEY_N, GROQ_API_KEYS.
    pub keys_env: Option<String>,
    /// Extra env prefixes that mean the same provider (`CLAUDE` for anthropic).
    pub env_aliases: Vec<String>,
    /// No key needed (Ollama): one anonymous slot.
    pub keyless: bool,
    /// Per-key default limits.
    pub limits: Limits,
    /// Per-key cap on concurrent requests.
    pub max_concurrent: Option<u32>,
    pub strategy: Strategy,
    /// Cooldown after a 429 without a retry hint.
    #[serde(with = "humantime_serde_compat::option")]
    pub cooldown: Option<Duration>,
    /// Length of the rate window (60 s upstream; tests compress it).
    #[serde(with = "humantime_serde_compat::option")]
    pub window: Option<Duration>,
    pub limit_shape: LimitShape,
    /// Explicit routing priority for `order = "priority"` (lower first).
    pub priority: Option<i64>,
    /// Daily spend cap in USD, from real usage; skipped until the next UTC day when reached.
    pub budget_usd_per_day: Option<f64>,
    /// Disabled providers are ignored entirely.
    pub enabled: bool,
    /// Free-form options passed to the plugin (`anthropic_version`, `headers`, …).
    pub options: BTreeMap<String, serde_json::Value>,
    pub models: Vec<ModelConfig>,
    /// Keys given in config (in addition to the env).
    pub keys: Vec<KeyConfig>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            plugin: "openai".into(),
            base_url: String::new(),
            tier: Tier::Paid,
            keys_env: None,
            env_aliases: vec![],
            keyless: false,
            limits: Limits::default(),
            max_concurrent: None,
            strategy: Strategy::RoundRobin,
            cooldown: None,
            window: None,
            limit_shape: LimitShape::Rolling,
            priority: None,
            budget_usd_per_day: None,
            enabled: true,
            options: BTreeMap::new(),
            models: vec![],
            keys: vec![],
        }
    }
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The model id on the wire.
    pub id: String,
    /// Other names producers may use (`gpt4o`, `llama-vision`).
    pub aliases: Vec<String>,
    pub capabilities: Vec<crate::job::Capability>,
    /// Context window in tokens.
    pub context: Option<u64>,
    pub price: Price,
    /// Overrides the provider's tier for this model (a paid model on a free provider).
    pub tier: Option<Tier>,
    /// Overrides the provider's priority for this model.
    pub priority: Option<i64>,
}

/// A key given in config rather than the env.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyConfig {
    /// The secret itself, or
    pub key: Option<String>,
    /// the name of an env var holding it.
    pub key_env: Option<String>,
    /// Instance number (the N of `provider#N`); assigned when absent.
    pub instance: Option<u32>,
    pub weight: Option<u32>,
    /// Models this key may serve (all when empty).
    pub models: Vec<String>,
    pub limits: Limits,
    pub max_concurrent: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redis: RedisConfig::default(),
            queue: QueueConfig::default(),
            routing: RoutingConfig::default(),
            keys: KeysConfig::default(),
            plugins: PluginsConfig::default(),
            admin: AdminConfig::default(),
            providers: BTreeMap::new(),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lanes: vec!["high".into(), "normal".into(), "low".into()],
            concurrency: 512,
            max_attempts: 5,
            visibility_timeout: Duration::from_secs(300),
            retry: RetryConfig::default(),
            result_ttl: Duration::from_secs(24 * 3600),
            max_job_bytes: crate::job::DEFAULT_MAX_JOB_BYTES,
            results_maxlen: 100_000,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(60),
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            order: RouteOrder::Cost,
            wait_for_cheaper: Duration::from_secs(2),
            default_deadline: Duration::from_secs(600),
        }
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            env_file: None,
            reprobe_interval: Duration::from_secs(30 * 60),
            default_cooldown: Duration::from_secs(60),
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: "/usr/lib/llmq/plugins".into(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            token_env: "LLMQ_ADMIN_TOKEN".into(),
        }
    }
}

/// Serde helpers for durations written as `"5m"`, `"1s"`, `"250ms"`.
pub mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); expected e.g. \"250ms\", \"2s\", \"5m\", \"24h\""
            ))
        })
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}
