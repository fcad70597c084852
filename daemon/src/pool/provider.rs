//! One provider's keys and the selection among them. Everything here runs
//! under the provider's mutex, in short sections that never await.
//!
//! Each key sits in exactly one place ([`Loc`]): the ready set of its group
//! (it may serve now, as far as we know), parked until a clock time (cooling
//! down, a full window, a day cap, a scheduled probe), waiting for a release
//! (all its concurrency slots in flight), due for a probe, or off (disabled
//! without a probe, being probed, retired). Keys that serve the same models
//! form a group, so a model restriction never costs a scan either.

use super::ready::{LoadKey, LruKey, ReadySet, Slot};
use super::{
    model_key, next_daily_reset, AcquireRequest, DailyDelta, Fate, KeyDelta, KeyEvent, KeySnapshot,
    KeyState, KeyStats, ParkedModel, Restored, SpendDelta, StateRecord, StatsDelta, UsageDelta,
    QUOTA_EXHAUSTED,
};
use crate::config::{KeysConfig, ProviderConfig};
use crate::job::Strategy;
use crate::keys::{ApiKey, KeyId};
use crate::limits::{Admission, Limiter, LimiterConfig, LocalLimiter, Now, Refusal, Ticket};
use llmq_sdk::QuotaReset;
use rand::Rng;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// Where a key is kept (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Loc {
    Ready,
    Parked(Duration),
    Waiting,
    Probe,
    Off,
}

/// Unflushed changes for the keystore.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub stats: StatsDelta,
    /// The latest day's counts inline; earlier days (rare) in `older`.
    pub today: DailyDelta,
    pub older: Vec<DailyDelta>,
    /// `(day, interned model, counters)`.
    pub usage: Vec<(u64, u32, UsageDelta)>,
}

/// One key. `repr(C)` keeps the fields a selection touches together, at the
/// front, to spare cache misses when there are thousands of keys.
#[repr(C)]
pub(super) struct Entry {
    loc: Loc,
    seq: u64,
    in_flight: u32,
    /// `key.weight`, kept here to spare a pointer chase on the hot path.
    weight: u32,
    group: u32,
    gpos: u32,
    pub probing: bool,
    pub retired: bool,
    dirty: bool,
    /// Whether this key is counted in its group's `live`.
    counted_live: bool,
    pub state: KeyState,
    pub key: Arc<ApiKey>,
    pub limiter: Limiter,
    pending: Pending,
    pub stats: KeyStats,
    /// Models this key may not serve until a time (model-scoped quotas).
    /// Usually empty; the key stays where its state says for other models.
    pub parks: Vec<Park>,
}

/// One model parked on a key until a clock time.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Park {
    /// [`model_key`] of the model the quota named.
    pub model: Arc<str>,
    pub until: Duration,
    pub reason: String,
}

impl Entry {
    /// Until when this key may not serve `model` (a model-scoped quota).
    fn parked_until(&mut self, model: &str, now: Now) -> Option<Duration> {
        if self.parks.is_empty() {
            return None;
        }
        self.parks.retain(|p| p.until > now.mono);
        let m = model_key(model);
        self.parks.iter().find(|p| &*p.model == m).map(|p| p.until)
    }

    /// Parks `model` on this key until `until` (a later park wins).
    fn park(&mut self, model: &str, until: Duration, reason: String, now: Now) {
        self.parks.retain(|p| p.until > now.mono);
        let m = model_key(model);
        match self.parks.iter_mut().find(|p| &*p.model == m) {
            Some(p) => {
                p.until = p.until.max(until);
                p.reason = reason;
            }
            None => self.parks.push(Park {
                model: Arc::from(m),
                until,
                reason,
            }),
        }
    }

    fn slot(&self, idx: u32) -> Slot {
        Slot {
            idx,
            gpos: self.gpos,
            seq: self.seq,
            in_flight: self.in_flight,
            weight: self.weight,
        }
    }

    fn daily(&mut self, day: u64, requests: i64, tokens: i64) {
        let p = &mut self.pending;
        let d = if p.today.day == day || (p.today.requests == 0 && p.today.tokens == 0) {
            p.today.day = day;
            &mut p.today
        } else if day > p.today.day {
            p.older.push(p.today);
            p.today = DailyDelta {
                day,
                requests: 0,
                tokens: 0,
            };
            &mut p.today
        } else {
            match p.older.iter().position(|d| d.day == day) {
                Some(i) => &mut p.older[i],
                None => {
                    p.older.push(DailyDelta {
                        day,
                        requests: 0,
                        tokens: 0,
                    });
                    let last = p.older.len() - 1;
                    &mut p.older[last]
                }
            }
        };
        d.requests += requests;
        d.tokens += tokens;
    }
}

struct Group {
    /// Sorted; empty = every model.
    models: Vec<String>,
    /// Key indexes by position (`u32::MAX` where a key moved away).
    members: Vec<u32>,
    ready: ReadySet,
    parked: BTreeSet<(Duration, u32)>,
    probes: BTreeSet<u32>,
    waiting: u32,
    /// Members not retired and not disabled.
    live: u32,
}

impl Group {
    fn new(models: Vec<String>) -> Group {
        Group {
            models,
            members: Vec::new(),
            ready: ReadySet::default(),
            parked: BTreeSet::new(),
            probes: BTreeSet::new(),
            waiting: 0,
            live: 0,
        }
    }

    fn serves(&self, model: &str) -> bool {
        self.models.is_empty()
            || self
                .models
                .binary_search_by(|m| m.as_str().cmp(model))
                .is_ok()
    }
}

/// Provider-wide settings the pool applies to its keys.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub provider: ProviderConfig,
    pub keys: KeysConfig,
}

impl Settings {
    fn cooldown(&self) -> Duration {
        self.provider.cooldown.unwrap_or(self.keys.default_cooldown)
    }
}

/// The result of a selection, before it becomes a permit.
pub(super) enum Pick {
    Granted {
        idx: u32,
        ticket: Ticket,
        probe: bool,
    },
    Wait(Duration),
    Never(String),
}

/// How one key answered a request.
enum Eval {
    Grant(Ticket),
    /// Refused; `until` is a lower bound on when it could pass, `never`
    /// that it cannot ever take this request.
    Skip {
        until: Option<Duration>,
        never: bool,
    },
}

