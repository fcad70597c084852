//! Configuration: the TOML file, `LLMQ__SECTION__FIELD` env overrides and
//! the built-in catalog underneath (SPEC §5).
//!
//! The types here are the validated, in-memory form every other module reads.
//! Loading, merging with the catalog and the file/field error messages are in
//! this module too; the catalog data itself is in `catalog`.

use crate::catalog;
use crate::error::Error;
use crate::job::{Strategy, Tier};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Upper bound of one upstream call (the HTTP timeout plus margin). The
/// cluster gate (`global`) counts a call in flight for at most this long, so
/// `[upstream] timeout` must stay below it.
pub const MAX_CALL: Duration = Duration::from_secs(125);

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub redis: RedisConfig,
    pub queue: QueueConfig,
    pub routing: RoutingConfig,
    pub keys: KeysConfig,
    pub plugins: PluginsConfig,
    pub admin: AdminConfig,
    /// Several daemons on one Redis (`[cluster]`, see `global` and `cluster`).
    pub cluster: ClusterConfig,
    /// How llmq talks to the providers (`[upstream]`, see `upstream`).
    pub upstream: UpstreamConfig,
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
    /// Most `models` (fan-out) entries a job may have; more is refused.
    pub max_models: usize,
    /// Bytes of a job body kept in its `llmq:dead` record (the rest is cut;
    /// the record keeps the original length).
    pub dead_body_bytes: usize,
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
    /// How long one plugin call (`prepare`, `parse`) may run. Calls run on
    /// their own threads; one over the limit fails its job, and its thread
    /// is abandoned (a plugin call cannot be killed, only left behind).
    #[serde(with = "humantime_serde_compat")]
    pub call_timeout: Duration,
    /// A plugin whose calls time out this many times within 10 minutes is
    /// quarantined until the next reload (its providers are disabled);
    /// 0 never quarantines.
    pub quarantine_after: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port`; empty disables the admin API.
    pub listen: String,
    /// Name of the env var holding the bearer token.
    pub token_env: String,
    /// A connection must send a complete request head within this long of
    /// opening (or of its first byte after an idle spell), else it is
    /// closed (slowloris).
    #[serde(with = "humantime_serde_compat")]
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Most admin connections open at once; never more than a quarter of
    /// the process's file-descriptor limit (the rest is kept for jobs). At
    /// the cap a new connection replaces the longest-idle one, or is closed
    /// at once when every connection is busy.
    pub max_connections: usize,
}

/// Scale-out: every daemon on the same Redis behaves as one system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Admit every rate-limited call through Redis as well, so limits, key
    /// states and probation hold across daemons (one round trip per call).
    pub enabled: bool,
    /// How often this daemon renews its entry in the member list; an entry
    /// expires after three missed beats.
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: true,
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// How llmq talks to the providers over HTTP (SPEC §12). Read once at start
/// (a SIGHUP reload keeps the client it started with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// A PEM file of extra root certificates (a private CA), trusted in
    /// addition to the platform's roots (or `SSL_CERT_FILE`/`SSL_CERT_DIR`).
    pub ca_file: Option<String>,
    /// An `http://` or `https://` proxy for every upstream call (`NO_PROXY`
    /// still applies). Without it, `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`
    /// and `NO_PROXY` from the environment are used.
    pub proxy: Option<String>,
    /// HTTP/2: by ALPN on https (`auto`), always without negotiation
    /// (`prior-knowledge`, for h2c upstreams such as a local vLLM), or never.
    pub http2: Http2Mode,
    /// Time to establish a connection (TCP, TLS and proxy handshakes).
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Longest one call may take, headers and body; a call is also cut at
    /// its job's deadline, whichever comes first.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Largest response body read; a larger one fails that call as transient.
    pub max_response_bytes: u64,
}

