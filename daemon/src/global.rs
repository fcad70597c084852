//! Scale-out admission: the cluster-wide gate every rate-limited call passes
//! after the local pool granted it, so that several `llmq serve` daemons on
//! one Redis keep each key's limits, state and probation *together*.
//!
//! The local pool stays in front as the fast path (per-daemon limits and
//! state, wake-ups, strategies); this module adds one atomic Lua script per
//! admission in Redis, the distributed engine (no home-made consensus):
//!
//! | key | type | content |
//! |---|---|---|
//! | `llmq:{key:<id>}:win` | zset | admitted calls, member `<seq>:<daemon>:<tokens>`, score = µs the slot was stamped (provisionally admission + [`MAX_CALL`] while in flight, then the completion time) |
//! | `llmq:{key:<id>}:state` | hash | `disabled`, `reason`, `since_ms`, `next_probe_ms`, `cooling_until_ms`, `proven`, `probe`, `probe_until_ms`, `seq`, `tok` (tokens in the window); the one hash of the key's state, shared with the keystore (its fields `pool_*` and counters, see `keystore`) |
//!
//! A key of an **account** (quota pool: keys that share one set of limits)
//! counts its calls in the account's window instead, and keeps its state
//! under the account's hash tag:
//!
//! | key | type | content |
//! |---|---|---|
//! | `llmq:{acct:<provider>:<account>}:win` | zset | the calls of every key of the account, as above |
//! | `llmq:{acct:<provider>:<account>}:meta` | hash | `seq`, `tok` of the account's window |
//! | `llmq:{acct:<provider>:<account>}:state:<id>` | hash | the key's own gate state, as above (without `seq`, `tok`; the keystore's fields stay in `llmq:{key:<id>}:state`) |
//!
//! The window is the account's, the state (disabled, cooling, probation)
//! stays the key's. Keeping the key's state under the account's tag, not
//! its own, lets the admission script read both in one hash slot ([`GateKeys`]).
//!
//! The keys of one script share a hash tag, so each script touches one
//! Redis Cluster slot. All times are Redis server time (`TIME`), so the
//! daemons' clocks never matter; answers carry durations, not instants.
//! (Tests alone may pass "now" instead, [`GlobalGate::with_clock`]: so
//! `tests/gate_vs_limiter.rs` checks that this window and the local
//! limiter's admit the same calls.)
//!
//! **Admission** ([`GlobalGate::admit`]): refuses a disabled key (except one
//! due re-probe at a time, cluster-wide), a cooling key, a full rolling window
//! (RPM, or TPM as the sum of the window's tokens) and, while the key has
//! never answered successfully, a second call in flight anywhere (global
//! probation: a bad key costs exactly one upstream call in total). A
//! refusal tells the local pool why ([`GlobalGate::admit_permit`]): the key
//! is blocked, cooling or disabled there too, and the job re-plans.
//!
//! **Skew safety** is the local limiter's invariant (see `limits`), kept in
//! Redis: an in-flight call counts as occupying its slot until it completes
//! (its provisional score lies in the future), and [`GlobalGate::complete`]
//! re-stamps it with the completion time. A daemon that dies mid-call leaves
//! its slot counted until its death is noticed ([`GlobalGate::reap`], from
//! `cluster`) + window, at most admission + [`MAX_CALL`] + window: never early.
//!
//! **Cancelled calls.** A [`GlobalCall`] dropped without
//! [`GlobalGate::complete`] (its job's future was dropped in the middle of
//! the call, or the executor returned early) completes itself as
//! `cancelled`, asynchronously on the runtime: its slot is re-stamped with
//! the time of the drop (never earlier than the upstream saw the request),
//! and its fate is unknown: the key is neither proven nor blamed, and a
//! probe marker it held is freed at once (a disabled key's re-probe is due
//! again at once, as in the local pool). Its slot never stays until
//! [`MAX_CALL`], and its probe never holds the key back.
//!
//! **Bursts.** One admission per key is in flight per daemon, and a fresh
//! RPM "wait" answers the jobs queued behind it without a round trip (until
//! one of this daemon's calls to the key is given back unsent: that frees a
//! slot at once).
//!
//! **Token buckets** (`limit_shape = "token_bucket"`) are enforced with the
//! rolling window too: at most N in any window is a subset of what a GCRA of
//! burst N per window admits, so it never over-sends (it only bursts less).
//!
//! **Fast path.** A key with neither RPM nor TPM that has been proven skips
//! the round trip; its state changes reach the other daemons through the
//! keystore's `llmq:keyevents` publications, which [`GlobalGate::spawn_listener`]
//! applies to the local pool (milliseconds; it resynchronises from the
//! state hashes after every reconnect).

use crate::clock::SharedClock;
use crate::config::Config;
use crate::keys::{KeyId, KeyRing};
use crate::keystore::KEY_EVENTS_CHANNEL;
use crate::limits::{Now, DEFAULT_WINDOW};
use crate::pool::{Fate, KeyPool, KeyState, KeyStatus, Permit, Restored, StateRecord};
use futures::StreamExt;
use llmq_sdk::ObservedLimits;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// Upper bound of one upstream call: an in-flight slot counts until then
/// unless its completion re-stamps it, and a probe marker expires then (a
/// dead daemon cannot wedge a key longer). Defined in `config`, which checks
/// `[upstream] timeout` against it.
pub use crate::config::MAX_CALL;
/// How soon a daemon asks again while another daemon's first call to a new
/// key is in flight (probation has no cross-daemon wake-up).
pub const PROBATION_RETRY: Duration = Duration::from_millis(50);
/// The longest a key the gate says is disabled is held back locally before
/// this daemon asks again (a reset elsewhere is seen by then at the latest).
pub(crate) const DISABLED_RECHECK: Duration = Duration::from_secs(5);
/// How long a key is held back locally when Redis does not answer: the
/// gate fails closed, never over the limits.
pub(crate) const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// The gate's keys for one API key (one hash tag: one Cluster slot).
pub fn window_key(id: &KeyId) -> String {
    format!("llmq:{{key:{id}}}:win")
}

/// See [`window_key`]: the key's one state hash, [`crate::keystore::state_key`].
pub fn state_key(id: &KeyId) -> String {
    crate::keystore::state_key(id)
}

/// The Redis keys one API key's scripts use, all under one hash tag: its
/// own (`{key:<id>}`), or its account's (`{acct:<provider>:<account>}`)
/// when it shares an account's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateKeys {
    /// The rolling window (the key's or the account's).
    pub win: String,
    /// The key's state.
    pub state: String,
    /// Where the window's `seq` and `tok` live: the state hash for a key
    /// of its own, the account's meta hash otherwise.
    pub meta: String,
}

impl GateKeys {
    pub fn of(id: &KeyId, account: Option<&str>) -> GateKeys {
        match account {
            None => GateKeys {
                win: window_key(id),
                state: state_key(id),
                meta: state_key(id),
            },
            Some(a) => {
                let tag = format!("llmq:{{acct:{}:{a}}}", id.provider());
                GateKeys {
                    win: format!("{tag}:win"),
                    state: format!("{tag}:state:{id}"),
                    meta: format!("{tag}:meta"),
                }
            }
        }
    }
}