pub(super) struct ProviderState {
    pub name: Arc<str>,
    pub settings: Settings,
    pub keys: Vec<Entry>,
    by_instance: HashMap<u32, u32>,
    groups: Vec<Group>,
    group_of_models: HashMap<Vec<String>, u32>,
    /// Interned model names and, per model, the groups that serve it.
    model_ids: super::FnvMap<Box<str>, u32>,
    model_names: Vec<Arc<str>>,
    model_groups: Vec<Vec<u32>>,
    seq: u64,
    dirty: Vec<u32>,
    /// Unflushed spend per day, and today's total (days are the provider's,
    /// see `daily_reset`).
    spend: Vec<SpendDelta>,
    spend_day: u64,
    spend_today: f64,
    /// The provider's current day, cached.
    today: crate::calendar::CachedDay,
    /// Quota pools: each account's shared quota and its keys (indexes).
    accounts: HashMap<String, (crate::limits::SharedQuota, Vec<u32>)>,
    pub events: Option<UnboundedSender<KeyEvent>>,
    /// Reused between calls: per-group cursors of a merged scan.
    cursors: Vec<(u32, Option<LoadKey>)>,
}

fn sorted_models(key: &ApiKey) -> Vec<String> {
    let mut m = key.models.clone();
    m.sort();
    m.dedup();
    m
}

impl ProviderState {
    pub(crate) fn new(name: Arc<str>, settings: Settings, now: Now) -> ProviderState {
        ProviderState {
            spend: Vec::new(),
            spend_day: provider_day(&settings, now),
            today: Default::default(),
            accounts: HashMap::new(),
            name,
            settings,
            keys: Vec::new(),
            by_instance: HashMap::new(),
            groups: Vec::new(),
            group_of_models: HashMap::new(),
            model_ids: Default::default(),
            model_names: Vec::new(),
            model_groups: Vec::new(),
            seq: 0,
            dirty: Vec::new(),
            spend_today: 0.0,
            events: None,
            cursors: Vec::new(),
        }
    }

    // ----- membership -------------------------------------------------------

    /// Makes the provider hold exactly `keys` (SIGHUP reload keeps the
    /// limiter, state and stats of every key whose id stays).
    pub(crate) fn sync(&mut self, settings: Settings, keys: &[ApiKey], now: Now) {
        self.settings = settings;
        self.today = Default::default();
        self.sync_accounts(keys, now);
        let mut seen = vec![false; self.keys.len()];
        for key in keys {
            let cfg = LimiterConfig::for_key(&self.settings.provider, key);
            let quota = key
                .account
                .as_ref()
                .and_then(|a| self.accounts.get(a))
                .map(|(q, _)| q.clone());
            let models = sorted_models(key);
            match self.by_instance.get(&key.id.instance()).copied() {
                Some(idx) => {
                    seen[idx as usize] = true;
                    self.detach(idx);
                    self.uncount_live(idx);
                    let e = &mut self.keys[idx as usize];
                    e.key = Arc::new(key.clone());
                    e.weight = key.weight;
                    e.limiter.reconfigure(cfg, now);
                    e.limiter.share(quota.as_ref(), now);
                    e.retired = false;
                    if self.groups[e.group as usize].models != models {
                        let old = e.group as usize;
                        let pos = e.gpos as usize;
                        self.groups[old].members[pos] = u32::MAX;
                        self.join_group(idx, models);
                    }
                    self.count_live(idx);
                    self.place(idx, now);
                }
                None => {
                    let idx = self.keys.len() as u32;
                    self.keys.push(Entry {
                        key: Arc::new(key.clone()),
                        limiter: Limiter::Local(match &quota {
                            Some(q) => LocalLimiter::sharing(cfg, q),
                            None => LocalLimiter::new(cfg, now),
                        }),
                        state: KeyState::Available,
                        probing: false,
                        retired: false,
                        weight: key.weight,
                        group: 0,
                        gpos: 0,
                        loc: Loc::Off,
                        seq: 0,
                        in_flight: 0,
                        counted_live: false,
                        stats: KeyStats::default(),
                        pending: Pending::default(),
                        dirty: false,
                        parks: Vec::new(),
                    });
                    self.by_instance.insert(key.id.instance(), idx);
                    self.join_group(idx, models);
                    self.count_live(idx);
                    self.place(idx, now);
                }
            }
        }
        for key in keys {
            let idx = self.by_instance.get(&key.id.instance()).copied();
            let slot = key.account.as_ref().and_then(|a| self.accounts.get_mut(a));
            if let (Some(idx), Some((_, members))) = (idx, slot) {
                members.push(idx);
            }
        }
        for (i, kept) in seen.into_iter().enumerate() {
            if !kept && !self.keys[i].retired {
                let idx = i as u32;
                self.detach(idx);
                self.keys[i].retired = true;
                self.uncount_live(idx);
            }
        }
    }

    /// One shared quota per account named by `keys` (an account that stays
    /// keeps its quota's history); each account's limits are the strictest
    /// of its keys' (see `LimiterConfig::for_account`).
    fn sync_accounts(&mut self, keys: &[ApiKey], now: Now) {
        let mut members: HashMap<&str, Vec<&ApiKey>> = HashMap::new();
        for key in keys {
            if let Some(a) = &key.account {
                members.entry(a.as_str()).or_default().push(key);
            }
        }
        let mut old = std::mem::take(&mut self.accounts);
        for (name, ks) in members {
            let cfg = LimiterConfig::for_account(&self.settings.provider, ks.iter().copied());
            let quota = match old.remove(name) {
                Some((q, _)) => {
                    q.reconfigure(cfg, now);
                    q
                }
                None => crate::limits::SharedQuota::new(cfg, now),
            };
            // Members are filled in once every key has its index.
            self.accounts.insert(name.to_string(), (quota, Vec::new()));
        }
    }

    /// The other keys of `idx`'s account that wait on its quota (parked
    /// while available) go back to the ready set: room came back early.
    fn wake_account(&mut self, idx: u32, now: Now) {
        let Some(account) = self.keys[idx as usize].key.account.as_deref() else {
            return;
        };
        let Some((_, members)) = self.accounts.get(account) else {
            return;
        };
        let parked: Vec<u32> = members
            .iter()
            .copied()
            .filter(|&i| {
                let e = &self.keys[i as usize];
                i != idx && matches!(e.loc, Loc::Parked(_)) && e.state == KeyState::Available
            })
            .collect();
        for i in parked {
            self.detach(i);
            self.place(i, now);
        }
    }