/// `[upstream] http2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Http2Mode {
    /// HTTP/2 when the server offers it by ALPN (https), else HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/2 without negotiation, on http (h2c) and https alike.
    PriorKnowledge,
    /// HTTP/1.1 only.
    Never,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            ca_file: None,
            proxy: None,
            http2: Http2Mode::Auto,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(120),
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
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
    pub(crate) fn or(self, base: Limits) -> Limits {
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
    /// Daily spend cap in USD, from real usage; skipped until the next daily reset when reached.
    pub budget_usd_per_day: Option<f64>,
    /// When the provider's day starts: `"HH:MM Zone"` with an IANA zone
    /// (`"00:00 America/Los_Angeles"`); default `"00:00 UTC"`. RPD/TPD,
    /// daily counters and `budget_usd_per_day` roll over then.
    pub daily_reset: crate::calendar::DailyReset,
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
            daily_reset: crate::calendar::DailyReset::default(),
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
    /// The account (or project) the key belongs to: keys of one account
    /// share one set of limits (`limits` of the provider, tightened by
    /// each key's), locally and across daemons. Same as `{P}_ACCOUNT_{N}`.
    pub account: Option<String>,
}

/// Whether `name` can name an account: it appears in Redis keys (as a
/// hash tag's content) and in `llmq keys`.
pub(crate) fn valid_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// What [`valid_account`] accepts, for error messages.
pub(crate) const ACCOUNT_EXPECTED: &str =
    "an account name of letters, digits, - _ . or @ (at most 128 characters)";

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
        }
    }
}

impl QueueConfig {
    /// The limits a job body is checked against.
    pub fn job_limits(&self) -> crate::job::JobLimits {
        crate::job::JobLimits {
            max_bytes: self.max_job_bytes,
            max_models: self.max_models,
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
            max_models: crate::job::DEFAULT_MAX_MODELS,
            dead_body_bytes: 4096,
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
            call_timeout: Duration::from_secs(2),
            quarantine_after: 3,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            token_env: "LLMQ_ADMIN_TOKEN".into(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
        }
    }
}

/// Serde helpers for durations written as `"5m"`, `"1s"`, `"250ms"`.
pub(crate) mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); expected e.g. \"250ms\", \"2s\", \"5m\", \"24h\""
            ))
        })
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

// ------------------------------------------------------------------ loading

/// The config file read when `--config` is not given, if it exists.
pub(crate) const DEFAULT_PATH: &str = "/etc/llmq/llmq.toml";

/// Env overrides are `LLMQ__SECTION__FIELD` (e.g. `LLMQ__QUEUE__CONCURRENCY`).
pub(crate) const ENV_PREFIX: &str = "LLMQ__";

/// Loads the config: defaults ← catalog ← TOML file ← `LLMQ__…` env
/// overrides, then validates it.
///
/// `path` is the `--config` file; without it, [`DEFAULT_PATH`] is read when it
/// exists, and otherwise the defaults and the catalog alone are used.
pub fn load(path: Option<&Path>) -> Result<Config, Error> {
    let path = match path {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.exists()),
    };
    let file = match &path {
        Some(p) => {
            let name = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|e| {
                Error::config(&name, "(file)", format!("a readable TOML file: {e}"))
            })?;
            Some((text, name))
        }
        None => None,
    };
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.to_ascii_uppercase().starts_with(ENV_PREFIX))
        .collect();
    load_layers(file.as_ref().map(|(t, n)| (t.as_str(), n.as_str())), &env)
}

/// Loads a config from TOML text over the catalog, without env overrides.
/// `name` is how errors name the source (a file name).
pub fn load_from_str(toml: &str, name: &str) -> Result<Config, Error> {
    load_layers(Some((toml, name)), &BTreeMap::new())
}

/// The built-in catalog's file: nothing but providers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    providers: BTreeMap<String, ProviderConfig>,
}

/// The built-in catalog's providers, typed (without the user's file).
pub fn catalog_providers() -> Result<BTreeMap<String, ProviderConfig>, Error> {
    let de = toml::Deserializer::new(catalog::CATALOG_TOML);
    serde_path_to_error::deserialize::<_, CatalogFile>(de)
        .map(|c| c.providers)
        .map_err(|e| {
            Error::config(
                catalog::CATALOG_NAME,
                e.path().to_string(),
                e.inner().message().to_string(),
            )
        })
}