/// KEYS: window zset, state hash, window meta hash (`seq`, `tok`; the state
/// hash itself for a key without an account).
/// ARGV: window_us, rpm (0 = none), tpm (0 = none), tokens, max_call_us,
/// probe_ttl_ms, reprobe_ms, probation_retry_ms, owner (this daemon), and
/// now_us only under a test clock ([`GlobalGate::with_clock`]).
/// Returns `{'granted', member, as_probe, proven}`, `{'wait', us, limit}`,
/// `{'cooling', ms}` or `{'disabled', reason, since_ago_ms, next_probe_in_ms | -1}`.
const ADMIT: &str = r#"
local now_us = tonumber(ARGV[10])
if not now_us then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = math.floor(now_us / 1000)
local window = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local maxcall = tonumber(ARGV[5])
local retry = tonumber(ARGV[8])
local st = redis.call('HMGET', KEYS[2], 'disabled', 'reason', 'since_ms', 'next_probe_ms',
  'cooling_until_ms', 'proven', 'probe', 'probe_until_ms')
local probe_until = tonumber(st[8]) or 0
local probe_busy = st[7] and probe_until > now_ms
local as_probe = false
if st[1] == '1' then
  local np = tonumber(st[4])
  if np == nil or np > now_ms or probe_busy then
    local wait = -1
    if np ~= nil then
      if np > now_ms then wait = np - now_ms else wait = retry end
    end
    return {'disabled', st[2] or '', now_ms - (tonumber(st[3]) or now_ms), wait}
  end
  as_probe = true
end
local cool = tonumber(st[5]) or 0
if cool > now_ms then
  return {'cooling', cool - now_ms}
end
local function tokens_of(m)
  return tonumber(string.match(m, ':(%d+)$')) or 0
end
local function free_in(score)
  if score > now_us then return window end
  return math.max(score + window - now_us, 1)
end
local limited = rpm > 0 or tpm > 0
local tok = tonumber(redis.call('HGET', KEYS[3], 'tok')) or 0
if limited then
  local cutoff = now_us - window
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  if #old > 0 then
    for i = 1, #old do tok = tok - tokens_of(old[i]) end
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  end
  local n = redis.call('ZCARD', KEYS[1])
  if n == 0 or tok < 0 then tok = 0 end
  if #old > 0 then redis.call('HSET', KEYS[3], 'tok', tok) end
  if rpm > 0 and n >= rpm then
    local e = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    return {'wait', free_in(tonumber(e[2])), 'rpm'}
  end
  if tpm > 0 and tok + tokens > tpm then
    if tokens > tpm then return {'wait', window, 'tpm'} end
    local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    local left = tok
    for i = 1, #all, 2 do
      left = left - tokens_of(all[i])
      if left + tokens <= tpm then return {'wait', free_in(tonumber(all[i + 1])), 'tpm'} end
    end
    return {'wait', window, 'tpm'}
  end
end
if not as_probe and st[6] ~= '1' then
  if probe_busy then
    return {'wait', math.max(math.min(retry, probe_until - now_ms), 1) * 1000, 'probation'}
  end
  as_probe = true
end
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
local member = seq .. ':' .. ARGV[9] .. ':' .. ARGV[4]
if limited then
  redis.call('ZADD', KEYS[1], now_us + maxcall, member)
  redis.call('HSET', KEYS[3], 'tok', tok + tokens)
  redis.call('PEXPIRE', KEYS[1], math.floor((maxcall + window) / 1000) + 1000)
end
if as_probe then
  redis.call('HSET', KEYS[2], 'probe', member, 'probe_until_ms', now_ms + tonumber(ARGV[6]))
  if st[1] == '1' then
    redis.call('HSET', KEYS[2], 'next_probe_ms', now_ms + tonumber(ARGV[7]))
  end
end
local proven = 0
if st[6] == '1' then proven = 1 end
local probe_flag = 0
if as_probe then probe_flag = 1 end
return {'granted', member, probe_flag, proven}
"#;

/// KEYS: window zset, state hash, window meta hash (see ADMIT).
/// ARGV: member ('' when the call skipped admission), fate, cooldown_ms,
/// reason, reprobe_ms, inconclusive_reprobe_ms, and now_us only under a test
/// clock ([`GlobalGate::with_clock`]). The fate `cancelled` (a
/// dropped call, see [`GlobalCall`]) is an unknown fate: the slot counts, the
/// probe marker goes and a disabled key's re-probe is due at once.
const COMPLETE: &str = r#"
local now_us = tonumber(ARGV[7])
if not now_us then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = math.floor(now_us / 1000)
local member, fate = ARGV[1], ARGV[2]
local probe = false
if member ~= '' then
  if redis.call('HGET', KEYS[2], 'probe') == member then
    probe = true
    redis.call('HDEL', KEYS[2], 'probe', 'probe_until_ms')
  end
  if fate == 'not_sent' then
    if redis.call('ZREM', KEYS[1], member) == 1 then
      local used = tonumber(string.match(member, ':(%d+)$')) or 0
      local tok = (tonumber(redis.call('HGET', KEYS[3], 'tok')) or 0) - used
      if tok < 0 then tok = 0 end
      redis.call('HSET', KEYS[3], 'tok', tok)
    end
  else
    redis.call('ZADD', KEYS[1], 'XX', now_us, member)
  end
end
local disabled = redis.call('HGET', KEYS[2], 'disabled') == '1'
if fate == 'success' then
  redis.call('HSET', KEYS[2], 'proven', '1')
  if disabled and probe then
    redis.call('HDEL', KEYS[2], 'disabled', 'reason', 'since_ms', 'next_probe_ms')
  end
elseif fate == 'untouched' then
  if disabled and probe then
    redis.call('HDEL', KEYS[2], 'disabled', 'reason', 'since_ms', 'next_probe_ms')
  end
elseif fate == 'rate_limited' then
  local untl = now_ms + tonumber(ARGV[3])
  if untl > (tonumber(redis.call('HGET', KEYS[2], 'cooling_until_ms')) or 0) then
    redis.call('HSET', KEYS[2], 'cooling_until_ms', untl)
  end
elseif fate == 'disabled' then
  redis.call('HSET', KEYS[2], 'disabled', '1', 'reason', ARGV[4], 'since_ms', now_ms,
    'next_probe_ms', now_ms + tonumber(ARGV[5]))
elseif fate == 'transient' then
  if disabled and probe then
    redis.call('HSET', KEYS[2], 'next_probe_ms', now_ms + tonumber(ARGV[6]))
  end
elseif fate == 'cancelled' then
  if disabled and probe then
    redis.call('HSET', KEYS[2], 'next_probe_ms', now_ms)
  end
end
return 1
"#;

/// KEYS: window zset, state hash. ARGV: op (`reset` | `disable`), reason.
const OPERATOR: &str = r#"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'reset' then
  redis.call('HDEL', KEYS[2], 'disabled', 'reason', 'since_ms', 'next_probe_ms',
    'cooling_until_ms', 'probe', 'probe_until_ms', 'proven')
