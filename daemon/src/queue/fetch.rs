//! The fetcher: reads stream entries in strict lane priority, reclaims
//! entries of dead consumers, checks a whole batch for idempotency in one
//! pipeline, dead-letters what cannot run, and hands the rest to the apalis
//! worker. It never fetches more entries than there are free concurrency
//! permits, so a high-lane job waits behind at most one batch.

use super::backend::{local_attempt, Delivery, EntryInfo};
use super::keys::{entry_ms, inflight_key, result_key, GROUP};
use super::writer::{dead_record, Action, ResultWrite, Write};
use super::{
    sleep_or_stop, stopped, unix_ms, JobContext, OutageBackoff, QueueError, Shared, BLOCK_MAX,
    FETCH_BATCH,
};
use crate::job::{parse_job_with, Attempt, FailureKind, Job, JobResult};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// One stream entry as read, before any judgement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawEntry {
    pub lane: usize,
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// The entry's delivery counter (1 on a first read).
    pub deliveries: u32,
}

/// A parsed job waiting for its idempotency check.
struct Candidate {
    lane: usize,
    entry_id: String,
    job: Job,
    body: String,
    id_in_body: bool,
    attempt: u32,
    deliveries: u32,
    enqueued_ms: u64,
    history: Vec<Attempt>,
}

enum Prepared {
    Job(Box<Candidate>),
    Write(Write),
}

pub(crate) struct Fetcher {
    shared: Arc<Shared>,
    conn: ConnectionManager,
    /// Only for `XREADGROUP … BLOCK`, which would stall a multiplexed connection.
    blocking: ConnectionManager,
    permits: Arc<Semaphore>,
    out: mpsc::UnboundedSender<Delivery>,
    writes: mpsc::UnboundedSender<Write>,
    stop: watch::Receiver<bool>,
    cursors: Vec<String>,
    reclaim_every: Duration,
    next_reclaim: Instant,
}