/// The layering behind [`load`], with the file as `(text, name)` and the
/// environment given explicitly (only `LLMQ__…` variables are read from it).
pub fn load_layers(
    file: Option<(&str, &str)>,
    env: &BTreeMap<String, String>,
) -> Result<Config, Error> {
    let catalog_table = catalog::table()?;
    let mut merged = catalog_table.clone();
    let mut user = None;
    if let Some((text, name)) = file {
        let table = parse_user_file(text, name)?;
        merge_tables(&mut merged, table.clone(), &mut Vec::new(), name)?;
        user = Some((table, name.to_string()));
    }

    let env: BTreeMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.to_ascii_uppercase().starts_with(ENV_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let env_source = config::Environment::with_prefix("LLMQ")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .ignore_empty(true)
        .list_separator(",")
        .with_list_parse_key("queue.lanes")
        .source(Some(env.clone().into_iter().collect()));
    let built = config::Config::builder()
        .add_source(TomlSource {
            table: merged,
            origin: "config".into(),
        })
        .add_source(env_source)
        .build()
        .map_err(|e| Error::config("environment", "(LLMQ__*)", e.to_string()))?;

    let mut cfg: Config = serde_path_to_error::deserialize(built).map_err(|e| {
        let path = segs_from_path(e.path());
        let var = env_var_name(&path);
        Error::config(
            format!("environment variable {var}"),
            render(&path),
            strip_key_suffix(&e.inner().to_string()),
        )
    })?;

    normalize(&mut cfg);
    let origins = Origins {
        catalog: catalog_table,
        user,
        env_vars: env
            .keys()
            .map(|k| {
                (
                    k[ENV_PREFIX.len()..]
                        .to_ascii_lowercase()
                        .replace("__", "."),
                    k.clone(),
                )
            })
            .collect(),
    };
    validate(&cfg).map_err(|(path, expected)| {
        let (file, field) = origins.locate(&path);
        Error::config(file, field, expected)
    })?;
    Ok(cfg)
}

/// Syntax, then shape (unknown fields, wrong types, bad durations) of the
/// user's file on its own, so errors carry its name, the field path and line.
fn parse_user_file(text: &str, name: &str) -> Result<toml::Table, Error> {
    let table = text.parse::<toml::Table>().map_err(|e| {
        Error::config(
            name,
            "(syntax)",
            format!(
                "valid TOML: {}{}",
                e.message().trim(),
                at_line(text, e.span())
            ),
        )
    })?;
    let de = toml::Deserializer::new(text);
    if let Err(e) = serde_path_to_error::deserialize::<_, Config>(de) {
        let mut path = segs_from_path(e.path());
        let message = e.inner().message().trim().to_string();
        if let Some(field) = unknown_field(&message) {
            if path.last() != Some(&Seg::Key(field.clone())) {
                path.push(Seg::Key(field));
            }
        }
        return Err(Error::config(
            name,
            render(&path),
            format!("{message}{}", at_line(text, e.inner().span())),
        ));
    }
    Ok(table)
}

/// `" (line L, column C)"` for a byte span of `text`, or nothing.
fn at_line(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" (line {line}, column {column})")
}

/// The field name of serde's "unknown field `x`, expected …" message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(f, _)| f.to_string())
}