else
  redis.call('HDEL', KEYS[2], 'next_probe_ms')
  redis.call('HSET', KEYS[2], 'disabled', '1', 'reason', ARGV[2], 'since_ms', now_ms)
end
return 1
"#;

/// A dead daemon's calls: re-stamps its in-flight slots with the time its
/// death was noticed (the upstream saw them before) instead of leaving them
/// until admission + MAX_CALL, and drops its probe marker.
/// KEYS: window zset, state hash. ARGV: owner. Returns the slots re-stamped.
const REAP: &str = r#"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tag = ':' .. ARGV[1] .. ':'
local n = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_us, '+inf')) do
  if string.find(m, tag, 1, true) then
    redis.call('ZADD', KEYS[1], 'XX', now_us, m)
    n = n + 1
  end
end
local p = redis.call('HGET', KEYS[2], 'probe')
if p and string.find(p, tag, 1, true) then
  redis.call('HDEL', KEYS[2], 'probe', 'probe_until_ms')
end
return n
"#;

/// KEYS: window zset, state hash. Returns `{disabled, reason, since_ago_ms,
/// next_probe_in_ms | -1, cooling_in_ms, proven, probing, window_calls, tok}`
/// with the window pruned as of now (read-only: nothing is removed).
/// ARGV: window_us, and now_us only under a test clock ([`GlobalGate::with_clock`]).
const STATE: &str = r#"
local now_us = tonumber(ARGV[2])
if not now_us then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local now_ms = math.floor(now_us / 1000)
local window = tonumber(ARGV[1])
local st = redis.call('HMGET', KEYS[2], 'disabled', 'reason', 'since_ms', 'next_probe_ms',
  'cooling_until_ms', 'proven', 'probe', 'probe_until_ms')
local np = tonumber(st[4])
local np_in = -1
if np ~= nil then np_in = math.max(np - now_ms, 0) end
local calls, tok = 0, 0
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now_us - window), '+inf')
for i = 1, #live do
  calls = calls + 1
  tok = tok + (tonumber(string.match(live[i], ':(%d+)$')) or 0)
end
local probing = 0
if st[7] and (tonumber(st[8]) or 0) > now_ms then probing = 1 end
local disabled = 0
if st[1] == '1' then disabled = 1 end
local proven = 0
if st[6] == '1' then proven = 1 end
return {disabled, st[2] or '', now_ms - (tonumber(st[3]) or now_ms), np_in,
  math.max((tonumber(st[5]) or 0) - now_ms, 0), proven, probing, calls, tok}
"#;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected answer from the admission script: {0}")]
    Protocol(String),
}

/// What the gate enforces for one key (its config; learned limits stay local).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub window: Duration,
    /// After an auth/quota failure, when one call may re-test the key.
    pub reprobe: Duration,
    /// Cooldown after a 429 without a hint.
    pub cooldown: Duration,
}

impl Default for KeyLimits {
    fn default() -> Self {
        KeyLimits {
            rpm: None,
            tpm: None,
            window: DEFAULT_WINDOW,
            reprobe: Duration::from_secs(30 * 60),
            cooldown: Duration::from_secs(60),
        }
    }
}

impl KeyLimits {
    /// A key's limits as the pool computes them: its overrides over the
    /// provider's (for a key of an account, the account's: the strictest of
    /// its keys'), the provider's window and cooldown, `keys.reprobe_interval`.
    pub(crate) fn of(config: &Config, id: &KeyId, ring: &KeyRing) -> KeyLimits {
        let pc = config.providers.get(id.provider());
        let limits = match (pc, ring.get(id)) {
            (Some(pc), Some(key)) => match &key.account {
                Some(a) => {
                    let members = ring
                        .for_provider(id.provider())
                        .iter()
                        .filter(|k| k.account.as_ref() == Some(a));
                    crate::limits::LimiterConfig::for_account(pc, members).limits
                }
                None => key.effective_limits(&pc.limits),
            },
            (Some(pc), None) => pc.limits,
            _ => Default::default(),
        };
        KeyLimits {
            rpm: limits.rpm.filter(|n| *n > 0),
            tpm: limits.tpm.filter(|n| *n > 0),
            window: pc
                .and_then(|p| p.window)
                .filter(|w| !w.is_zero())
                .unwrap_or(DEFAULT_WINDOW),
            reprobe: config.keys.reprobe_interval,
            cooldown: pc
                .and_then(|p| p.cooldown)
                .unwrap_or(config.keys.default_cooldown),
        }
    }

    fn limited(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// Which limit made the gate say "wait".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    Rpm,
    Tpm,
    /// Another daemon's first call to this key is in flight.
    Probation,
}

impl WaitFor {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WaitFor::Rpm => "rpm",
            WaitFor::Tpm => "tpm",
            WaitFor::Probation => "probation",
        }
    }
}

/// A key disabled cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disabled {
    pub reason: String,
    /// How long ago it was disabled.
    pub since: Duration,
    /// When one call may re-test it; `None` for an operator's disable.
    pub next_probe_in: Option<Duration>,
}

/// The gate's answer.
#[derive(Debug)]
pub enum Admit {
    Granted(GlobalCall),
    /// No room before `wait` has passed (a lower bound).
    Wait {
        wait: Duration,
        limit: WaitFor,
    },
    /// The key cools down for this much longer (a 429 somewhere).
    Cooling(Duration),
    Disabled(Disabled),
}

/// One admitted call; hand it back with [`GlobalGate::complete`]. Dropping
/// it without completing it (an early return, a panic, a cancelled job
/// future) completes it as `cancelled` in the background (see the module
/// doc): its slot is stamped with the time of the drop and its probe marker
/// freed at once. (Without a tokio runtime to run that on, its slot counts
/// until admission + [`MAX_CALL`] + window and the marker expires then.)
#[must_use = "complete the call so its slot is stamped with the completion time"]
pub struct GlobalCall {
    key: KeyId,
    /// The Redis keys it was admitted under (a reload may move the key to
    /// another account before it completes).
    keys: Arc<GateKeys>,
    /// `None` when the call skipped the round trip (unlimited, proven key).
    member: Option<String>,
    probe: bool,
    /// The key had been proven before this call.
    proven: bool,
    /// What completes it when it is dropped unfinished (`None` for calls
    /// not made by a gate, and once it has been completed).
    ender: Option<Arc<Ender>>,
    limits: KeyLimits,
}

impl std::fmt::Debug for GlobalCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalCall")
            .field("key", &self.key)
            .field("member", &self.member)
            .field("probe", &self.probe)
            .field("proven", &self.proven)
            .finish_non_exhaustive()
    }
}