    fn join_group(&mut self, idx: u32, models: Vec<String>) {
        let g = match self.group_of_models.get(&models) {
            Some(&g) => g,
            None => {
                let g = self.groups.len() as u32;
                self.groups.push(Group::new(models.clone()));
                self.group_of_models.insert(models, g);
                // A new group may serve models already interned.
                for (m, name) in self.model_names.iter().enumerate() {
                    if self.groups[g as usize].serves(name) {
                        self.model_groups[m].push(g);
                    }
                }
                g
            }
        };
        let group = &mut self.groups[g as usize];
        let e = &mut self.keys[idx as usize];
        e.group = g;
        e.gpos = group.members.len() as u32;
        group.members.push(idx);
    }

    fn is_live(e: &Entry) -> bool {
        !e.retired && !matches!(e.state, KeyState::Disabled { .. })
    }

    fn count_live(&mut self, idx: u32) {
        let e = &mut self.keys[idx as usize];
        let live = Self::is_live(e);
        if live != e.counted_live {
            e.counted_live = live;
            let g = &mut self.groups[e.group as usize];
            if live {
                g.live += 1;
            } else {
                g.live -= 1;
            }
        }
    }

    fn uncount_live(&mut self, idx: u32) {
        let e = &mut self.keys[idx as usize];
        if e.counted_live {
            e.counted_live = false;
            self.groups[e.group as usize].live -= 1;
        }
    }

    pub(crate) fn index_of(&self, id: &KeyId) -> Option<u32> {
        self.by_instance
            .get(&id.instance())
            .copied()
            .filter(|&i| !self.keys[i as usize].retired)
    }

    /// Interns a model name; the groups that serve it are computed once.
    pub(crate) fn model_id(&mut self, model: &str) -> u32 {
        if let Some(&m) = self.model_ids.get(model) {
            return m;
        }
        let m = self.model_names.len() as u32;
        self.model_names.push(Arc::from(model));
        self.model_ids.insert(model.into(), m);
        let groups = (0..self.groups.len() as u32)
            .filter(|&g| self.groups[g as usize].serves(model))
            .collect();
        self.model_groups.push(groups);
        m
    }

    // ----- locations --------------------------------------------------------

    /// Takes a key out of wherever it is kept.
    fn detach(&mut self, idx: u32) {
        let e = &mut self.keys[idx as usize];
        let g = &mut self.groups[e.group as usize];
        match e.loc {
            Loc::Ready => g.ready.remove(e.slot(idx)),
            Loc::Parked(t) => {
                g.parked.remove(&(t, idx));
            }
            Loc::Waiting => g.waiting -= 1,
            Loc::Probe => {
                g.probes.remove(&idx);
            }
            Loc::Off => {}
        }
        e.loc = Loc::Off;
    }

    fn set_loc(&mut self, idx: u32, loc: Loc) {
        self.detach(idx);
        let e = &mut self.keys[idx as usize];
        let g = &mut self.groups[e.group as usize];
        match loc {
            Loc::Ready => g.ready.insert(e.slot(idx)),
            Loc::Parked(t) => {
                g.parked.insert((t, idx));
            }
            Loc::Waiting => g.waiting += 1,
            Loc::Probe => {
                g.probes.insert(idx);
            }
            Loc::Off => {}
        }
        e.loc = loc;
    }

    /// Puts a key where its state says it belongs.
    fn place(&mut self, idx: u32, now: Now) {
        let e = &mut self.keys[idx as usize];
        let loc = if e.retired {
            Loc::Off
        } else {
            match &e.state {
                KeyState::Available => Loc::Ready,
                KeyState::CoolingDown { until } if *until > now.mono => Loc::Parked(*until),
                KeyState::CoolingDown { .. } => {
                    e.state = KeyState::Available;
                    Loc::Ready
                }
                KeyState::Disabled { .. } if e.probing => Loc::Off,
                KeyState::Disabled {
                    next_probe: Some(t),
                    ..
                } if *t > now.mono => Loc::Parked(*t),
                KeyState::Disabled {
                    next_probe: Some(_),
                    ..
                } => Loc::Probe,
                KeyState::Disabled {
                    next_probe: None, ..
                } => Loc::Off,
            }
        };
        self.set_loc(idx, loc);
    }

    /// Changes a key's mutable ordering fields while keeping the ready set in step.
    fn touch(&mut self, idx: u32, f: impl FnOnce(&mut Entry)) {
        let e = &mut self.keys[idx as usize];
        let old = e.slot(idx);
        f(e);
        if e.loc == Loc::Ready {
            let new = e.slot(idx);
            self.groups[e.group as usize].ready.rekey(old, new);
        }
    }

    /// Moves parked keys whose time has come back where they belong.
    fn unpark_due(&mut self, g: u32, now: Now) {
        while let Some(&(t, idx)) = self.groups[g as usize].parked.first() {
            if t > now.mono {
                break;
            }
            self.groups[g as usize].parked.pop_first();
            self.keys[idx as usize].loc = Loc::Off;
            self.place(idx, now);
        }
    }

    /// A new state, written through to the keystore and placed.
    pub(crate) fn set_state(&mut self, idx: u32, state: KeyState, now: Now, emit: bool) {
        self.keys[idx as usize].state = state;
        self.count_live(idx);
        self.detach(idx);
        self.place(idx, now);
        if emit {
            self.emit(idx, now);
        }
    }

    fn emit(&mut self, idx: u32, now: Now) {
        if let Some(tx) = &self.events {
            let e = &self.keys[idx as usize];
            let _ = tx.send(KeyEvent {
                id: e.key.id.clone(),
                record: StateRecord::of(&e.state, now),
                at_ms: now.unix_ms,
            });
        }
    }

    // ----- selection --------------------------------------------------------

