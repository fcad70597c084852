//! The admin API's wire types: what `GET /v1/keys`, `/v1/usage`, `/v1/queue`
//! and `/readyz` return. Every type is serde both ways so the CLI and tests
//! read exactly what the daemon writes. None of them can hold a secret: a key
//! is only ever its id (`groq#2`) and its masked form (`gsk_…x9f2`).

use serde::{Deserialize, Serialize};

/// A key's state as the admin API shows it (`KeyView::status`); the
/// pool's own, persisted one is `pool::KeyStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyViewStatus {
    /// Usable now (it may still be at a limit; see `window`/`today`).
    Available,
    /// Temporarily parked after a 429, until `cooldown_until_ms`.
    Cooling,
    /// Parked with a reason (invalid, revoked, out of credit, by an operator).
    Disabled,
}

impl KeyViewStatus {
    /// Every status, in a fixed order (used for the `llmq_key_state` gauge).
    pub(crate) const ALL: [KeyViewStatus; 3] = [
        KeyViewStatus::Available,
        KeyViewStatus::Cooling,
        KeyViewStatus::Disabled,
    ];

    /// The wire name: `available`, `cooling` or `disabled`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyViewStatus::Available => "available",
            KeyViewStatus::Cooling => "cooling",
            KeyViewStatus::Disabled => "disabled",
        }
    }
}

/// A key's configured limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpd: Option<u64>,
    pub max_concurrent: Option<u32>,
}

/// Requests and tokens counted over some period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageCount {
    pub requests: u64,
    pub tokens: u64,
}

/// One API key as the operator sees it: state, limits, usage, counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyView {
    /// `provider#N`, e.g. `groq#2`.
    pub id: String,
    pub provider: String,
    /// The `N` of the id.
    pub instance: u32,
    /// The masked secret (`gsk_…x9f2`); the secret itself is never here.
    pub masked: String,
    /// The account (project) whose limits the key shares with its other
    /// keys; `limits`, `window` and `today` are then the account's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub status: KeyViewStatus,
    /// Why the key is disabled or cooling, if it is.
    #[serde(default)]
    pub reason: Option<String>,
    /// Unix ms when a cooldown ends.
    #[serde(default)]
    pub cooldown_until_ms: Option<u64>,
    /// Ms left in the cooldown when this view was taken.
    #[serde(default)]
    pub cooldown_remaining_ms: Option<u64>,
    #[serde(default)]
    pub limits: KeyLimits,
    /// Used in the current minute window (against `rpm`/`tpm`).
    #[serde(default)]
    pub window: UsageCount,
    /// Used today (against `rpd`/`tpd`).
    #[serde(default)]
    pub today: UsageCount,
    #[serde(default)]
    pub in_flight: u64,
    /// Lifetime counters (since the daemon or the stats began).
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub failures: u64,
    /// Upstream 429s.
    #[serde(default)]
    pub rate_limited: u64,
    #[serde(default)]
    pub tokens_in: u64,
    #[serde(default)]
    pub tokens_out: u64,
    #[serde(default)]
    pub cost_usd: f64,
    /// Unix ms of the last upstream call.
    #[serde(default)]
    pub last_used_ms: Option<u64>,
    /// Models this key may not serve until a time, because a quota scoped
    /// to that model ran out (the key serves its other models).
    #[serde(default)]
    pub parked_models: Vec<ParkedModel>,
}

/// One model parked on a key: `{model, until_ms, reason}`.
pub use crate::pool::ParkedModel;

/// Usage per day, key, provider and model (`GET /v1/usage`): the rows the
/// keystore keeps in Redis, served as they are.
pub use crate::keystore::UsageRow;

/// Depth of one priority lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneDepth {
    pub lane: String,
    pub depth: u64,
}

/// The queue at a glance (`GET /v1/queue`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    /// Waiting entries per lane, in priority order.
    pub lanes: Vec<LaneDepth>,
    /// Jobs being worked on (pending entries).
    #[serde(default)]
    pub in_flight: u64,
    /// Retries waiting for their due time.
    #[serde(default)]
    pub delayed: u64,
    /// Dead-lettered jobs.
    #[serde(default)]
    pub dead: u64,
    /// Recent finished jobs per second, when the daemon measures it.
    #[serde(default)]
    pub throughput_per_s: Option<f64>,
}

/// What `/readyz` checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Redis answered.
    pub redis: bool,
    /// Provider plugins loaded.
    pub plugins: usize,
}

impl Readiness {
    /// Why the daemon is not ready, or `None` when it is.
    pub fn reason(&self) -> Option<String> {
        match (self.redis, self.plugins) {
            (true, p) if p >= 1 => None,
            (false, 0) => Some("redis unreachable; no plugins loaded".into()),
            (false, _) => Some("redis unreachable".into()),
            (true, _) => Some("no plugins loaded".into()),
        }
    }
}