impl Drop for GlobalCall {
    fn drop(&mut self) {
        let (Some(ender), Some(member)) = (self.ender.take(), self.member.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %self.key, "cluster gate: a dropped call cannot be completed outside the runtime; its slot counts until it expires");
            return;
        };
        tracing::debug!(key = %self.key, probe = self.probe, "cluster gate: call dropped unfinished; completing it as cancelled");
        metrics::counter!("llmq_global_cancelled_total").increment(1);
        let (key, keys, limits) = (self.key.clone(), self.keys.clone(), self.limits);
        runtime.spawn(async move {
            let fate = CANCELLED;
            if let Err(e) = ender.run(&keys, &member, fate, &limits).await {
                tracing::warn!(key = %key, error = %e, "cluster gate: cancelled call not recorded; its slot counts until it expires");
            }
        });
    }
}

/// The completion script's fate for a call dropped unfinished.
const CANCELLED: (&str, u64, &str, Duration) = ("cancelled", 0, "", Duration::ZERO);

/// Runs the completion script; shared by [`GlobalGate::complete`] and the
/// completion of a dropped [`GlobalCall`].
struct Ender {
    conn: ConnectionManager,
    script: Script,
    /// The test clock ([`GlobalGate::with_clock`]); `None`: Redis `TIME`.
    clock: Option<SharedClock>,
}

impl Ender {
    /// `fate`: (name, cooldown, reason, reprobe after).
    async fn run(
        &self,
        keys: &GateKeys,
        member: &str,
        fate: (&str, u64, &str, Duration),
        limits: &KeyLimits,
    ) -> Result<(), redis::RedisError> {
        let (name, cooldown_ms, reason, reprobe) = fate;
        let mut inv = GlobalGate::invocation(&self.script, keys);
        inv.arg(member)
            .arg(name)
            .arg(cooldown_ms)
            .arg(reason)
            .arg(reprobe.as_millis() as u64)
            .arg(limits.reprobe.min(limits.cooldown).as_millis() as u64);
        if let Some(c) = &self.clock {
            inv.arg(c.now().as_micros() as u64);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async::<i64>(&mut conn).await.map(|_| ())
    }
}

impl GlobalCall {
    /// Whether this call passed through Redis (false on the fast path).
    pub fn admitted_in_redis(&self) -> bool {
        self.member.is_some()
    }

    /// This call is the one cluster-wide probe of a new or disabled key.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// A key's state in the gate, for the admin views and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GateState {
    pub disabled: Option<Disabled>,
    /// Remaining cooldown.
    pub cooling: Option<Duration>,
    pub proven: bool,
    /// A probe call is in flight somewhere.
    pub probing: bool,
    /// Calls counted in the current window (in flight or completed within it).
    pub window_calls: u64,
    pub window_tokens: u64,
}

#[derive(Debug)]
struct Entry {
    limits: KeyLimits,
    keys: Arc<GateKeys>,
    /// The gate said this key has answered successfully (monotonic until a
    /// reset): with no RPM/TPM its calls skip the round trip.
    proven: AtomicBool,
    /// One admission of this key in flight per daemon: the jobs that got a
    /// local permit at the same moment queue here instead of all asking.
    asking: tokio::sync::Mutex<()>,
    /// The end of the last RPM "wait" (µs on the gate's monotonic clock):
    /// asked again before then, the answer is the same without a round trip.
    blocked_until_us: AtomicU64,
}

type Table = HashMap<KeyId, Arc<Entry>>;

/// The cluster-wide admission gate. One per daemon; cheap to share.
pub struct GlobalGate {
    conn: ConnectionManager,
    admit: Script,
    complete: Arc<Ender>,
    operator: Script,
    state: Script,
    reap: Script,
    /// This daemon's consumer name, in every member it adds.
    owner: String,
    table: RwLock<Arc<Table>>,
    /// Unix ms of the last "redis unavailable" warning (one per 10 s).
    warned_ms: AtomicU64,
    /// Origin of the refusal cache's clock.
    epoch: std::time::Instant,
    /// The test clock ([`GlobalGate::with_clock`]); `None`: Redis `TIME`.
    clock: Option<SharedClock>,
}

impl std::fmt::Debug for GlobalGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.table.read().map(|t| t.len()).unwrap_or_default();
        f.debug_struct("GlobalGate")
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn ms(n: i64) -> Duration {
    Duration::from_millis(n.max(0) as u64)
}

fn parse_admit(key: &KeyId, keys: &Arc<GateKeys>, v: Value) -> Result<Admit, GateError> {
    let bad = |v: &Value| GateError::Protocol(format!("{v:?}"));
    let Value::Array(items) = &v else {
        return Err(bad(&v));
    };
    let kind = items.first().and_then(text).ok_or_else(|| bad(&v))?;
    let n = |i: usize| items.get(i).and_then(int).ok_or_else(|| bad(&v));
    Ok(match kind.as_str() {
        "granted" => Admit::Granted(GlobalCall {
            key: key.clone(),
            keys: keys.clone(),
            member: Some(items.get(1).and_then(text).ok_or_else(|| bad(&v))?),
            probe: n(2)? == 1,
            proven: n(3)? == 1,
            ender: None,
            limits: KeyLimits::default(),
        }),
        "wait" => Admit::Wait {
            wait: Duration::from_micros(n(1)?.max(1) as u64),
            limit: match items.get(2).and_then(text).as_deref() {
                Some("tpm") => WaitFor::Tpm,
                Some("probation") => WaitFor::Probation,
                _ => WaitFor::Rpm,
            },
        },
        "cooling" => Admit::Cooling(ms(n(1)?)),
        "disabled" => Admit::Disabled(Disabled {
            reason: items.get(1).and_then(text).unwrap_or_default(),
            since: ms(n(2)?),
            next_probe_in: Some(n(3)?).filter(|n| *n >= 0).map(ms),
        }),
        _ => return Err(bad(&v)),
    })
}

/// The fate's name and arguments for the completion script.
fn fate_args(fate: &Fate, limits: &KeyLimits) -> (&'static str, u64, String) {
    match fate {
        Fate::Success { .. } => ("success", 0, String::new()),
        Fate::RateLimited { retry_after } => (
            "rate_limited",
            retry_after.unwrap_or(limits.cooldown).as_millis() as u64,
            String::new(),
        ),
        Fate::Disabled { reason } | Fate::QuotaExhausted { reason, .. } => {
            ("disabled", 0, reason.clone())
        }
        // One model's quota on the key: the key itself is fine, cluster-wide
        // (the model is parked in the local pool only).
        Fate::ModelQuota { .. } => ("untouched", 0, String::new()),
        Fate::Transient => ("transient", 0, String::new()),
        Fate::Untouched => ("untouched", 0, String::new()),
        Fate::NotSent => ("not_sent", 0, String::new()),
    }
}

/// When a disabled key may be re-tested: at the quota's reset when the
/// provider stated one (the executor resolves `NextDaily` to an instant
/// first), else after `keys.reprobe_interval`.
fn reprobe_after(fate: &Fate, limits: &KeyLimits) -> Duration {
    match fate {
        Fate::QuotaExhausted {
            reset: Some(llmq_sdk::QuotaReset::At { unix_ms }),
            ..
        } => Duration::from_millis(unix_ms.saturating_sub(crate::clock::unix_ms_now())),
        _ => limits.reprobe,
    }
}

/// Whether another daemon's key state should replace ours: disabled wins
/// over cooling, a longer cooldown over a shorter one, and an explicit
/// "available" (a probe succeeded, an operator reset) over both.
fn should_apply(mine: &StateRecord, theirs: &StateRecord, now_unix_ms: u64) -> bool {
    if mine == theirs {
        return false;
    }
    match (mine.status, theirs.status) {
        (_, KeyStatus::Cooling) => {
            let until = theirs.until_ms.unwrap_or(0);
            match mine.status {
                KeyStatus::Disabled => false,
                KeyStatus::Cooling => until > mine.until_ms.unwrap_or(0),
                KeyStatus::Available => until > now_unix_ms,
            }
        }
        (KeyStatus::Disabled, KeyStatus::Disabled) => false,
        (_, KeyStatus::Disabled) => true,
        (KeyStatus::Available, KeyStatus::Available) => false,
        (_, KeyStatus::Available) => true,
    }
}

/// One message of `llmq:keyevents` (the keystore's `KeyEvent` JSON).
#[derive(Debug, Deserialize)]
struct EventIn {
    id: String,
    #[serde(flatten)]
    record: StateRecord,
}

impl GlobalGate {
    /// A gate over this connection for the daemon named `owner` (its
    /// consumer name), with the keys and limits of `config`.
    pub fn new(
        conn: ConnectionManager,
        owner: &str,
        config: &Config,
        ring: &KeyRing,
    ) -> GlobalGate {
        let gate = GlobalGate {
            conn: conn.clone(),
            reap: Script::new(REAP),
            owner: owner.chars().filter(|c| *c != ':').collect(),
            admit: Script::new(ADMIT),
            complete: Arc::new(Ender {
                conn: conn.clone(),
                script: Script::new(COMPLETE),
                clock: None,
            }),
            operator: Script::new(OPERATOR),
            state: Script::new(STATE),
            table: RwLock::new(Arc::new(HashMap::new())),
            warned_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            clock: None,
        };
        gate.configure(config, ring);
        gate
    }

