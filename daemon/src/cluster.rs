//! Membership: which `llmq serve` daemons share this Redis right now.
//!
//! | key | type | content |
//! |---|---|---|
//! | `llmq:{cluster}:daemons` | hash | consumer name → JSON [`Member`] (`consumer`, `host`, `pid`, `started_ms`, `version`, `last_seen_ms`) |
//! | `llmq:{cluster}:alive:<consumer>` | string | `1`, `PX` 3 × `cluster.heartbeat` |
//!
//! Each daemon re-writes both every `cluster.heartbeat` (1 s) and removes
//! them when it stops. A daemon that dies stops renewing its `alive` key,
//! so it drops out of [`list`] after three missed beats (and [`list`] then
//! deletes its hash entry). Its unacknowledged jobs are reclaimed by the
//! others (`XAUTOCLAIM` after `queue.visibility_timeout`, see `queue`).
//!
//! [`Node`] is what `llmq serve` runs: this heartbeat plus the gate's key
//! events listener (see `global`). `GET /v1/cluster` and `llmq cluster` (in `commands`) read
//! [`list`]. All keys share the `{cluster}` hash tag (one Cluster slot).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::global::GlobalGate;
use crate::pool::KeyPool;
use redis::aio::{ConnectionLike, ConnectionManager};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The member list.
pub const DAEMONS_KEY: &str = "llmq:{cluster}:daemons";

/// A member's liveness key.
pub fn alive_key(consumer: &str) -> String {
    format!("llmq:{{cluster}}:alive:{consumer}")
}

/// One running daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its consumer name in the `llmq` group (`host-pid-ulid`).
    pub consumer: String,
    pub host: String,
    pub pid: u32,
    /// Unix ms.
    pub started_ms: u64,
    pub version: String,
    /// Unix ms of its last heartbeat (its own clock).
    pub last_seen_ms: u64,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// This daemon's entry and its heartbeat.
pub struct Membership {
    conn: ConnectionManager,
    me: Member,
    heartbeat: Duration,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("me", &self.me)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

impl Membership {
    pub fn new(conn: ConnectionManager, consumer: &str, heartbeat: Duration) -> Membership {
        Membership {
            conn,
            me: Member {
                consumer: consumer.to_string(),
                host: hostname(),
                pid: std::process::id(),
                started_ms: crate::clock::unix_ms_now(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                last_seen_ms: 0,
            },
            heartbeat: heartbeat.max(Duration::from_millis(10)),
        }
    }

    /// How long an entry lives without a heartbeat.
    pub(crate) fn ttl(&self) -> Duration {
        self.heartbeat * 3
    }

    /// Writes this daemon's entry and renews its liveness key.
    pub async fn beat(&self) -> Result<()> {
        let me = Member {
            last_seen_ms: crate::clock::unix_ms_now(),
            ..self.me.clone()
        };
        let json = serde_json::to_string(&me).map_err(|e| Error::Other(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(DAEMONS_KEY)
            .arg(&me.consumer)
            .arg(json)
            .ignore()
            .cmd("SET")
            .arg(alive_key(&me.consumer))
            .arg(1)
            .arg("PX")
            .arg(self.ttl().as_millis() as u64)
            .ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Removes this daemon's entry (a clean stop).
    pub async fn leave(&self) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HDEL")
            .arg(DAEMONS_KEY)
            .arg(&self.me.consumer)
            .ignore()
            .cmd("DEL")
            .arg(alive_key(&self.me.consumer))
            .ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Beats every `heartbeat` until `stop`, then leaves. Each beat also
    /// sweeps the list; a dead daemon this one removes has its gate slots
    /// reaped (`reaper`: the gate and the pool's keys). Redis errors are
    /// logged (once per outage) and retried on the next beat.
    pub(crate) fn spawn(
        self: Arc<Self>,
        reaper: Option<(Arc<GlobalGate>, KeyPool)>,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match self.beat().await {
                            Ok(()) => {
                                failing = false;
                                self.sweep_and_reap(reaper.as_ref()).await;
                            }
                            Err(e) if !failing => {
                                failing = true;
                                tracing::warn!(error = %e, "cluster: heartbeat not written; retrying");
                            }
                            Err(_) => {}
                        }
                    }
                    changed = stop.changed() => {
                        if changed.is_err() || *stop.borrow() {
                            break;
                        }
                    }
                }
            }
            if let Err(e) = self.leave().await {
                tracing::debug!(error = %e, "cluster: could not remove our member entry (it expires)");
            }
        })
    }
}