/// config-rs appends " for key `…`" to some messages; we give the path ourselves.
fn strip_key_suffix(message: &str) -> String {
    match message.find(" for key `") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Merges `over` into `base` field by field. `[[providers.X.models]]` lists
/// merge by `id`; every other list, and every scalar, is replaced.
fn merge_tables(
    base: &mut toml::Table,
    over: toml::Table,
    path: &mut Vec<String>,
    file: &str,
) -> Result<(), Error> {
    for (key, value) in over {
        let is_models = key == "models" && path.len() == 2 && path[0] == "providers";
        if is_models {
            let provider = path[1].clone();
            let entries = match value {
                toml::Value::Array(a) => a,
                // Shape was checked before merging; keep the value as given.
                other => {
                    base.insert(key, other);
                    continue;
                }
            };
            let slot = base
                .entry(key)
                .or_insert_with(|| toml::Value::Array(Vec::new()));
            if !slot.is_array() {
                *slot = toml::Value::Array(Vec::new());
            }
            if let toml::Value::Array(existing) = slot {
                merge_models(existing, entries, &provider, file)?;
            }
            continue;
        }
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => {
                path.push(key.clone());
                merge_tables(b, o, path, file)?;
                path.pop();
            }
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
    Ok(())
}

fn merge_models(
    base: &mut Vec<toml::Value>,
    over: Vec<toml::Value>,
    provider: &str,
    file: &str,
) -> Result<(), Error> {
    for (i, entry) in over.into_iter().enumerate() {
        let id = entry
            .get("id")
            .and_then(|v| v.as_str())
            .map(str::trim)
            .unwrap_or("")
            .to_string();
        if id.is_empty() {
            return Err(Error::config(
                file,
                format!("providers.{provider}.models[{i}].id"),
                format!(
                    "a model id: every [[providers.{provider}.models]] entry needs a non-empty `id` (the model name on the wire)"
                ),
            ));
        }
        let existing = base
            .iter_mut()
            .find(|m| m.get("id").and_then(|v| v.as_str()) == Some(id.as_str()));
        match (existing, entry) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => {
                let mut path = vec![
                    "providers".to_string(),
                    provider.to_string(),
                    "models".to_string(),
                ];
                merge_tables(b, o, &mut path, file)?;
            }
            (_, entry) => base.push(entry),
        }
    }
    Ok(())
}

/// The merged TOML as a config-rs source.
#[derive(Debug, Clone)]
struct TomlSource {
    table: toml::Table,
    origin: String,
}

impl config::Source for TomlSource {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self
            .table
            .iter()
            .map(|(k, v)| (k.clone(), to_config_value(v, &self.origin)))
            .collect())
    }
}

fn to_config_value(value: &toml::Value, origin: &String) -> config::Value {
    use config::ValueKind;
    let kind = match value {
        toml::Value::String(s) => ValueKind::String(s.clone()),
        toml::Value::Integer(i) => ValueKind::I64(*i),
        toml::Value::Float(f) => ValueKind::Float(*f),
        toml::Value::Boolean(b) => ValueKind::Boolean(*b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => {
            ValueKind::Array(a.iter().map(|v| to_config_value(v, origin)).collect())
        }
        toml::Value::Table(t) => ValueKind::Table(
            t.iter()
                .map(|(k, v)| (k.clone(), to_config_value(v, origin)))
                .collect(),
        ),
    };
    config::Value::new(Some(origin), kind)
}

/// Fills derived defaults: a provider's `keys_env` from its name, base URLs
/// without a trailing slash, and `0` limits meaning "no limit".
fn normalize(cfg: &mut Config) {
    for (name, p) in cfg.providers.iter_mut() {
        p.base_url = p.base_url.trim().trim_end_matches('/').to_string();
        if p.keys_env.is_none() && !p.keyless {
            p.keys_env = Some(default_keys_env(name));
        }
        p.limits = zero_is_unlimited(p.limits);
        for k in &mut p.keys {
            k.limits = zero_is_unlimited(k.limits);
        }
    }
}

/// The env prefix of a provider without `keys_env`: `my-llm` → `MY_LLM`.
pub fn default_keys_env(provider: &str) -> String {
    provider
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn zero_is_unlimited(l: Limits) -> Limits {
    let nz = |v: Option<u64>| v.filter(|n| *n > 0);
    Limits {
        rpm: nz(l.rpm),
        tpm: nz(l.tpm),
        rpd: nz(l.rpd),
        tpd: nz(l.tpd),
    }
}

/// One step of a field path. Models are addressed by position *and* id, so
/// an error can be located in whichever layer defined that model.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
    Model(usize, String),
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) | Seg::Model(i, _) => out.push_str(&format!("[{i}]")),
        }
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