    /// **Tests only.** Admission, completion and [`GlobalGate::state`] read
    /// "now" from `clock` (its monotonic time, as µs) instead of Redis
    /// `TIME`, and so does the refusal cache: a test drives the gate with
    /// the same `ManualClock` as a local limiter (`tests/gate_vs_limiter.rs`).
    /// The scripts take it as one more, optional argument; the daemon never
    /// passes it, so production keeps the server's clock. Reap,
    /// [`GlobalGate::states`] and the operator's reset/disable still read
    /// `TIME`: don't mix them with a test clock.
    #[doc(hidden)]
    pub fn with_clock(mut self, clock: SharedClock) -> GlobalGate {
        self.complete = Arc::new(Ender {
            conn: self.conn.clone(),
            script: Script::new(COMPLETE),
            clock: Some(clock.clone()),
        });
        self.clock = Some(clock);
        self
    }

    /// The refusal cache's clock, µs.
    fn mono_us(&self) -> u64 {
        match &self.clock {
            Some(c) => c.now().as_micros() as u64,
            None => self.epoch.elapsed().as_micros() as u64,
        }
    }

    /// New keys and limits (start, SIGHUP); keys that stay keep `proven`.
    pub(crate) fn configure(&self, config: &Config, ring: &KeyRing) {
        let old = self.table();
        let table: Table = ring
            .iter()
            .map(|k| {
                let proven = old
                    .get(&k.id)
                    .is_some_and(|e| e.proven.load(Ordering::Relaxed));
                let entry = Entry {
                    limits: KeyLimits::of(config, &k.id, ring),
                    keys: Arc::new(GateKeys::of(&k.id, k.account.as_deref())),
                    proven: AtomicBool::new(proven),
                    asking: tokio::sync::Mutex::new(()),
                    blocked_until_us: AtomicU64::new(0),
                };
                (k.id.clone(), Arc::new(entry))
            })
            .collect();
        match self.table.write() {
            Ok(mut t) => *t = Arc::new(table),
            Err(p) => *p.into_inner() = Arc::new(table),
        }
    }

    fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn entry(&self, id: &KeyId) -> Option<Arc<Entry>> {
        match self.table.read() {
            Ok(t) => t.get(id).cloned(),
            Err(p) => p.into_inner().get(id).cloned(),
        }
    }

    /// The daemon this gate admits for (its consumer name).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The limits the gate enforces for a key (defaults for an unknown one).
    pub fn limits(&self, id: &KeyId) -> KeyLimits {
        self.entry(id).map(|e| e.limits).unwrap_or_default()
    }

    /// The Redis keys of `id`'s scripts (its account's window when it has
    /// one; its own keys when this gate does not know it).
    fn keys(&self, id: &KeyId) -> Arc<GateKeys> {
        self.entry(id)
            .map(|e| e.keys.clone())
            .unwrap_or_else(|| Arc::new(GateKeys::of(id, None)))
    }