    pub(crate) fn acquire(
        &mut self,
        req: &AcquireRequest<'_>,
        model: u32,
        exclude: &[KeyId],
        now: Now,
    ) -> Pick {
        let pinned = match (req.pinned, req.instance) {
            (Some(id), _) => Some(id.instance()),
            (None, Some(n)) => Some(n),
            (None, None) => None,
        };
        if let Some(n) = pinned {
            return match self.by_instance.get(&n).copied() {
                Some(idx) if !self.keys[idx as usize].retired => {
                    self.acquire_pinned(idx, req, exclude, now)
                }
                _ => Pick::Never(format!("pinned key {}#{n} is unknown", self.name)),
            };
        }
        let groups = std::mem::take(&mut self.model_groups[model as usize]);
        let pick = self.acquire_among(&groups, req, exclude, now);
        self.model_groups[model as usize] = groups;
        pick
    }

    fn acquire_pinned(
        &mut self,
        idx: u32,
        req: &AcquireRequest<'_>,
        exclude: &[KeyId],
        now: Now,
    ) -> Pick {
        let e = &mut self.keys[idx as usize];
        let id = e.key.id.clone();
        if !e.key.serves_model(req.model) {
            return Pick::Never(format!(
                "pinned key {id} does not serve model {}",
                req.model
            ));
        }
        if exclude.contains(&id) {
            return Pick::Never(format!("pinned key {id} refused this request as too large"));
        }
        if let Some(until) = e.parked_until(req.model, now) {
            return Pick::Wait(until);
        }
        match &e.state {
            KeyState::Disabled {
                reason, next_probe, ..
            } => {
                let due = next_probe.is_some_and(|t| t <= now.mono);
                if !due || e.probing {
                    return Pick::Never(format!("pinned key {id} is disabled ({reason})"));
                }
                return match e.limiter.admit(now, req.tokens) {
                    Ok(ticket) => self.grant(idx, ticket, true),
                    Err(r) => self.pinned_refusal(&id, r, now),
                };
            }
            KeyState::CoolingDown { until } if *until > now.mono => return Pick::Wait(*until),
            _ => {}
        }
        match e.limiter.admit(now, req.tokens) {
            Ok(ticket) => self.grant(idx, ticket, false),
            Err(r) => self.pinned_refusal(&id, r, now),
        }
    }

    fn pinned_refusal(&self, id: &KeyId, r: Refusal, now: Now) -> Pick {
        match r {
            Refusal::Until { until, .. } => Pick::Wait(until),
            Refusal::Busy => Pick::Wait(now.mono + self.fallback_wait()),
            Refusal::Never { .. } => Pick::Never(format!("pinned key {id}: {r}")),
        }
    }

    /// How long a waiter sleeps when only a release can free room (it is
    /// woken earlier by the pool's change signal).
    fn fallback_wait(&self) -> Duration {
        self.settings
            .provider
            .window
            .filter(|w| !w.is_zero())
            .unwrap_or(crate::limits::DEFAULT_WINDOW)
    }

    fn acquire_among(
        &mut self,
        groups: &[u32],
        req: &AcquireRequest<'_>,
        exclude: &[KeyId],
        now: Now,
    ) -> Pick {
        if groups.is_empty() {
            return Pick::Never(if self.keys.iter().all(|e| e.retired) {
                format!("provider {} has no keys", self.name)
            } else {
                format!("no key of {} serves model {}", self.name, req.model)
            });
        }
        if !exclude.is_empty() {
            // Keys that refused this job's request as too large are out for
            // it; when they are all the live keys, nothing will serve it.
            let live: u32 = groups.iter().map(|&g| self.groups[g as usize].live).sum();
            let out = exclude
                .iter()
                .filter_map(|id| self.index_of(id))
                .filter(|&i| {
                    let e = &self.keys[i as usize];
                    groups.contains(&e.group) && Self::is_live(e)
                })
                .count() as u32;
            if live > 0 && out >= live {
                return Pick::Never(format!(
                    "every key of {} serving {} refused this request as too large",
                    self.name, req.model
                ));
            }
        }
        let mut until: Option<Duration> = None;
        let mut nevers = 0u32;
        for &g in groups {
            self.unpark_due(g, now);
        }
        // A due probe goes first: one job re-tests a disabled key.
        for &g in groups {
            let mut after = None;
            while let Some(idx) = self.next_probe(g, after) {
                after = Some(idx);
                let e = &mut self.keys[idx as usize];
                if exclude.contains(&e.key.id) {
                    continue;
                }
                if let Some(t) = e.parked_until(req.model, now) {
                    note(&mut until, Some(t));
                    continue;
                }
                match e.limiter.admit(now, req.tokens) {
                    Ok(ticket) => return self.grant(idx, ticket, true),
                    Err(r) => note(&mut until, r.until()),
                }
            }
        }
        let strategy = req.strategy.unwrap_or(self.settings.provider.strategy);
        let keys = &self.keys;
        let slot_of = |i: u32| keys[i as usize].slot(i);
        for &g in groups {
            let ready = &mut self.groups[g as usize].ready;
            match strategy {
                Strategy::RoundRobin => {}
                Strategy::LeastLoaded => ready.ensure_load(slot_of),
                Strategy::Random | Strategy::Weighted => ready.ensure_sampling(slot_of),
            }
        }
        if matches!(strategy, Strategy::Random | Strategy::Weighted) {
            match self.sample(groups, strategy == Strategy::Weighted, req, exclude, now) {
                Ok(pick) => return pick,
                Err((u, n)) => {
                    note(&mut until, u);
                    nevers += n;
                }
            }
        }
        let by_load = strategy == Strategy::LeastLoaded;
        match self.scan(groups, by_load, req, exclude, now) {
            Ok(pick) => return pick,
            Err((u, n)) => {
                note(&mut until, u);
                nevers += n;
            }
        }
        // Nothing can serve now: when could something?
        let mut live = 0;
        let mut waiting = false;
        for &g in groups {
            let g = &self.groups[g as usize];
            live += g.live;
            waiting |= g.waiting > 0;
            note(&mut until, g.parked.first().map(|p| p.0));
        }
        let probing = groups
            .iter()
            .any(|&g| !self.groups[g as usize].probes.is_empty());
        if live == 0 && !probing {
            return Pick::Never(self.all_disabled(groups, req.model));
        }
        if live > 0 && nevers >= live && !waiting && !probing {
            let parked_live = groups.iter().any(|&g| {
                self.groups[g as usize].parked.iter().any(|&(_, i)| {
                    let e = &self.keys[i as usize];
                    Self::is_live(e) && !exclude.contains(&e.key.id)
                })
            });
            if !parked_live {
                return Pick::Never(format!(
                    "{} tokens is more than any key of {} serving {} allows",
                    req.tokens, self.name, req.model
                ));
            }
        }
        match until {
            Some(t) => Pick::Wait(t),
            None => Pick::Wait(now.mono + self.fallback_wait()),
        }
    }