fn segs_from_path(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

fn env_var_name(path: &[Seg]) -> String {
    let mut name = String::from("LLMQ");
    for seg in path {
        if let Seg::Key(k) = seg {
            name.push_str("__");
            name.push_str(&k.to_ascii_uppercase());
        }
    }
    name
}

/// Where each layer came from, to name the file of a semantic error.
struct Origins {
    catalog: toml::Table,
    user: Option<(toml::Table, String)>,
    /// Dotted lower-case path → the variable that set it.
    env_vars: BTreeMap<String, String>,
}

impl Origins {
    /// The layer that defined the deepest part of `path` (the highest layer
    /// on a tie), and the path as written in that layer.
    fn locate(&self, path: &[Seg]) -> (String, String) {
        let dotted: Vec<String> = path
            .iter()
            .filter_map(|s| match s {
                Seg::Key(k) => Some(k.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
        for n in (1..=dotted.len()).rev() {
            if let Some(var) = self.env_vars.get(&dotted[..n].join(".")) {
                return (format!("environment variable {var}"), render(path));
            }
        }
        let user = self
            .user
            .as_ref()
            .map(|(t, name)| (depth_in(t, path), t, name.clone()));
        let catalog = (
            depth_in(&self.catalog, path),
            &self.catalog,
            crate::catalog::CATALOG_NAME.to_string(),
        );
        let (depth, table, name) = match user {
            Some(u) if u.0 >= catalog.0 => u,
            _ => catalog,
        };
        if depth == 0 {
            return ("defaults".to_string(), render(path));
        }
        (name, render(&renumber(table, path)))
    }
}

/// How many leading steps of `path` exist in `table`.
fn depth_in(table: &toml::Table, path: &[Seg]) -> usize {
    let mut here = toml::Value::Table(table.clone());
    let mut depth = 0;
    for seg in path {
        let next = match (seg, &here) {
            (Seg::Key(k), toml::Value::Table(t)) => t.get(k).cloned(),
            (Seg::Index(i), toml::Value::Array(a)) => a.get(*i).cloned(),
            (Seg::Model(_, id), toml::Value::Array(a)) => a
                .iter()
                .find(|m| m.get("id").and_then(|v| v.as_str()) == Some(id.as_str()))
                .cloned(),
            _ => None,
        };
        match next {
            Some(v) => {
                here = v;
                depth += 1;
            }
            None => break,
        }
    }
    depth
}

/// `path` with model positions as numbered in `table`.
fn renumber(table: &toml::Table, path: &[Seg]) -> Vec<Seg> {
    let mut here = toml::Value::Table(table.clone());
    let mut out = Vec::with_capacity(path.len());
    for seg in path {
        let (seg, next) = match (seg, &here) {
            (Seg::Key(k), toml::Value::Table(t)) => (seg.clone(), t.get(k).cloned()),
            (Seg::Model(i, id), toml::Value::Array(a)) => {
                match a
                    .iter()
                    .position(|m| m.get("id").and_then(|v| v.as_str()) == Some(id.as_str()))
                {
                    Some(pos) => (Seg::Model(pos, id.clone()), a.get(pos).cloned()),
                    None => (Seg::Model(*i, id.clone()), None),
                }
            }
            (Seg::Index(i), toml::Value::Array(a)) => (seg.clone(), a.get(*i).cloned()),
            _ => (seg.clone(), None),
        };
        out.push(seg);
        match next {
            Some(v) => here = v,
            None => {
                let rest = path.len() - out.len();
                out.extend(path[path.len() - rest..].iter().cloned());
                break;
            }
        }
    }
    out
}

type Problem = (Vec<Seg>, String);

fn problem(path: Vec<Seg>, expected: impl Into<String>) -> Problem {
    (path, expected.into())
}

/// Semantic checks of the merged config; the first problem found.
fn validate(cfg: &Config) -> Result<(), Problem> {
    validate_redis(&cfg.redis)?;
    validate_queue(&cfg.queue)?;
    validate_routing_plugins(cfg)?;
    validate_admin(&cfg.admin)?;
    if let Some(f) = &cfg.keys.env_file {
        if f.trim().is_empty() {
            return Err(problem(
                vec![key("keys"), key("env_file")],
                "a file path (or omit it)",
            ));
        }
    }
    validate_upstream(&cfg.upstream)?;
    for (name, p) in &cfg.providers {
        validate_provider(name, p)?;
    }
    Ok(())
}

fn validate_redis(r: &RedisConfig) -> Result<(), Problem> {
    let url = &r.url;
    if !["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|p| url.starts_with(p))
    {
        return Err(problem(
            vec![key("redis"), key("url")],
            format!("a Redis URL (redis://host:port[/db], rediss://…, unix:///path); got {url:?}"),
        ));
    }

    Ok(())
}

fn validate_queue(q: &QueueConfig) -> Result<(), Problem> {
    let qp = |f: &str| vec![key("queue"), key(f)];
    if q.lanes.is_empty() {
        return Err(problem(
            qp("lanes"),
            "at least one lane, e.g. [\"high\", \"normal\", \"low\"]",
        ));
    }
    for (i, lane) in q.lanes.iter().enumerate() {
        let ok = !lane.is_empty()
            && lane
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok || q.lanes[..i].contains(lane) {
            return Err(problem(
                vec![key("queue"), key("lanes"), Seg::Index(i)],
                format!("a unique lane name of letters, digits, - or _; got {lane:?}"),
            ));
        }
    }
    if q.concurrency == 0 {
        return Err(problem(
            qp("concurrency"),
            "a number of concurrent jobs ≥ 1; got 0",
        ));
    }
    if q.max_attempts == 0 {
        return Err(problem(
            qp("max_attempts"),
            "a number of attempts ≥ 1; got 0",
        ));
    }
    if q.visibility_timeout < Duration::from_secs(1) {
        return Err(problem(
            qp("visibility_timeout"),
            "a duration of at least 1s",
        ));
    }
    if q.result_ttl < Duration::from_secs(1) {
        return Err(problem(
            qp("result_ttl"),
            "a duration of at least 1s (Redis EX is in seconds)",
        ));
    }
    if q.max_job_bytes == 0 {
        return Err(problem(qp("max_job_bytes"), "a size in bytes ≥ 1; got 0"));
    }
    if q.max_models == 0 {
        return Err(problem(qp("max_models"), "a number of models ≥ 1; got 0"));
    }
    if q.results_maxlen == 0 {
        return Err(problem(qp("results_maxlen"), "a stream length ≥ 1; got 0"));
    }
    let r = &q.retry;
    if !r.factor.is_finite() || r.factor < 1.0 {
        return Err(problem(
            vec![key("queue"), key("retry"), key("factor")],
            format!("a backoff factor ≥ 1.0; got {}", r.factor),
        ));
    }
    if r.max_delay < r.initial_delay {
        return Err(problem(
            vec![key("queue"), key("retry"), key("max_delay")],
            "a duration ≥ retry.initial_delay",
        ));
    }
    Ok(())
}

fn validate_routing_plugins(cfg: &Config) -> Result<(), Problem> {
    if cfg.routing.default_deadline.is_zero() {
        return Err(problem(
            vec![key("routing"), key("default_deadline")],
            "a duration > 0",
        ));
    }
    if cfg.plugins.dir.trim().is_empty() {
        return Err(problem(
            vec![key("plugins"), key("dir")],
            "a directory path",
        ));
    }
    if cfg.plugins.call_timeout.is_zero() {
        return Err(problem(
            vec![key("plugins"), key("call_timeout")],
            "a duration > 0",
        ));
    }
    Ok(())
}

fn validate_admin(a: &AdminConfig) -> Result<(), Problem> {
    let listen = a.listen.trim();
    if !listen.is_empty() {
        let port_ok = listen
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(problem(
                vec![key("admin"), key("listen")],
                format!("host:port (e.g. \"127.0.0.1:9090\"), or \"\" to disable; got {listen:?}"),
            ));
        }
        if a.token_env.trim().is_empty() {
            return Err(problem(
                vec![key("admin"), key("token_env")],
                "the name of the env var holding the admin bearer token",
            ));
        }
        let admin = |f: &str| vec![key("admin"), key(f)];
        if a.header_timeout.is_zero() {
            return Err(problem(admin("header_timeout"), "a duration > 0"));
        }
        if a.idle_timeout.is_zero() {
            return Err(problem(admin("idle_timeout"), "a duration > 0"));
        }
        if a.max_connections == 0 {
            return Err(problem(admin("max_connections"), "at least 1"));
        }
    }
    Ok(())
}

fn validate_upstream(u: &UpstreamConfig) -> Result<(), Problem> {
    let up = |f: &str| vec![key("upstream"), key(f)];
    if let Some(path) = &u.ca_file {
        crate::endpoint::read_ca_file(Path::new(path))
            .map_err(|e| problem(up("ca_file"), e.to_string()))?;
    }
    if let Some(proxy) = &u.proxy {
        crate::endpoint::check_proxy_url(proxy).map_err(|e| problem(up("proxy"), e))?;
    }
    if u.connect_timeout.is_zero() {
        return Err(problem(
            up("connect_timeout"),
            "a duration > 0, e.g. \"10s\"",
        ));
    }
    // The cluster gate counts a call in flight for at most MAX_CALL.
    let longest = MAX_CALL.saturating_sub(Duration::from_secs(5));
    if u.timeout.is_zero() || u.timeout > longest {
        return Err(problem(
            up("timeout"),
            format!(
                "a duration > 0 and at most {} (a call's slot in the cluster gate lasts {}), e.g. \"120s\"",
                humantime::format_duration(longest),
                humantime::format_duration(MAX_CALL)
            ),
        ));
    }
    if u.max_response_bytes == 0 {
        return Err(problem(
            up("max_response_bytes"),
            "a size in bytes ≥ 1, e.g. 16777216 (16 MiB)",
        ));
    }
    Ok(())
}

fn valid_env_prefix(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// The path of a field under `[providers.<name>]`.
fn provider_path(name: &str, rest: &[Seg]) -> Vec<Seg> {
    let mut v = vec![key("providers"), key(name)];
    v.extend_from_slice(rest);
    v
}

fn validate_provider(name: &str, p: &ProviderConfig) -> Result<(), Problem> {
    let at = |rest: &[Seg]| provider_path(name, rest);
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(problem(
            at(&[]),
            format!("a provider name of letters, digits, - _ or . (it appears in key ids and `provider/model`); got {name:?}"),
        ));
    }
    if p.plugin.trim().is_empty() {
        return Err(problem(
            at(&[key("plugin")]),
            "a plugin name (openai, anthropic, gemini, …)",
        ));
    }
    if p.base_url.is_empty() {
        return Err(problem(
            at(&[key("base_url")]),
            "a non-empty http(s) base URL, e.g. \"https://api.example.com/v1\"",
        ));
    }
    crate::endpoint::check_base_url(&p.base_url).map_err(|e| problem(at(&[key("base_url")]), e))?;
    if let Some(e) = &p.keys_env {
        if !valid_env_prefix(e) {
            return Err(problem(
                at(&[key("keys_env")]),
                format!("an env prefix of A-Z, 0-9 and _ (e.g. \"GROQ\"); got {e:?}"),
            ));
        }
    }
    for (i, a) in p.env_aliases.iter().enumerate() {
        if !valid_env_prefix(a) {
            return Err(problem(
                at(&[key("env_aliases"), Seg::Index(i)]),
                format!("an env prefix of A-Z, 0-9 and _ (e.g. \"CLAUDE\"); got {a:?}"),
            ));
        }
    }
    if p.max_concurrent == Some(0) {
        return Err(problem(
            at(&[key("max_concurrent")]),
            "a number of concurrent requests ≥ 1 (omit it for no cap); got 0",
        ));
    }
    if p.window.is_some_and(|w| w.is_zero()) {
        return Err(problem(
            at(&[key("window")]),
            "a rate window > 0, e.g. \"60s\"",
        ));
    }
    if let Some(b) = p.budget_usd_per_day {
        if !b.is_finite() || b < 0.0 {
            return Err(problem(
                at(&[key("budget_usd_per_day")]),
                format!("a daily budget in USD ≥ 0; got {b}"),
            ));
        }
    }
    if p.enabled && p.models.is_empty() {
        return Err(problem(
            at(&[key("models")]),
            format!("at least one [[providers.{name}.models]] entry (a provider without models can serve no job)"),
        ));
    }
    validate_models(name, p)?;
    validate_keys(name, p)
}

/// `[[providers.<name>.models]]`: ids, prices, context and unique names.
fn validate_models(name: &str, p: &ProviderConfig) -> Result<(), Problem> {
    let at = |rest: &[Seg]| provider_path(name, rest);
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, m) in p.models.iter().enumerate() {
        let mp = |rest: &[Seg]| {
            let mut v = at(&[key("models"), Seg::Model(i, m.id.clone())]);
            v.extend_from_slice(rest);
            v
        };
        if m.id.trim().is_empty() || m.id.contains(char::is_whitespace) {
            return Err(problem(
                mp(&[key("id")]),
                "a model id without spaces (the model name on the wire)",
            ));
        }
        for (field, v) in [("input", m.price.input), ("output", m.price.output)] {
            if !v.is_finite() || v < 0.0 {
                return Err(problem(
                    mp(&[key("price"), key(field)]),
                    format!("a price in USD per million tokens ≥ 0; got {v}"),
                ));
            }
        }
        if m.context == Some(0) {
            return Err(problem(
                mp(&[key("context")]),
                "a context window in tokens ≥ 1; got 0",
            ));
        }
        for (j, alias) in std::iter::once(&m.id).chain(&m.aliases).enumerate() {
            if alias.trim().is_empty() {
                return Err(problem(
                    mp(&[key("aliases"), Seg::Index(j.saturating_sub(1))]),
                    "a non-empty alias",
                ));
            }
            if let Some(other) = names.insert(alias.as_str(), m.id.as_str()) {
                if other != m.id {
                    let field = if j == 0 {
                        mp(&[key("id")])
                    } else {
                        mp(&[key("aliases"), Seg::Index(j - 1)])
                    };
                    return Err(problem(
                        field,
                        format!("a name unique within provider {name}; {alias:?} already names model {other:?}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `[[providers.<name>.keys]]`: a secret or an env var, and sane limits.
fn validate_keys(name: &str, p: &ProviderConfig) -> Result<(), Problem> {
    let at = |rest: &[Seg]| provider_path(name, rest);
    for (i, k) in p.keys.iter().enumerate() {
        let kp = |rest: &[Seg]| {
            let mut v = at(&[key("keys"), Seg::Index(i)]);
            v.extend_from_slice(rest);
            v
        };
        match (&k.key, &k.key_env) {
            (None, None) => {
                return Err(problem(
                    kp(&[]),
                    "`key` (the secret) or `key_env` (the env var holding it)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(problem(
                    kp(&[key("key_env")]),
                    "either `key` or `key_env`, not both",
                ))
            }
            (Some(s), None) if s.trim().is_empty() => {
                return Err(problem(kp(&[key("key")]), "a non-empty secret"))
            }
            (None, Some(e)) if e.trim().is_empty() => {
                return Err(problem(kp(&[key("key_env")]), "the name of an env var"))
            }
            _ => {}
        }
        if k.weight == Some(0) {
            return Err(problem(kp(&[key("weight")]), "a weight ≥ 1; got 0"));
        }
        if k.max_concurrent == Some(0) {
            return Err(problem(
                kp(&[key("max_concurrent")]),
                "a number of concurrent requests ≥ 1; got 0",
            ));
        }
        if let Some(a) = &k.account {
            if !valid_account(a) {
                return Err(problem(
                    kp(&[key("account")]),
                    format!("{ACCOUNT_EXPECTED}; got {a:?}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_parses_and_has_the_seed_providers() {
        let p = catalog_providers().unwrap();
        for name in [
            "openai",
            "anthropic",
            "gemini",
            "groq",
            "mistral",
            "nvidia",
            "zai",
            "bigmodel",
            "openrouter",
            "ollama",
        ] {
            let prov = p.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert!(!prov.base_url.is_empty(), "{name}");
            assert!(!prov.models.is_empty(), "{name}");
        }
        assert_eq!(p["groq"].tier, Tier::Free);
        assert_eq!(p["mistral"].tier, Tier::Trial);
        assert_eq!(p["anthropic"].env_aliases, vec!["CLAUDE".to_string()]);
        assert_eq!(p["gemini"].env_aliases, vec!["GOOGLE".to_string()]);
        assert!(p["ollama"].keyless);
        // Z.AI's international API and BigModel (China) are separate
        // platforms with separate keys.
        assert_eq!(p["zai"].base_url, "https://api.z.ai/api/paas/v4");
        assert_eq!(
            p["bigmodel"].base_url,
            "https://open.bigmodel.cn/api/paas/v4"
        );
        assert_eq!(p["bigmodel"].keys_env.as_deref(), Some("BIGMODEL"));
        assert_eq!(p["bigmodel"].env_aliases, vec!["ZHIPUAI".to_string()]);
        assert!(catalog::table().unwrap().contains_key("providers"));
    }
}