impl Membership {
    async fn sweep_and_reap(&self, reaper: Option<&(Arc<GlobalGate>, KeyPool)>) {
        let dead = match sweep(&mut self.conn.clone()).await {
            Ok((_, dead)) => dead,
            Err(_) => return,
        };
        for name in dead {
            tracing::warn!(daemon = %name, "cluster: a daemon stopped heartbeating; its jobs are reclaimed after the visibility timeout");
            if let Some((gate, pool)) = reaper {
                match gate.reap(&pool.key_ids(), &name).await {
                    Ok(n) => {
                        tracing::info!(daemon = %name, slots = n, "cluster: freed the dead daemon's in-flight rate slots")
                    }
                    Err(e) => {
                        tracing::warn!(daemon = %name, error = %e, "cluster: could not free the dead daemon's rate slots (they expire)")
                    }
                }
            }
        }
    }
}

/// The live daemons, oldest first. Entries whose liveness key expired are
/// left out and deleted.
pub async fn list<C: ConnectionLike + Send>(conn: &mut C) -> Result<Vec<Member>> {
    Ok(sweep(conn).await?.0)
}

/// The live daemons (as [`list`]) and the dead ones this call removed.
pub(crate) async fn sweep<C: ConnectionLike + Send>(
    conn: &mut C,
) -> Result<(Vec<Member>, Vec<String>)> {
    let all: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(DAEMONS_KEY)
        .query_async(conn)
        .await?;
    if all.is_empty() {
        return Ok((vec![], vec![]));
    }
    let names: Vec<&String> = all.keys().collect();
    let mut pipe = redis::pipe();
    for name in &names {
        pipe.cmd("EXISTS").arg(alive_key(name));
    }
    let alive: Vec<bool> = pipe.query_async(conn).await?;
    let mut members = Vec::new();
    let mut dead = Vec::new();
    for (name, alive) in names.iter().zip(alive) {
        match (alive, serde_json::from_str::<Member>(&all[*name])) {
            (true, Ok(m)) => members.push(m),
            _ => dead.push((*name).clone()),
        }
    }
    // One HDEL each: only the caller that removes an entry reports it.
    let mut removed = Vec::new();
    for name in dead {
        let n: i64 = redis::cmd("HDEL")
            .arg(DAEMONS_KEY)
            .arg(&name)
            .query_async(conn)
            .await?;
        if n == 1 {
            removed.push(name);
        }
    }
    members.sort_by(|a, b| (a.started_ms, &a.consumer).cmp(&(b.started_ms, &b.consumer)));
    Ok((members, removed))
}

/// What `llmq serve` runs for scale-out next to the queue: the membership
/// heartbeat and, with the gate on, the key events listener.
pub(crate) struct Node {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts the heartbeat for `consumer` on `conn` and, with the gate on
    /// (`gate` is `Some`), its key events listener on `cfg.redis.url`.
    pub(crate) fn start(
        conn: ConnectionManager,
        consumer: &str,
        cfg: &Config,
        gate: Option<Arc<GlobalGate>>,
        pool: KeyPool,
    ) -> Node {
        let (stop, rx) = watch::channel(false);
        let membership = Arc::new(Membership::new(conn, consumer, cfg.cluster.heartbeat));
        let reaper = gate.clone().map(|g| (g, pool.clone()));
        let mut tasks = vec![membership.spawn(reaper, rx.clone())];
        if let Some(gate) = gate {
            tasks.push(gate.spawn_listener(cfg.redis.url.clone(), pool, rx));
        }
        Node { stop, tasks }
    }

    /// Leaves the member list and stops listening (after the drain).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_keys_share_one_slot() {
        assert_eq!(alive_key("h-1-x"), "llmq:{cluster}:alive:h-1-x");
        assert!(DAEMONS_KEY.contains("{cluster}"));
    }
}