    fn invocation<'a>(script: &'a Script, keys: &GateKeys) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(&keys.win).key(&keys.state).key(&keys.meta);
        inv
    }

    /// Asks for one call of `tokens` on `key`. `probe`: the local pool
    /// granted it as a re-probe of a disabled key (never skips Redis).
    pub async fn admit(&self, key: &KeyId, tokens: u64, probe: bool) -> Result<Admit, GateError> {
        let entry = self.entry(key);
        let limits = entry.as_ref().map(|e| e.limits).unwrap_or_default();
        let keys = entry
            .as_ref()
            .map(|e| e.keys.clone())
            .unwrap_or_else(|| Arc::new(GateKeys::of(key, None)));
        if !probe
            && !limits.limited()
            && entry
                .as_ref()
                .is_some_and(|e| e.proven.load(Ordering::Relaxed))
        {
            return Ok(Admit::Granted(GlobalCall {
                key: key.clone(),
                keys,
                member: None,
                probe: false,
                proven: true,
                ender: None,
                limits,
            }));
        }
        // Serialised per key, and a fresh "wait" answers for Redis.
        let _asking = match &entry {
            Some(e) => {
                let guard = e.asking.lock().await;
                let now = self.mono_us();
                let until = e.blocked_until_us.load(Ordering::Relaxed);
                if until > now {
                    return Ok(Admit::Wait {
                        wait: Duration::from_micros(until - now),
                        limit: WaitFor::Rpm,
                    });
                }
                Some(guard)
            }
            None => None,
        };
        let mut inv = Self::invocation(&self.admit, &keys);
        inv.arg(limits.window.as_micros() as u64)
            .arg(limits.rpm.unwrap_or(0))
            .arg(limits.tpm.unwrap_or(0))
            .arg(tokens)
            .arg(MAX_CALL.as_micros() as u64)
            .arg(MAX_CALL.as_millis() as u64)
            .arg(limits.reprobe.as_millis() as u64)
            .arg(PROBATION_RETRY.as_millis() as u64)
            .arg(&self.owner);
        if let Some(c) = &self.clock {
            inv.arg(c.now().as_micros() as u64);
        }
        let mut conn = self.conn.clone();
        let v: Value = inv.invoke_async(&mut conn).await?;
        let mut answer = parse_admit(key, &keys, v)?;
        if let Admit::Granted(call) = &mut answer {
            // From here on, dropping the call completes it.
            call.ender = Some(self.complete.clone());
            call.limits = limits;
        }
        if let Some(e) = &entry {
            match &answer {
                Admit::Granted(call) if call.proven => e.proven.store(true, Ordering::Relaxed),
                // Only the request count is a lower bound for *any* call
                // (a smaller one may fit the tokens; a probe may end soon).
                Admit::Wait {
                    wait,
                    limit: WaitFor::Rpm,
                } => {
                    let until = self.mono_us() + wait.as_micros() as u64;
                    e.blocked_until_us.store(until, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        metrics::counter!("llmq_global_admissions_total", "result" => match &answer {
            Admit::Granted(_) => "granted",
            Admit::Wait { limit, .. } => limit.as_str(),
            Admit::Cooling(_) => "cooling",
            Admit::Disabled(_) => "disabled",
        })
        .increment(1);
        Ok(answer)
    }

    /// Ends an admitted call: re-stamps its slot with the completion time
    /// and records what it says about the key (proven, cooling, disabled),
    /// in one round trip. A Redis error is logged; the slot then simply
    /// counts a little longer and the probe marker expires on its own. When
    /// this future is dropped before Redis answered, the call completes
    /// itself as cancelled (see [`GlobalCall`]).
    pub async fn complete(&self, mut call: GlobalCall, fate: &Fate) {
        let entry = self.entry(&call.key);
        let limits = entry.as_ref().map(|e| e.limits).unwrap_or_default();
        if let (Fate::Success { .. }, Some(e)) = (fate, &entry) {
            e.proven.store(true, Ordering::Relaxed);
        }
        // A fast-path call only matters when it changes the key's state.
        if call.member.is_none()
            && !matches!(
                fate,
                Fate::RateLimited { .. } | Fate::Disabled { .. } | Fate::QuotaExhausted { .. }
            )
        {
            return;
        }
        let (name, cooldown_ms, reason) = fate_args(fate, &limits);
        let args = (
            name,
            cooldown_ms,
            reason.as_str(),
            reprobe_after(fate, &limits),
        );
        let member = call.member.as_deref().unwrap_or("");
        let done = self.complete.run(&call.keys, member, args, &limits).await;
        // Recorded (or Redis failed, and the slot expires on its own): the
        // drop has nothing left to do.
        call.ender = None;
        // A call given back unsent frees its slot at once, so a cached RPM
        // "wait" is no longer a lower bound: ask Redis again next time
        // (found by tests/gate_vs_limiter.rs).
        if let (Fate::NotSent, Some(e), true) = (fate, &entry, done.is_ok()) {
            e.blocked_until_us.store(0, Ordering::Relaxed);
        }
        if let Err(e) = done {
            self.warn(&call.key, "completion not recorded", &e);
        }
    }

    /// Asks the gate about a call the local pool granted. On a refusal the
    /// local pool learns why first (the key is blocked for the wait, cooling
    /// or disabled there too, so it is not picked again at once), then the
    /// permit is given back unsent, and `Ok(None)` tells the caller to
    /// re-plan. When the gate cannot be asked, the permit comes back with
    /// the error for the caller to classify (`failure::Failure::of_gate`).
    pub(crate) async fn admit_permit(
        &self,
        pool: &KeyPool,
        permit: Permit,
    ) -> Result<Option<(Permit, GlobalCall)>, (Permit, GateError)> {
        let id = permit.key_id().clone();
        let answer = match self.admit(&id, permit.tokens(), permit.is_probe()).await {
            Ok(a) => a,
            Err(e) => {
                self.warn(&id, "admission refused: redis unavailable", &e);
                return Err((permit, e));
            }
        };
        let now = Now::of(&**pool.clock());
        if !matches!(answer, Admit::Granted(_)) {
            tracing::debug!(key = %id, ?answer, "cluster gate: refused");
        }
        match answer {
            Admit::Granted(call) => return Ok(Some((permit, call))),
            Admit::Wait { wait, .. } => {
                let wait_ms = (wait.as_micros() as u64).div_ceil(1000).max(1);
                pool.hold_back(&id, Duration::from_millis(wait_ms), "cluster window full");
            }
            Admit::Cooling(left) => {
                // Blocked for the cooldown even where the local state says
                // more (disabled, due for a probe): never asked again sooner.
                let left_ms = (left.as_millis() as u64).max(1);
                pool.hold_back(
                    &id,
                    Duration::from_millis(left_ms),
                    "cooling in the cluster",
                );
                let record = StateRecord {
                    status: KeyStatus::Cooling,
                    until_ms: Some(now.unix_ms + left.as_millis() as u64),
                    ..StateRecord::available()
                };
                apply(pool, &id, record, now);
            }
            Admit::Disabled(d) => {
                let record = StateRecord {
                    status: KeyStatus::Disabled,
                    until_ms: None,
                    reason: Some(d.reason),
                    since_ms: Some(now.unix_ms.saturating_sub(d.since.as_millis() as u64)),
                    next_probe_ms: d
                        .next_probe_in
                        .map(|n| now.unix_ms + n.as_millis().max(1) as u64),
                };
                // When ours is disabled too (this was a due probe that another
                // daemon runs, or an operator disabled the key) the local
                // schedule stays: hold the key back until the gate's next
                // probe, re-asking at least every DISABLED_RECHECK.
                let hold = d
                    .next_probe_in
                    .unwrap_or(DISABLED_RECHECK)
                    .clamp(Duration::from_millis(1), DISABLED_RECHECK);
                let hold_ms = hold.as_millis() as u64;
                pool.hold_back(
                    &id,
                    Duration::from_millis(hold_ms),
                    "disabled in the cluster",
                );
                apply(pool, &id, record, now);
            }
        }
        pool.report(permit, Fate::NotSent);
        Ok(None)
    }

    fn forget_proven(&self, id: &KeyId) {
        if let Some(e) = self.entry(id) {
            e.proven.store(false, Ordering::Relaxed);
        }
    }

    /// What the executor tells the local pool about the upstream's
    /// rate-limit headers when this gate admits the key. For a limit the
    /// gate holds (configured RPM / TPM), "0 remaining, resets in R" is
    /// dropped: R is the time to a *full* reset (OpenAI's semantics), so
    /// taken as "nothing before R" it would idle a daemon for up to a window
    /// while the gate frees slots one by one as they age out. Learned
    /// limits (`*_limit`) still tighten the local limiter.
    pub(crate) fn observed(&self, key: &KeyId, seen: &ObservedLimits) -> ObservedLimits {
        let limits = self.limits(key);
        let mut out = *seen;
        if limits.rpm.is_some() {
            out.requests_remaining = None;
            out.requests_reset_ms = None;
        }
        if limits.tpm.is_some() {
            out.tokens_remaining = None;
            out.tokens_reset_ms = None;
        }
        out
    }

    /// Re-enables a key cluster-wide (operator reset): clears disabled,
    /// cooling and probation (a reset key proves itself again).
    pub async fn reset(&self, key: &KeyId) -> Result<(), GateError> {
        self.forget_proven(key);
        self.operator_op(key, "reset", "").await
    }

    /// Disables a key cluster-wide until an operator resets it (no probes).
    pub async fn disable(&self, key: &KeyId, reason: &str) -> Result<(), GateError> {
        self.operator_op(key, "disable", reason).await
    }

    async fn operator_op(&self, key: &KeyId, op: &str, reason: &str) -> Result<(), GateError> {
        let mut inv = Self::invocation(&self.operator, &self.keys(key));
        inv.arg(op).arg(reason);
        let mut conn = self.conn.clone();
        inv.invoke_async::<i64>(&mut conn).await?;
        Ok(())
    }

    /// Frees what a dead daemon (`owner`, its consumer name) held on these
    /// keys: in-flight slots count until now + window instead of until
    /// admission + [`MAX_CALL`] + window, and its probe markers go. Called
    /// by the daemon that noticed the death (see `cluster`).
    pub async fn reap(&self, keys: &[KeyId], owner: &str) -> Result<u64, GateError> {
        let mut n = 0;
        for key in keys {
            let mut inv = Self::invocation(&self.reap, &self.keys(key));
            inv.arg(owner);
            let mut conn = self.conn.clone();
            n += inv.invoke_async::<u64>(&mut conn).await?;
        }
        Ok(n)
    }

    /// A key's state in the gate, as of Redis's clock now.
    pub async fn state(&self, key: &KeyId) -> Result<GateState, GateError> {
        let mut inv = Self::invocation(&self.state, &self.keys(key));
        inv.arg(self.limits(key).window.as_micros() as u64);
        if let Some(c) = &self.clock {
            inv.arg(c.now().as_micros() as u64);
        }
        let mut conn = self.conn.clone();
        let v: Value = inv.invoke_async(&mut conn).await?;
        parse_state(&v)
    }

    /// Many keys' states, pipelined (256 keys per round trip).
    pub async fn states(&self, keys: &[KeyId]) -> Result<Vec<GateState>, GateError> {
        let mut conn = self.conn.clone();
        let sha = self.state.load_async(&mut conn).await?;
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(256) {
            let mut pipe = redis::pipe();
            for key in chunk {
                let keys = self.keys(key);
                pipe.cmd("EVALSHA")
                    .arg(&sha)
                    .arg(2)
                    .arg(&keys.win)
                    .arg(&keys.state)
                    .arg(self.limits(key).window.as_micros() as u64);
            }
            let answers: Vec<Value> = pipe.query_async(&mut conn).await?;
            for v in &answers {
                out.push(parse_state(v)?);
            }
        }
        Ok(out)
    }

    fn warn(&self, key: &KeyId, what: &str, e: &dyn std::fmt::Display) {
        let now = crate::clock::unix_ms_now();
        let last = self.warned_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self
                .warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(key = %key, error = %e, "cluster gate: {what}");
        }
    }

    /// Copies the gate's disabled and cooling keys into the local pool
    /// (after a (re)subscription, when events may have been missed).
    pub(crate) async fn resync(&self, pool: &KeyPool) -> Result<usize, GateError> {
        let mut applied = 0;
        let ids = pool.key_ids();
        let states = self.states(&ids).await?;
        for (id, st) in ids.into_iter().zip(states) {
            let now = Now::of(&**pool.clock());
            let record = if let Some(d) = st.disabled {
                StateRecord {
                    status: KeyStatus::Disabled,
                    until_ms: None,
                    reason: Some(d.reason),
                    since_ms: Some(now.unix_ms.saturating_sub(d.since.as_millis() as u64)),
                    next_probe_ms: d.next_probe_in.map(|n| now.unix_ms + n.as_millis() as u64),
                }
            } else if let Some(left) = st.cooling.filter(|c| !c.is_zero()) {
                StateRecord {
                    status: KeyStatus::Cooling,
                    until_ms: Some(now.unix_ms + left.as_millis() as u64),
                    ..StateRecord::available()
                }
            } else {
                continue;
            };
            if apply(pool, &id, record, now) {
                applied += 1;
            }
        }
        Ok(applied)
    }

    /// Follows `llmq:keyevents` (every daemon's keystore publishes its key
    /// state changes there) and applies other daemons' changes to the local
    /// pool, so a key disabled or cooling on one daemon is so on all within
    /// milliseconds. Reconnects with backoff and resynchronises from the
    /// gate's state hashes each time; stops when `stop` turns true.
    pub(crate) fn spawn_listener(
        self: Arc<Self>,
        redis_url: String,
        pool: KeyPool,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                if *stop.borrow() {
                    return;
                }
                match self.listen(&redis_url, &pool, &mut stop).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: key events subscription lost; reconnecting");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        })
    }

    /// One subscription: `Ok` when stopped, `Err` when the connection ended.
    async fn listen(
        &self,
        url: &str,
        pool: &KeyPool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), GateError> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(KEY_EVENTS_CHANNEL).await?;
        // Subscribed first, then resync: nothing falls in between.
        let applied = self.resync(pool).await?;
        tracing::debug!(applied, "cluster: key states synchronised from redis");
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else {
                        return Err(GateError::Protocol("subscription closed".into()));
                    };
                    let Ok(payload) = msg.get_payload::<String>() else { continue };
                    tracing::trace!(%payload, "cluster: key event");
                    let Ok(ev) = serde_json::from_str::<EventIn>(&payload) else { continue };
                    let Ok(id) = ev.id.parse::<KeyId>() else { continue };
                    if ev.record.status == KeyStatus::Available {
                        // A reset (or a probe elsewhere): ask Redis again
                        // whether the key is proven before skipping it.
                        self.forget_proven(&id);
                    }
                    let now = Now::of(&**pool.clock());
                    apply(pool, &id, ev.record, now);
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// The gate a daemon runs with: `Some` when `[cluster] enabled` (default).
pub(crate) fn gate_for(
    config: &Config,
    ring: &KeyRing,
    queue: &crate::queue::Queue,
) -> Option<Arc<GlobalGate>> {
    config.cluster.enabled.then(|| {
        Arc::new(GlobalGate::new(
            queue.connection(),
            queue.consumer(),
            config,
            ring,
        ))
    })
}

/// Applies another daemon's (or the gate's) state to the local pool when it
/// should replace ours (see [`should_apply`]); without re-publishing it.
fn apply(pool: &KeyPool, id: &KeyId, theirs: StateRecord, now: Now) -> bool {
    let Ok(local) = pool.state(id) else {
        return false;
    };
    let mine = StateRecord::of(&local, now);
    if !should_apply(&mine, &theirs, now.unix_ms) {
        return false;
    }
    tracing::debug!(key = %id, ?mine, ?theirs, "cluster: key state from another daemon");
    if theirs.status == KeyStatus::Available {
        // A reset or a successful probe elsewhere. (`restore` never replaces
        // a state set in this run.) This re-publishes "available" once; the
        // other daemons already have it and ignore it.
        return pool.reset(id).is_ok();
    }
    // Only over an available key; a cooling one learns it from the gate.
    local == KeyState::Available
        && pool
            .restore(
                id,
                Restored {
                    state: Some(theirs),
                    ..Default::default()
                },
            )
            .is_ok()
}

fn parse_state(v: &Value) -> Result<GateState, GateError> {
    let bad = || GateError::Protocol(format!("{v:?}"));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let n = |i: usize| items.get(i).and_then(int).ok_or_else(bad);
    Ok(GateState {
        disabled: (n(0)? == 1).then(|| Disabled {
            reason: items.get(1).and_then(text).unwrap_or_default(),
            since: ms(n(2).unwrap_or(0)),
            next_probe_in: n(3).ok().filter(|n| *n >= 0).map(ms),
        }),
        cooling: Some(ms(n(4)?)).filter(|d| !d.is_zero()),
        proven: n(5)? == 1,
        probing: n(6)? == 1,
        window_calls: n(7)?.max(0) as u64,
        window_tokens: n(8)?.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: KeyStatus, until: Option<u64>) -> StateRecord {
        StateRecord {
            status,
            until_ms: until,
            ..StateRecord::available()
        }
    }

    #[test]
    fn keys_of_one_api_key_share_a_hash_tag() {
        let id = KeyId::new("groq", 2);
        assert_eq!(window_key(&id), "llmq:{key:groq#2}:win");
        assert_eq!(state_key(&id), "llmq:{key:groq#2}:state");
        let own = GateKeys::of(&id, None);
        assert_eq!(
            (own.win.as_str(), own.state.as_str(), own.meta.as_str()),
            (
                "llmq:{key:groq#2}:win",
                "llmq:{key:groq#2}:state",
                "llmq:{key:groq#2}:state"
            )
        );
    }

    #[test]
    fn keys_of_an_account_share_its_window_under_its_hash_tag() {
        let a = GateKeys::of(&KeyId::new("gemini", 1), Some("proj-1"));
        let b = GateKeys::of(&KeyId::new("gemini", 2), Some("proj-1"));
        assert_eq!(a.win, "llmq:{acct:gemini:proj-1}:win");
        assert_eq!(a.win, b.win);
        assert_eq!(a.meta, "llmq:{acct:gemini:proj-1}:meta");
        assert_eq!(a.state, "llmq:{acct:gemini:proj-1}:state:gemini#1");
        assert_ne!(a.state, b.state, "state stays per key");
        // One hash tag per script: one Redis Cluster slot.
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_string();
        assert!([&a.win, &a.state, &a.meta]
            .iter()
            .all(|k| tag(k) == tag(&a.win)));
        // Another provider's account of the same name is another pool.
        let other = GateKeys::of(&KeyId::new("groq", 1), Some("proj-1"));
        assert_ne!(other.win, a.win);
    }

    #[test]
    fn remote_states_replace_local_ones_by_strength() {
        let avail = StateRecord::available();
        let cool = |u| rec(KeyStatus::Cooling, Some(u));
        let dis = StateRecord {
            status: KeyStatus::Disabled,
            reason: Some("auth_failed".into()),
            ..StateRecord::available()
        };
        let now = 1_000;
        assert!(should_apply(&avail, &cool(2_000), now));
        assert!(
            !should_apply(&avail, &cool(500), now),
            "an expired cooldown"
        );
        assert!(should_apply(&cool(2_000), &cool(3_000), now));
        assert!(
            !should_apply(&cool(3_000), &cool(2_000), now),
            "keep the longer one"
        );
        assert!(
            !should_apply(&dis, &cool(3_000), now),
            "disabled beats cooling"
        );
        assert!(should_apply(&cool(3_000), &dis, now));
        assert!(!should_apply(&dis, &dis, now));
        assert!(
            should_apply(&dis, &avail, now),
            "a probe succeeded elsewhere / reset"
        );
        assert!(!should_apply(&avail, &avail, now));
    }

    #[test]
    fn answers_parse() {
        let id = KeyId::new("p", 1);
        let keys = Arc::new(GateKeys::of(&id, None));
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let g = parse_admit(
            &id,
            &keys,
            Value::Array(vec![
                bulk("granted"),
                bulk("7:40"),
                Value::Int(1),
                Value::Int(0),
            ]),
        )
        .unwrap();
        assert!(
            matches!(g, Admit::Granted(ref c) if c.member.as_deref() == Some("7:40") && c.probe)
        );
        let w = parse_admit(
            &id,
            &keys,
            Value::Array(vec![bulk("wait"), Value::Int(2_500), bulk("tpm")]),
        )
        .unwrap();
        assert!(
            matches!(w, Admit::Wait { wait, limit: WaitFor::Tpm } if wait == Duration::from_micros(2_500))
        );
        let d = parse_admit(
            &id,
            &keys,
            Value::Array(vec![
                bulk("disabled"),
                bulk("auth_failed"),
                Value::Int(10),
                Value::Int(-1),
            ]),
        )
        .unwrap();
        assert!(
            matches!(d, Admit::Disabled(ref d) if d.next_probe_in.is_none() && d.reason == "auth_failed")
        );
        assert!(parse_admit(&id, &keys, Value::Nil).is_err());
    }

    #[test]
    fn fast_path_calls_only_report_state_changes() {
        let l = KeyLimits::default();
        assert_eq!(
            fate_args(&Fate::RateLimited { retry_after: None }, &l).1,
            60_000
        );
        assert_eq!(
            fate_args(
                &Fate::RateLimited {
                    retry_after: Some(Duration::from_millis(1500))
                },
                &l
            )
            .1,
            1_500
        );
        assert_eq!(fate_args(&Fate::Disabled { reason: "x".into() }, &l).2, "x");
    }

    #[test]
    fn a_model_quota_leaves_the_key_alone_cluster_wide_and_a_key_quota_probes_at_its_reset() {
        let l = KeyLimits::default();
        let model = Fate::ModelQuota {
            model: "gemini-2.0-flash".into(),
            reason: "quota_exhausted".into(),
            reset: Some(llmq_sdk::QuotaReset::At { unix_ms: u64::MAX }),
        };
        assert_eq!(fate_args(&model, &l).0, "untouched");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let key = Fate::QuotaExhausted {
            reason: "quota_exhausted".into(),
            reset: Some(llmq_sdk::QuotaReset::At {
                unix_ms: now_ms + 3_600_000,
            }),
        };
        assert_eq!(fate_args(&key, &l).0, "disabled");
        let after = reprobe_after(&key, &l);
        assert!(
            after <= Duration::from_secs(3600) && after > Duration::from_secs(3590),
            "{after:?}"
        );
        let unknown = Fate::QuotaExhausted {
            reason: "quota_exhausted".into(),
            reset: None,
        };
        assert_eq!(reprobe_after(&unknown, &l), l.reprobe);
    }
}