    fn next_probe(&self, g: u32, after: Option<u32>) -> Option<u32> {
        let probes = &self.groups[g as usize].probes;
        match after {
            None => probes.first().copied(),
            Some(a) => probes
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .next()
                .copied(),
        }
    }

    fn all_disabled(&self, groups: &[u32], model: &str) -> String {
        let mut why = Vec::new();
        let mut n = 0;
        for &g in groups {
            for &idx in &self.groups[g as usize].members {
                if let Some(e) = self.keys.get(idx as usize).filter(|e| !e.retired) {
                    n += 1;
                    if let KeyState::Disabled { reason, .. } = &e.state {
                        if why.len() < 5 {
                            why.push(format!("{}: {reason}", e.key.id));
                        }
                    }
                }
            }
        }
        if n == 0 {
            return format!("no key of {} serves model {model}", self.name);
        }
        let more = if n > why.len() { ", …" } else { "" };
        format!(
            "all {n} key(s) of {} serving {model} are disabled ({}{more})",
            self.name,
            why.join(", ")
        )
    }

    /// Asks one key; parks it when it cannot serve any request for a while.
    fn evaluate(
        &mut self,
        idx: u32,
        req: &AcquireRequest<'_>,
        exclude: &[KeyId],
        now: Now,
    ) -> Eval {
        let tokens = req.tokens;
        let e = &mut self.keys[idx as usize];
        match e.state {
            KeyState::Available => {}
            KeyState::CoolingDown { until } if until > now.mono => {
                self.set_loc(idx, Loc::Parked(until));
                return Eval::Skip {
                    until: Some(until),
                    never: false,
                };
            }
            KeyState::CoolingDown { .. } => e.state = KeyState::Available,
            KeyState::Disabled { .. } => {
                self.place(idx, now);
                return Eval::Skip {
                    until: None,
                    never: false,
                };
            }
        }
        if !exclude.is_empty() && exclude.contains(&e.key.id) {
            return Eval::Skip {
                until: None,
                never: true,
            };
        }
        // A quota of this model on this key ran out: the key stays where it
        // is for its other models.
        if let Some(until) = e.parked_until(req.model, now) {
            return Eval::Skip {
                until: Some(until),
                never: false,
            };
        }
        let refusal = match e.limiter.admit(now, tokens) {
            Ok(ticket) => return Eval::Grant(ticket),
            Err(r) => r,
        };
        if let Refusal::Never { .. } = refusal {
            return Eval::Skip {
                until: None,
                never: true,
            };
        }
        // Would the smallest call pass? If not, nothing passes: move it aside.
        match e.limiter.check(now, 1) {
            Ok(()) => Eval::Skip {
                until: refusal.until(),
                never: false,
            },
            Err(Refusal::Busy) => {
                self.set_loc(idx, Loc::Waiting);
                Eval::Skip {
                    until: None,
                    never: false,
                }
            }
            Err(Refusal::Until { until, .. }) => {
                self.set_loc(idx, Loc::Parked(until));
                Eval::Skip {
                    until: Some(refusal.until().unwrap_or(until).max(until)),
                    never: false,
                }
            }
            Err(Refusal::Never { .. }) => {
                let t = now.mono + self.fallback_wait();
                self.set_loc(idx, Loc::Parked(t));
                Eval::Skip {
                    until: None,
                    never: true,
                }
            }
        }
    }

    /// Random or weighted choice among ready keys, a few draws.
    fn sample(
        &mut self,
        groups: &[u32],
        weighted: bool,
        req: &AcquireRequest<'_>,
        exclude: &[KeyId],
        now: Now,
    ) -> Result<Pick, (Option<Duration>, u32)> {
        let mut until: Option<Duration> = None;
        let mut rng = rand::rng();
        for _ in 0..8 {
            let total: u64 = groups.iter().map(|&g| self.group_mass(g, weighted)).sum();
            if total == 0 {
                break;
            }
            let mut r = rng.random_range(0..total);
            let mut chosen = None;
            for &g in groups {
                let m = self.group_mass(g, weighted);
                if r < m {
                    let ready = &self.groups[g as usize].ready;
                    let pos = if weighted {
                        ready.pick_weighted(r)
                    } else {
                        ready.pick_uniform(r)
                    };
                    chosen = pos.map(|p| self.groups[g as usize].members[p]);
                    break;
                }
                r -= m;
            }
            let Some(idx) = chosen else { break };
            match self.evaluate(idx, req, exclude, now) {
                Eval::Grant(ticket) => return Ok(self.grant(idx, ticket, false)),
                Eval::Skip { until: u, .. } => note(&mut until, u),
            }
        }
        Err((until, 0))
    }

    fn group_mass(&self, g: u32, weighted: bool) -> u64 {
        let ready = &self.groups[g as usize].ready;
        if weighted {
            ready.total_weight()
        } else {
            ready.len()
        }
    }

    /// Ready keys in least-recently-used (or least-loaded) order, merged
    /// across groups, until one grants.
    fn scan(
        &mut self,
        groups: &[u32],
        by_load: bool,
        req: &AcquireRequest<'_>,
        exclude: &[KeyId],
        now: Now,
    ) -> Result<Pick, (Option<Duration>, u32)> {
        let mut cursors = std::mem::take(&mut self.cursors);
        cursors.clear();
        cursors.extend(groups.iter().map(|&g| (g, None)));
        let mut until: Option<Duration> = None;
        let mut nevers = 0;
        let result = loop {
            // The best next candidate over all groups.
            let mut best: Option<(usize, LoadKey)> = None;
            for (ci, &(g, after)) in cursors.iter().enumerate() {
                let ready = &self.groups[g as usize].ready;
                let next = if by_load {
                    ready.load_after(after)
                } else {
                    let after: Option<LruKey> = after.map(|k| (k.1, k.2));
                    ready.lru_after(after).map(|(s, i)| (0, s, i))
                };
                if let Some(k) = next {
                    if best.is_none_or(|(_, b)| k < b) {
                        best = Some((ci, k));
                    }
                }
            }
            let Some((ci, k)) = best else {
                break Err((until, nevers));
            };
            cursors[ci].1 = Some(k);
            let idx = k.2;
            match self.evaluate(idx, req, exclude, now) {
                Eval::Grant(ticket) => break Ok(self.grant(idx, ticket, false)),
                Eval::Skip { until: u, never } => {
                    note(&mut until, u);
                    nevers += u32::from(never);
                }
            }
        };
        self.cursors = cursors;
        result
    }