impl Fetcher {
    pub(crate) fn new(
        shared: Arc<Shared>,
        permits: Arc<Semaphore>,
        out: mpsc::UnboundedSender<Delivery>,
        writes: mpsc::UnboundedSender<Write>,
        stop: watch::Receiver<bool>,
    ) -> Result<Fetcher, QueueError> {
        let blocking = ConnectionManager::new_lazy_with_config(
            shared.client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(BLOCK_MAX + Duration::from_secs(5)))
                .set_max_delay(Duration::from_secs(5)),
        )?;
        let reclaim_every = (shared.cfg.visibility_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(10));
        Ok(Fetcher {
            conn: shared.conn.clone(),
            cursors: vec!["0-0".to_string(); shared.lanes.len()],
            shared,
            blocking,
            permits,
            out,
            writes,
            stop,
            reclaim_every,
            next_reclaim: Instant::now(),
        })
    }

    /// Fetches until stopped; Redis errors are logged and retried with backoff.
    pub(crate) async fn run(mut self) {
        let mut backoff = OutageBackoff::new();
        let mut groups_ready = false;
        loop {
            if *self.stop.borrow() {
                break;
            }
            if !groups_ready {
                match ensure_groups(&self.shared, &mut self.conn).await {
                    Ok(()) => groups_ready = true,
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?wait, "queue: cannot reach Redis to create consumer groups");
                        if sleep_or_stop(wait, &mut self.stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            match self.step().await {
                Ok(true) => backoff.reset(),
                Ok(false) => break,
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        groups_ready = false;
                    }
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "queue: cannot fetch jobs");
                    if sleep_or_stop(wait, &mut self.stop).await {
                        break;
                    }
                }
            }
        }
        tracing::debug!("queue: fetcher stopped");
    }

    /// One fetch cycle. `Ok(false)` means stop.
    async fn step(&mut self) -> RedisResult<bool> {
        let Some(mut permits) = self.acquire().await else {
            return Ok(false);
        };
        let mut raw = Vec::new();
        if Instant::now() >= self.next_reclaim {
            raw = self.reclaim(permits.len()).await?;
            self.next_reclaim = Instant::now() + self.reclaim_every;
        }
        if raw.len() < permits.len() {
            match self.fetch(permits.len() - raw.len()).await {
                Ok(more) => raw.extend(more),
                // Reclaimed entries are ours now: run them anyway.
                Err(e) if !raw.is_empty() => {
                    tracing::warn!(error = %e, "queue: cannot fetch jobs");
                }
                Err(e) => return Err(e),
            }
        }
        if raw.is_empty() {
            let block = self
                .next_reclaim
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(10), BLOCK_MAX);
            let mut stop = self.stop.clone();
            let count = permits.len();
            raw = tokio::select! {
                r = self.block_read(count, block) => r?,
                _ = stopped(&mut stop) => return Ok(false),
            };
            if raw.is_empty() {
                return Ok(true);
            }
        }
        // A blocking read may return several lanes at once: highest first.
        raw.sort_by_key(|r| r.lane);
        while permits.len() < raw.len() {
            let mut stop = self.stop.clone();
            let p = tokio::select! {
                p = self.permits.clone().acquire_owned() => p,
                _ = stopped(&mut stop) => return Ok(false),
            };
            match p {
                Ok(p) => permits.push(p),
                Err(_) => return Ok(false),
            }
        }
        permits.truncate(raw.len());
        Ok(self.dispatch(raw, permits).await)
    }

    /// Waits for at least one free slot, then takes up to a batch of them.
    async fn acquire(&mut self) -> Option<Vec<OwnedSemaphorePermit>> {
        let mut stop = self.stop.clone();
        let first = tokio::select! {
            p = self.permits.clone().acquire_owned() => p.ok()?,
            _ = stopped(&mut stop) => return None,
        };
        let mut v = Vec::with_capacity(FETCH_BATCH);
        v.push(first);
        self.take_more(&mut v);
        // Under full load slots come back one by one: gather a few more
        // rather than paying a round trip per job.
        let target = FETCH_BATCH.min(self.shared.cfg.concurrency) / 4;
        if v.len() < target {
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.take_more(&mut v);
        }
        Some(v)
    }

    fn take_more(&self, v: &mut Vec<OwnedSemaphorePermit>) {
        while v.len() < FETCH_BATCH {
            match self.permits.clone().try_acquire_owned() {
                Ok(p) => v.push(p),
                Err(_) => break,
            }
        }
    }

    /// Non-blocking strict-priority read of up to `count` new entries.
    async fn fetch(&mut self, count: usize) -> RedisResult<Vec<RawEntry>> {
        let mut inv = self.shared.scripts.fetch.prepare_invoke();
        for l in &self.shared.lanes {
            inv.key(&l.key);
        }
        inv.arg(GROUP).arg(&self.shared.consumer).arg(count);
        let v: Value = inv.invoke_async(&mut self.conn).await?;
        Ok(parse_script_entries(v, self.shared.lanes.len(), false))
    }

    /// Claims entries idle longer than the visibility timeout.
    async fn reclaim(&mut self, count: usize) -> RedisResult<Vec<RawEntry>> {
        let mut inv = self.shared.scripts.reclaim.prepare_invoke();
        for l in &self.shared.lanes {
            inv.key(&l.key);
        }
        inv.arg(GROUP)
            .arg(&self.shared.consumer)
            .arg(self.shared.cfg.visibility_timeout.as_millis() as u64)
            .arg(count);
        for c in &self.cursors {
            inv.arg(c);
        }
        let v: Value = inv.invoke_async(&mut self.conn).await?;
        let Value::Array(mut parts) = v else {
            return Ok(vec![]);
        };
        if parts.len() != 2 {
            return Ok(vec![]);
        }
        let entries = parts.pop().unwrap_or(Value::Nil);
        if let Some(Value::Array(cursors)) = parts.pop() {
            for (slot, c) in self.cursors.iter_mut().zip(cursors) {
                if let Some(c) = value_string(&c) {
                    *slot = c;
                }
            }
        }
        let raw = parse_script_entries(entries, self.shared.lanes.len(), true);
        if !raw.is_empty() {
            tracing::info!(
                entries = raw.len(),
                "queue: reclaimed jobs abandoned by a dead or stalled consumer"
            );
        }
        Ok(raw)
    }

    /// `XREADGROUP … BLOCK` over every lane: only called when all are empty.
    async fn block_read(&mut self, count: usize, block: Duration) -> RedisResult<Vec<RawEntry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.shared.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS");
        for l in &self.shared.lanes {
            cmd.arg(&l.key);
        }
        for _ in &self.shared.lanes {
            cmd.arg(">");
        }
        let v: Value = cmd.query_async(&mut self.blocking).await?;
        Ok(parse_xread(v, &self.shared))
    }

    /// Judges a batch and hands runnable jobs to the worker. False = stop.
    async fn dispatch(&mut self, raw: Vec<RawEntry>, permits: Vec<OwnedSemaphorePermit>) -> bool {
        let now = unix_ms();
        let mut cands: Vec<(Candidate, OwnedSemaphorePermit)> = Vec::with_capacity(raw.len());
        for (r, permit) in raw.into_iter().zip(permits) {
            match prepare(&self.shared, r, now) {
                Prepared::Job(c) => cands.push((*c, permit)),
                Prepared::Write(w) => {
                    let _ = self.writes.send(w);
                }
            }
        }
        if cands.is_empty() {
            return true;
        }
        let Some(checks) = self.check(&cands).await else {
            return false;
        };
        let max = self.shared.cfg.max_attempts;
        let mut takeovers = Vec::new();
        for ((c, permit), (exists, holder)) in cands.into_iter().zip(checks) {
            let mine = self.shared.inflight_value(c.lane, &c.entry_id);
            let held_by_me = holder.as_deref() == Some(mine.as_str());
            if exists {
                tracing::debug!(job = %c.job.id, "queue: result exists; acking without running");
                let _ = self.writes.send(Write {
                    lane: c.lane,
                    entry_id: c.entry_id,
                    release: held_by_me.then(|| c.job.id.clone()),
                    action: Action::Ack,
                });
                continue;
            }
            if !held_by_me {
                let suffix = format!("|{}|{}", self.shared.lanes[c.lane].name, c.entry_id);
                let same_entry = holder.as_deref().is_none_or(|h| h.ends_with(&suffix));
                if !same_entry {
                    tracing::debug!(job = %c.job.id, "queue: job id already running from another entry; acking this duplicate");
                    let _ = self.writes.send(Write {
                        lane: c.lane,
                        entry_id: c.entry_id,
                        release: None,
                        action: Action::Ack,
                    });
                    continue;
                }
                // A re-delivery of the same entry (reclaimed after a crash).
                takeovers.push((c.job.id.clone(), mine));
            }
            if c.attempt > max {
                let _ = self.writes.send(crash_exhausted(&self.shared, c));
                continue;
            }
            if !self.deliver(c, permit) {
                return false;
            }
        }
        if !takeovers.is_empty() {
            let ttl = self.shared.cfg.visibility_timeout.as_millis() as u64;
            let mut p = redis::pipe();
            for (id, value) in &takeovers {
                p.cmd("SET")
                    .arg(inflight_key(id))
                    .arg(value)
                    .arg("PX")
                    .arg(ttl)
                    .ignore();
            }
            if let Err(e) = p.query_async::<()>(&mut self.conn).await {
                tracing::warn!(error = %e, "queue: cannot take over in-flight markers");
            }
        }
        true
    }

    /// Per job: does a result exist, and who holds the in-flight marker
    /// (after trying to take it). One pipeline for the batch, retried until
    /// it goes through: these entries are ours now. `None` = stopped.
    async fn check(
        &mut self,
        cands: &[(Candidate, OwnedSemaphorePermit)],
    ) -> Option<Vec<(bool, Option<String>)>> {
        let ttl = self.shared.cfg.visibility_timeout.as_millis() as u64;
        let mut p = redis::pipe();
        for (c, _) in cands {
            let key = inflight_key(&c.job.id);
            p.cmd("EXISTS").arg(result_key(&c.job.id));
            p.cmd("SET")
                .arg(&key)
                .arg(self.shared.inflight_value(c.lane, &c.entry_id))
                .arg("NX")
                .arg("PX")
                .arg(ttl)
                .ignore();
            p.cmd("GET").arg(&key);
        }
        let mut backoff = OutageBackoff::new();
        loop {
            match p.query_async::<Vec<Value>>(&mut self.conn).await {
                Ok(v) if v.len() == 2 * cands.len() => {
                    return Some(
                        v.chunks(2)
                            .map(|pair| {
                                let exists = matches!(pair[0], Value::Int(n) if n > 0);
                                (exists, value_string(&pair[1]))
                            })
                            .collect(),
                    );
                }
                Ok(v) => {
                    tracing::warn!(
                        got = v.len(),
                        "queue: unexpected reply to the idempotency checks; retrying"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "queue: idempotency checks failed; retrying"),
            }
            if sleep_or_stop(backoff.next_delay(), &mut self.stop).await {
                return None;
            }
        }
    }

    fn deliver(&self, c: Candidate, permit: OwnedSemaphorePermit) -> bool {
        let now = unix_ms();
        let ctx = JobContext {
            lane: self.shared.lanes[c.lane].name.clone(),
            attempt: c.attempt,
            max_attempts: self.shared.cfg.max_attempts,
            enqueued_unix_ms: c.enqueued_ms,
            queued_ms: now.saturating_sub(c.enqueued_ms),
            entry_id: c.entry_id,
            previous_attempts: c.history,
        };
        let entry = EntryInfo {
            lane: c.lane,
            body: c.body,
            id_in_body: c.id_in_body,
            metadata: c.job.metadata.clone(),
        };
        self.shared.track(c.lane, &ctx.entry_id, &c.job.id);
        let (lane, entry_id) = (c.lane, ctx.entry_id.clone());
        let d = Delivery {
            job: c.job,
            ctx,
            entry,
            permit,
        };
        if self.out.send(d).is_err() {
            self.shared.untrack(lane, &entry_id);
            return false;
        }
        true
    }
}

