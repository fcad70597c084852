//! The lease keeper: while this daemon runs a job, its stream entry must not
//! look abandoned to other daemons. Every visibility_timeout/3 it resets
//! the idle time of the entries this consumer still owns (`XCLAIM … JUSTID`
//! in a Lua script that checks ownership first; the delivery counter is not
//! bumped) and the TTL of their in-flight markers.

use super::keys::{inflight_key, GROUP};
use super::{sleep_or_stop, Shared};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Entry ids per script call.
const CHUNK: usize = 256;

pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let every = (shared.cfg.visibility_timeout / 3).max(Duration::from_millis(30));
    let mut conn = shared.conn.clone();
    loop {
        if sleep_or_stop(every, &mut stop).await {
            break;
        }
        let snapshot: Vec<((usize, String), String)> = match shared.inflight.lock() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => continue,
        };
        if snapshot.is_empty() {
            continue;
        }
        if let Err(e) = renew(&shared, &mut conn, &snapshot).await {
            tracing::warn!(error = %e, jobs = snapshot.len(), "queue: cannot renew job leases");
        }
    }
}

async fn renew(
    shared: &Shared,
    conn: &mut redis::aio::ConnectionManager,
    entries: &[((usize, String), String)],
) -> redis::RedisResult<()> {
    let mut per_lane: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for ((lane, entry), _) in entries {
        per_lane.entry(*lane).or_default().push(entry);
    }
    for (lane, ids) in per_lane {
        for chunk in ids.chunks(CHUNK) {
            let mut inv = shared.scripts.lease.prepare_invoke();
            inv.key(&shared.lanes[lane].key)
                .arg(GROUP)
                .arg(&shared.consumer);
            for id in chunk {
                inv.arg(*id);
            }
            let _kept: u64 = inv.invoke_async(conn).await?;
        }
    }
    let ttl_ms = shared.cfg.visibility_timeout.as_millis() as u64;
    let mut p = redis::pipe();
    for (_, job_id) in entries {
        p.cmd("PEXPIRE")
            .arg(inflight_key(job_id))
            .arg(ttl_ms)
            .ignore();
    }
    p.query_async::<()>(conn).await
}