    /// Books an admission on the key.
    fn grant(&mut self, idx: u32, ticket: Ticket, probe: bool) -> Pick {
        self.seq += 1;
        let seq = self.seq;
        self.touch(idx, |e| {
            e.seq = seq;
            e.in_flight += 1;
        });
        if probe {
            self.keys[idx as usize].probing = true;
            self.detach(idx);
        }
        // Counters are booked when the call ends (see `release`): a grant
        // touches only what selection needs.
        Pick::Granted { idx, ticket, probe }
    }

    fn mark_dirty(&mut self, idx: u32) {
        let e = &mut self.keys[idx as usize];
        if !e.dirty {
            e.dirty = true;
            self.dirty.push(idx);
        }
    }

    // ----- outcomes ---------------------------------------------------------

    /// Ends one admission with what happened upstream (`None`: the permit
    /// was dropped without a report).
    pub(crate) fn release(
        &mut self,
        idx: u32,
        ticket: Ticket,
        model: u32,
        probe: bool,
        fate: Option<Fate>,
        now: Now,
    ) {
        self.touch(idx, |e| e.in_flight = e.in_flight.saturating_sub(1));
        let charged_day = ticket.day().max(0) as u64;
        let admitted = ticket.admitted();
        // Usage is reported by UTC day; spend counts against the provider's day.
        let day = now.utc_day();
        let at = FateAt {
            probe,
            model,
            day,
            now,
            reprobe: self.settings.keys.reprobe_interval,
            cooldown: self.settings.cooldown(),
            provider: &self.settings.provider,
        };
        let sent = !matches!(fate, Some(Fate::NotSent));
        let e = &mut self.keys[idx as usize];
        if probe {
            e.probing = false;
        }
        let Settled {
            refund,
            new_state,
            spent,
            daily_tokens,
        } = apply_fate(e, fate, ticket, &at);
        if sent {
            let used_ms = now.unix_ms_at(admitted);
            e.stats.requests += 1;
            e.stats.last_used_ms = e.stats.last_used_ms.max(Some(used_ms));
            e.pending.stats.requests += 1;
            e.pending.stats.last_used_ms = e.pending.stats.last_used_ms.max(Some(used_ms));
            e.daily(charged_day, 1, daily_tokens as i64);
            usage_slot(&mut e.pending.usage, day, model).requests += 1;
        }
        if spent > 0.0 {
            let spend_day = self
                .today
                .day(&self.settings.provider.daily_reset, now.unix_ms)
                .max(0) as u64;
            self.add_spend(spent, spend_day);
        }
        self.mark_dirty(idx);
        if refund {
            self.wake_account(idx, now);
        }
        self.replace_after_release(idx, new_state, refund, probe, now);
    }

    /// Moves the key after a release: to its new state, or back to where
    /// it can be picked when the release freed it.
    fn replace_after_release(
        &mut self,
        idx: u32,
        new_state: Option<KeyState>,
        refund: bool,
        probe: bool,
        now: Now,
    ) {
        match new_state {
            Some(state) => self.set_state(idx, state, now, true),
            None => {
                let e = &self.keys[idx as usize];
                let wake = match e.loc {
                    Loc::Waiting => true,
                    Loc::Parked(_) => refund && e.state == KeyState::Available,
                    Loc::Off => probe,
                    Loc::Ready | Loc::Probe => false,
                };
                if wake {
                    self.detach(idx);
                    self.place(idx, now);
                }
            }
        }
    }

    fn add_spend(&mut self, usd: f64, day: u64) {
        if self.spend_day != day {
            self.spend_day = day;
            self.spend_today = 0.0;
        }
        self.spend_today += usd;
        match self.spend.iter_mut().find(|s| s.day == day) {
            Some(s) => s.usd += usd,
            None => self.spend.push(SpendDelta {
                provider: self.name.clone(),
                day,
                usd,
            }),
        }
    }

    pub(crate) fn observe(&mut self, idx: u32, seen: &llmq_sdk::ObservedLimits, now: Now) {
        self.keys[idx as usize].limiter.observe(seen, now);
    }

    pub fn hold_back(&mut self, idx: u32, until: Duration) {
        self.keys[idx as usize].limiter.hold_back(until);
    }

    // ----- snapshots and persistence -----------------------------------------

    pub(crate) fn snapshot(&mut self, idx: u32, now: Now) -> KeySnapshot {
        let window = self.fallback_wait();
        let shape = self.settings.provider.limit_shape;
        let e = &mut self.keys[idx as usize];
        let usage = e.limiter.usage(now);
        let record = StateRecord::of(&e.state, now);
        KeySnapshot {
            id: e.key.id.clone(),
            provider: e.key.id.provider().to_string(),
            instance: e.key.id.instance(),
            masked: e.key.masked.clone(),
            source: e.key.source.clone(),
            weight: e.key.weight,
            models: e.key.models.clone(),
            account: e.key.account.clone(),
            status: record.status,
            reason: record.reason,
            cooldown_until_ms: record.until_ms,
            disabled_since_ms: record.since_ms,
            next_probe_ms: record.next_probe_ms,
            probing: e.probing,
            limits: usage.limits,
            max_concurrent: e.limiter.config().max_concurrent,
            window_ms: window.as_millis() as u64,
            shape,
            in_flight: usage.in_flight,
            window_requests: usage.window_requests,
            window_tokens: usage.window_tokens,
            day_requests: usage.day_requests,
            day_tokens: usage.day_tokens,
            upstream_blocked_until_ms: usage.upstream_blocked_until.map(|t| now.unix_ms_at(t)),
            stats: e.stats.clone(),
            parked_models: e
                .parks
                .iter()
                .filter(|p| p.until > now.mono)
                .map(|p| ParkedModel {
                    model: p.model.to_string(),
                    until_ms: now.unix_ms_at(p.until),
                    reason: p.reason.clone(),
                })
                .collect(),
        }
    }