/// Creates the consumer group on every lane (from id 0, with MKSTREAM).
async fn ensure_groups(shared: &Shared, conn: &mut ConnectionManager) -> RedisResult<()> {
    for l in &shared.lanes {
        let r: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&l.key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match r {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A dead letter for a job whose deliveries (crashes included) used up its attempts.
fn crash_exhausted(shared: &Shared, c: Candidate) -> Write {
    let crashes = c.deliveries.saturating_sub(1);
    let reason = format!(
        "crashed/timed out {crashes} times ({} attempts used of max_attempts {})",
        c.attempt.saturating_sub(1),
        shared.cfg.max_attempts
    );
    let lane = &shared.lanes[c.lane].name;
    let mut r = JobResult::failure(&c.job.id, FailureKind::Exhausted, &reason);
    r.attempts = c.history;
    r.metadata = c.job.metadata.clone();
    r.queued_ms = unix_ms().saturating_sub(c.enqueued_ms);
    tracing::warn!(job = %c.job.id, %reason, "queue: dead-lettering job");
    Write {
        lane: c.lane,
        entry_id: c.entry_id,
        release: Some(c.job.id.clone()),
        action: Action::Dead {
            field: c.job.id.clone(),
            record: dead_record(
                &reason,
                c.body.as_bytes(),
                shared.cfg.dead_body_bytes,
                lane,
                c.attempt,
            ),
            result: Some(ResultWrite::new(&r)),
        },
    }
}

/// Reads an entry's fields and its job; malformed entries become dead letters.
fn prepare(shared: &Shared, r: RawEntry, now_ms: u64) -> Prepared {
    let lane_name = shared.lanes[r.lane].name.as_str();
    let mut body: Option<Vec<u8>> = None;
    let mut carried: u32 = 0;
    let mut enqueued: Option<u64> = None;
    let mut history: Vec<Attempt> = Vec::new();
    let mut other_fields = serde_json::Map::new();
    for (f, v) in r.fields {
        match f.as_slice() {
            b"job" => body = Some(v),
            b"attempts" => carried = parse_num(&v).unwrap_or(0) as u32,
            b"enqueued_ms" => enqueued = parse_num(&v),
            b"history" => match serde_json::from_slice::<Vec<Attempt>>(&v) {
                Ok(h) => history = h,
                Err(e) => {
                    tracing::warn!(entry = %r.id, error = %e, "queue: unreadable attempt history; dropped")
                }
            },
            _ => {
                other_fields.insert(
                    String::from_utf8_lossy(&f).into_owned(),
                    serde_json::Value::String(String::from_utf8_lossy(&v).into_owned()),
                );
            }
        }
    }
    let attempt = carried.saturating_add(r.deliveries);
    let enqueued_ms = enqueued.or_else(|| entry_ms(&r.id)).unwrap_or(now_ms);
    let Some(body) = body else {
        let reason = "stream entry has no `job` field".to_string();
        tracing::warn!(entry = %r.id, lane = lane_name, "queue: dead-lettering an entry without a `job` field");
        let shown = serde_json::Value::Object(other_fields).to_string();
        return Prepared::Write(Write {
            lane: r.lane,
            action: Action::Dead {
                field: r.id.clone(),
                record: dead_record(
                    &reason,
                    shown.as_bytes(),
                    shared.cfg.dead_body_bytes,
                    lane_name,
                    attempt,
                ),
                result: None,
            },
            entry_id: r.id,
            release: None,
        });
    };
    match parse_job_with(&body, &shared.cfg.job_limits()) {
        Err((e, id)) => {
            let reason = e.to_string();
            tracing::warn!(entry = %r.id, lane = lane_name, %reason, "queue: dead-lettering a malformed job");
            let result = id.as_deref().map(|id| {
                let mut res = JobResult::failure(id, FailureKind::InvalidJob, &reason);
                res.queued_ms = now_ms.saturating_sub(enqueued_ms);
                ResultWrite::new(&res)
            });
            Prepared::Write(Write {
                lane: r.lane,
                action: Action::Dead {
                    field: id.unwrap_or_else(|| r.id.clone()),
                    record: dead_record(
                        &reason,
                        &body,
                        shared.cfg.dead_body_bytes,
                        lane_name,
                        attempt,
                    ),
                    result,
                },
                entry_id: r.id,
                release: None,
            })
        }
        Ok(mut job) => {
            let id_in_body = body_has_id(&body);
            if !id_in_body {
                // Stable across re-deliveries, so idempotency still holds.
                job.id = derived_id(lane_name, &r.id);
            }
            for _ in 1..r.deliveries {
                history.push(local_attempt("crashed"));
            }
            Prepared::Job(Box::new(Candidate {
                lane: r.lane,
                entry_id: r.id,
                job,
                body: String::from_utf8_lossy(&body).into_owned(),
                id_in_body,
                attempt,
                deliveries: r.deliveries,
                enqueued_ms,
                history,
            }))
        }
    }
}

fn parse_num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// True when the job JSON names an `id` itself.
fn body_has_id(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct IdProbe {
        #[serde(default)]
        id: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<IdProbe>(body)
        .map(|p| p.id.is_some())
        .unwrap_or(false)
}

/// A ULID for a job that came without an id, derived from its stream entry
/// (time = the entry's ms; randomness = a hash of lane and entry id).
pub(crate) fn derived_id(lane: &str, entry_id: &str) -> String {
    fn fnv1a(seed: u64, parts: &[&str]) -> u64 {
        let mut h = seed;
        for p in parts {
            for b in p.bytes().chain(std::iter::once(0xff)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
    let hi = fnv1a(0xcbf2_9ce4_8422_2325, &[lane, entry_id]);
    let lo = fnv1a(0x8422_2325_cbf2_9ce4, &[entry_id, lane]);
    let random = (u128::from(hi) << 64 | u128::from(lo)) & ((1u128 << 80) - 1);
    let ms = entry_ms(entry_id).unwrap_or(0) & ((1u64 << 48) - 1);
    ulid::Ulid::from_parts(ms, random).to_string()
}

fn value_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn value_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

fn value_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => value_string(other)?.parse().ok(),
    }
}

/// `[field, value, field, value, …]` (or a RESP3 map).
fn parse_fields(v: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    match v {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(f), Some(val)) = (it.next(), it.next()) {
                if let (Some(f), Some(val)) = (value_bytes(f), value_bytes(val)) {
                    out.push((f, val));
                }
            }
            out
        }
        Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(f, v)| Some((value_bytes(f)?, value_bytes(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Entries from our scripts: `[[lane(1-based), id, fields(, deliveries)], …]`.
pub(crate) fn parse_script_entries(v: Value, lanes: usize, with_count: bool) -> Vec<RawEntry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(parts) = item else { continue };
        let mut it = parts.into_iter();
        let (Some(lane), Some(id), Some(fields)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let deliveries = if with_count {
            it.next().and_then(|c| value_int(&c)).unwrap_or(1)
        } else {
            1
        };
        let (Some(lane), Some(id)) = (value_int(&lane), value_string(&id)) else {
            continue;
        };
        if lane < 1 || lane as usize > lanes {
            continue;
        }
        out.push(RawEntry {
            lane: lane as usize - 1,
            id,
            fields: parse_fields(fields),
            deliveries: deliveries.clamp(1, i64::from(u32::MAX)) as u32,
        });
    }
    out
}

/// An `XREADGROUP` reply: `[[stream, [[id, fields], …]], …]` or nil.
fn parse_xread(v: Value, shared: &Shared) -> Vec<RawEntry> {
    let streams: Vec<(Value, Value)> = match v {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => {
                    let mut it = kv.into_iter();
                    Some((it.next()?, it.next()?))
                }
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs,
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for (key, entries) in streams {
        let Some(key) = value_string(&key) else {
            continue;
        };
        let Some(lane) = shared.lanes.iter().position(|l| l.key == key) else {
            continue;
        };
        let Value::Array(entries) = entries else {
            continue;
        };
        for e in entries {
            let Value::Array(parts) = e else { continue };
            let mut it = parts.into_iter();
            let (Some(id), Some(fields)) = (it.next(), it.next()) else {
                continue;
            };
            let Some(id) = value_string(&id) else {
                continue;
            };
            out.push(RawEntry {
                lane,
                id,
                fields: parse_fields(fields),
                deliveries: 1,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn script_entries_are_read_with_lane_and_counter() {
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(2),
                bulk("5-0"),
                Value::Array(vec![bulk("job"), bulk("{}"), bulk("attempts"), bulk("1")]),
                Value::Int(3),
            ]),
            // Lane out of range: ignored.
            Value::Array(vec![Value::Int(9), bulk("6-0"), Value::Array(vec![])]),
        ]);
        let got = parse_script_entries(v, 3, true);
        assert_eq!(
            got,
            vec![RawEntry {
                lane: 1,
                id: "5-0".into(),
                fields: vec![
                    (b"job".to_vec(), b"{}".to_vec()),
                    (b"attempts".to_vec(), b"1".to_vec())
                ],
                deliveries: 3,
            }]
        );
    }

    #[test]
    fn derived_ids_are_stable_valid_ulids_per_entry() {
        let a = derived_id("normal", "1700000000000-0");
        assert_eq!(a, derived_id("normal", "1700000000000-0"));
        assert_ne!(a, derived_id("high", "1700000000000-0"));
        assert_ne!(a, derived_id("normal", "1700000000000-1"));
        let u: ulid::Ulid = a.parse().unwrap();
        assert_eq!(u.timestamp_ms(), 1_700_000_000_000);
        assert!(crate::job::valid_id(&a));
    }

    #[test]
    fn id_probe_sees_only_a_top_level_id() {
        assert!(body_has_id(br#"{"id":"x","messages":[]}"#));
        assert!(!body_has_id(
            br#"{"messages":[],"metadata":{"id":"inner"}}"#
        ));
    }
}