    pub(crate) fn live_indexes(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.keys.len() as u32).filter(|&i| !self.keys[i as usize].retired)
    }

    /// Takes the unflushed counters.
    pub(crate) fn take_deltas(&mut self, keys: &mut Vec<KeyDelta>, spend: &mut Vec<SpendDelta>) {
        for idx in std::mem::take(&mut self.dirty) {
            let e = &mut self.keys[idx as usize];
            e.dirty = false;
            let p = std::mem::take(&mut e.pending);
            let names = &self.model_names;
            let mut daily = p.older;
            if p.today.requests != 0 || p.today.tokens != 0 {
                daily.push(p.today);
            }
            keys.push(KeyDelta {
                id: e.key.id.clone(),
                stats: p.stats,
                daily,
                usage: p
                    .usage
                    .into_iter()
                    .map(|(day, m, mut u)| {
                        u.day = day;
                        u.model = names.get(m as usize).cloned().unwrap_or_else(|| "".into());
                        u
                    })
                    .collect(),
            });
        }
        spend.append(&mut self.spend);
    }

    pub(crate) fn spend_today(&self, now: Now) -> f64 {
        if self.spend_day == provider_day(&self.settings, now) {
            self.spend_today
        } else {
            0.0
        }
    }

    /// Adds spend already recorded today (from storage).
    pub(crate) fn restore_spend(&mut self, usd: f64, now: Now) {
        let today = provider_day(&self.settings, now);
        if self.spend_day != today {
            self.spend_day = today;
            self.spend_today = 0.0;
        }
        self.spend_today += usd;
    }

    pub(crate) fn restore(&mut self, idx: u32, restored: Restored, now: Now) {
        if let Some(stats) = restored.stats {
            let e = &mut self.keys[idx as usize];
            e.stats.add(&stats);
        }
        if let Some((requests, tokens)) = restored.daily {
            self.keys[idx as usize]
                .limiter
                .restore_daily(now, requests, tokens);
        }
        // A state set in this run (the restore may come late, after Redis
        // was unreachable at start) is fresher than the stored one.
        if let Some(record) = restored.state {
            if self.keys[idx as usize].state == KeyState::Available {
                let state = record.to_state(now);
                self.set_state(idx, state, now, false);
            }
        }
    }
}

/// Where and when a fate is applied (see [`apply_fate`]).
struct FateAt<'a> {
    probe: bool,
    model: u32,
    /// The UTC day usage is reported under.
    day: u64,
    now: Now,
    reprobe: Duration,
    cooldown: Duration,
    provider: &'a ProviderConfig,
}

/// What a fate did to the entry that the pool must still act on.
struct Settled {
    /// The key may admit more now (fewer tokens than charged, or none).
    refund: bool,
    new_state: Option<KeyState>,
    /// USD spent by the call.
    spent: f64,
    /// Tokens the day is charged: the real usage when known, else the estimate.
    daily_tokens: u64,
}

/// Settles the limiter ticket and counts the outcome of one call on its
/// key's entry; says which state the key moves to.
fn apply_fate(e: &mut Entry, fate: Option<Fate>, ticket: Ticket, at: &FateAt<'_>) -> Settled {
    let FateAt {
        probe,
        now,
        reprobe,
        cooldown,
        provider: provider_cfg,
        ..
    } = *at;
    let charged = ticket.tokens();
    let mut refund = false;
    let mut new_state = None;
    // A call that was in flight when the key got disabled (by another
    // call or the operator) does not change that state; only the probe does.
    let settled = !probe && matches!(e.state, KeyState::Disabled { .. });
    match fate {
        Some(Fate::Success {
            usage_in,
            usage_out,
            cost_usd,
        }) => return succeeded(e, ticket, (usage_in, usage_out, cost_usd), at),
        Some(Fate::RateLimited { retry_after }) => {
            e.limiter.complete(ticket, now, None);
            e.stats.rate_limited += 1;
            e.pending.stats.rate_limited += 1;
            count_failure(e, "rate_limited");
            let mut until = now.mono + retry_after.unwrap_or(cooldown);
            if let KeyState::CoolingDown { until: u } = e.state {
                until = until.max(u);
            }
            if !settled && e.state != (KeyState::CoolingDown { until }) {
                new_state = Some(KeyState::CoolingDown { until });
            }
        }
        Some(Fate::Disabled { reason }) => {
            e.limiter.complete(ticket, now, None);
            count_failure(e, &reason);
            if !settled {
                new_state = Some(KeyState::Disabled {
                    reason,
                    since_ms: now.unix_ms,
                    next_probe: Some(now.mono + reprobe),
                });
            }
        }
        Some(Fate::QuotaExhausted { reason, reset }) => {
            e.limiter.complete(ticket, now, None);
            count_failure(e, QUOTA_EXHAUSTED);
            if !settled {
                // Re-probed when the quota comes back, if the provider
                // said when; else on the usual schedule.
                let next_probe = reset
                    .map(|r| resolve_reset(&r, provider_cfg, now))
                    .unwrap_or(now.mono + reprobe);
                new_state = Some(KeyState::Disabled {
                    reason,
                    since_ms: now.unix_ms,
                    next_probe: Some(next_probe),
                });
            }
        }
        Some(Fate::ModelQuota {
            model: quota_model,
            reason,
            reset,
        }) => {
            e.limiter.complete(ticket, now, None);
            count_failure(e, QUOTA_EXHAUSTED);
            let until = reset
                .map(|r| resolve_reset(&r, provider_cfg, now))
                .unwrap_or(now.mono + reprobe);
            e.park(&quota_model, until, reason, now);
            // The key answered: it is fine for its other models.
            if probe {
                new_state = Some(KeyState::Available);
            }
        }
        Some(Fate::Transient) => {
            e.limiter.complete(ticket, now, None);
            count_failure(e, "transient");
            if let (
                true,
                KeyState::Disabled {
                    reason, since_ms, ..
                },
            ) = (probe, &e.state)
            {
                // Inconclusive probe: try again after a cooldown.
                new_state = Some(KeyState::Disabled {
                    reason: reason.clone(),
                    since_ms: *since_ms,
                    next_probe: Some(now.mono + reprobe.min(cooldown)),
                });
            }
        }
        Some(Fate::Untouched) => {
            e.limiter.complete(ticket, now, None);
            count_failure(e, "untouched");
            if probe {
                new_state = Some(KeyState::Available);
            }
        }
        Some(Fate::NotSent) => {
            e.limiter.cancel(ticket, now);
            refund = true;
        }
        None => {
            e.limiter.complete(ticket, now, None);
            count_failure(e, "dropped");
        }
    }
    Settled {
        refund,
        new_state,
        spent: 0.0,
        daily_tokens: charged,
    }
}

/// [`apply_fate`] for a call that succeeded: the day is charged the real
/// usage, the counters grow and a probe brings the key back.
/// [`apply_fate`] for a call that succeeded: the counters grow, the day is
/// charged the real usage and a probe brings the key back.
fn succeeded(
    e: &mut Entry,
    ticket: Ticket,
    (usage_in, usage_out, cost_usd): (u64, u64, f64),
    at: &FateAt<'_>,
) -> Settled {
    let FateAt {
        probe,
        model,
        day,
        now,
        ..
    } = *at;
    let charged = ticket.tokens();
    let actual = usage_in + usage_out;
    e.limiter.complete(ticket, now, Some(actual));
    e.stats.successes += 1;
    e.stats.tokens_in += usage_in;
    e.stats.tokens_out += usage_out;
    e.stats.cost_usd += cost_usd;
    let p = &mut e.pending.stats;
    p.successes += 1;
    p.tokens_in += usage_in;
    p.tokens_out += usage_out;
    p.cost_usd += cost_usd;
    let u = usage_slot(&mut e.pending.usage, day, model);
    u.tokens_in += usage_in;
    u.tokens_out += usage_out;
    u.cost_usd += cost_usd;
    Settled {
        refund: actual < charged,
        new_state: probe.then_some(KeyState::Available),
        spent: cost_usd,
        // The day is charged the real usage instead of the estimate.
        daily_tokens: actual,
    }
}

/// Clock time of a quota's reset.
fn resolve_reset(reset: &QuotaReset, provider: &ProviderConfig, now: Now) -> Duration {
    match reset {
        QuotaReset::At { unix_ms } => now.mono_at(*unix_ms),
        QuotaReset::NextDaily => next_daily_reset(provider, now),
    }
}

fn note(until: &mut Option<Duration>, t: Option<Duration>) {
    if let Some(t) = t {
        *until = Some(until.map_or(t, |u| u.min(t)));
    }
}

fn count_failure(e: &mut Entry, kind: &str) {
    e.stats.failures += 1;
    *e.stats
        .failures_by_kind
        .entry(kind.to_string())
        .or_default() += 1;
    e.pending.stats.failures += 1;
    *e.pending
        .stats
        .failures_by_kind
        .entry(kind.to_string())
        .or_default() += 1;
}

/// The usage counters of `(day, model)` in a key's pending list.
fn usage_slot(list: &mut Vec<(u64, u32, UsageDelta)>, day: u64, model: u32) -> &mut UsageDelta {
    let pos = match list.iter().position(|u| u.0 == day && u.1 == model) {
        Some(p) => p,
        None => {
            list.push((day, model, UsageDelta::default()));
            list.len() - 1
        }
    };
    &mut list[pos].2
}

/// The provider's day (see `daily_reset`) at `now`, as stored.
fn provider_day(settings: &Settings, now: Now) -> u64 {
    settings.provider.daily_reset.day_of(now.unix_ms).max(0) as u64
}

#[cfg(test)]
impl ProviderState {
    /// Panics unless every key is in exactly the place its `loc` says and
    /// the group counters agree.
    pub(crate) fn check_invariants(&self) {
        for (gi, g) in self.groups.iter().enumerate() {
            let members: Vec<u32> = g
                .members
                .iter()
                .copied()
                .filter(|&i| i != u32::MAX && self.keys[i as usize].group == gi as u32)
                .collect();
            let (mut ready, mut parked, mut waiting, mut probes, mut live) = (0, 0, 0, 0, 0);
            for &idx in &members {
                let e = &self.keys[idx as usize];
                assert_eq!(g.members[e.gpos as usize], idx);
                live += u32::from(Self::is_live(e));
                assert_eq!(e.counted_live, Self::is_live(e), "key {idx}");
                match e.loc {
                    Loc::Ready => {
                        ready += 1;
                        assert!(g.ready.lru_contains((e.seq, idx)), "key {idx} ready");
                        assert!(!matches!(e.state, KeyState::Disabled { .. }), "key {idx}");
                        assert!(!e.retired);
                    }
                    Loc::Parked(t) => {
                        parked += 1;
                        assert!(g.parked.contains(&(t, idx)), "key {idx} parked");
                    }
                    Loc::Waiting => waiting += 1,
                    Loc::Probe => {
                        probes += 1;
                        assert!(g.probes.contains(&idx));
                        assert!(matches!(e.state, KeyState::Disabled { .. }) && !e.probing);
                    }
                    Loc::Off => {}
                }
            }
            assert_eq!(g.ready.len(), ready, "group {gi} ready count");
            assert_eq!(g.parked.len(), parked, "group {gi} parked count");
            assert_eq!(g.waiting, waiting, "group {gi} waiting count");
            assert_eq!(g.probes.len(), probes, "group {gi} probe count");
            assert_eq!(g.live, live, "group {gi} live count");
        }
    }

    /// Brute force: could any key serve this request right now?
    pub(crate) fn could_serve(&mut self, req: &AcquireRequest<'_>, now: Now) -> bool {
        self.keys.iter_mut().any(|e| {
            let state_ok = match &e.state {
                KeyState::Available => true,
                KeyState::CoolingDown { until } => *until <= now.mono,
                KeyState::Disabled { next_probe, .. } => {
                    !e.probing && next_probe.is_some_and(|t| t <= now.mono)
                }
            };
            !e.retired
                && state_ok
                && e.key.serves_model(req.model)
                && e.parked_until(req.model, now).is_none()
                && e.limiter.check(now, req.tokens).is_ok()
        })
    }
}
