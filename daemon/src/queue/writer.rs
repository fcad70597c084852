//! The completion writer: turns finished jobs into Redis writes, many jobs
//! per `MULTI`/`EXEC`. Result (or retry, or dead letter) and ack of a job
//! always go in the same transaction; the ack is `XACK` + `XDEL`, so lanes
//! do not grow. A failed write is retried (100 ms → 5 s) until Redis is
//! back; the jobs stay tracked (and leased) meanwhile.

use super::keys::{
    done_key, inflight_key, result_key, DEAD_KEY, DELAYED_KEY, GROUP, RESULTS_STREAM,
};
use super::{OutageBackoff, Shared, WRITE_BATCH};
use crate::job::{JobResult, Status};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// One finished stream entry.
#[derive(Debug)]
pub(crate) struct Write {
    pub lane: usize,
    pub entry_id: String,
    /// Job id whose in-flight marker this entry holds (deleted with the ack).
    pub release: Option<String>,
    pub action: Action,
}

/// What to write besides the ack.
#[derive(Debug)]
pub(crate) enum Action {
    /// Nothing: a duplicate, or a job whose result already exists.
    Ack,
    Result(ResultWrite),
    Retry {
        due_ms: u64,
        member: String,
    },
    Dead {
        field: String,
        record: String,
        result: Option<ResultWrite>,
    },
}

/// A serialized result, ready to be written.
#[derive(Debug)]
pub(crate) struct ResultWrite {
    pub id: String,
    pub status: &'static str,
    pub json: String,
}

impl ResultWrite {
    pub(crate) fn new(r: &JobResult) -> ResultWrite {
        let json = serde_json::to_string(r).unwrap_or_else(|e| {
            serde_json::json!({
                "id": r.id, "status": "failed", "cost_usd": 0.0, "attempts": [],
                "queued_ms": r.queued_ms, "duration_ms": r.duration_ms,
                "finished_at": r.finished_at,
                "error": {"kind": "upstream", "message": format!("result not serializable: {e}")},
            })
            .to_string()
        });
        let status = match r.status {
            Status::Succeeded => Status::Succeeded.as_str(),
            Status::Failed => Status::Failed.as_str(),
        };
        ResultWrite {
            id: r.id.clone(),
            status,
            json,
        }
    }
}

/// The `llmq:dead` record of a job. The body is kept up to `max_body` bytes
/// (`queue.dead_body_bytes`, cut at a character boundary); `job_bytes` is its
/// original length and `job_truncated` says whether it was cut.
pub(crate) fn dead_record(
    reason: &str,
    job_body: &[u8],
    max_body: usize,
    lane: &str,
    attempts: u32,
) -> String {
    let (job, truncated) = truncate_body(job_body, max_body);
    serde_json::json!({
        "reason": reason,
        "job": job,
        "job_bytes": job_body.len(),
        "job_truncated": truncated,
        "lane": lane,
        "attempts": attempts,
        "at": crate::job::now_rfc3339(),
    })
    .to_string()
}

/// At most `max` bytes of `body` as text (invalid UTF-8 replaced), and
/// whether anything was cut. Only the kept prefix is ever copied.
fn truncate_body(body: &[u8], max: usize) -> (String, bool) {
    let mut cut = body.len() > max;
    let mut prefix = &body[..body.len().min(max)];
    if cut {
        // Drop a character split by the cut rather than show U+FFFD for it.
        if let Err(e) = std::str::from_utf8(prefix) {
            if e.error_len().is_none() {
                prefix = &prefix[..e.valid_up_to()];
            }
        }
    }
    let mut text = String::from_utf8_lossy(prefix).into_owned();
    if text.len() > max {
        // Replacement characters are longer than the bytes they replaced.
        let end = (0..=max)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(end);
        cut = true;
    }
    (text, cut)
}

/// Runs until every sender is gone, writing what it receives in batches.
pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Write>) {
    let mut conn = shared.conn.clone();
    let mut batch: Vec<Write> = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        // Let jobs finishing right now join this batch.
        tokio::task::yield_now().await;
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        write_until_done(&shared, &mut conn, &batch).await;
        let mut retried = false;
        for w in batch.drain(..) {
            retried |= matches!(w.action, Action::Retry { .. });
            shared.untrack(w.lane, &w.entry_id);
        }
        if retried {
            shared.mover_wake.notify_one();
        }
    }
}

async fn write_until_done(
    shared: &Shared,
    conn: &mut redis::aio::ConnectionManager,
    batch: &[Write],
) {
    let pipe = build(shared, batch);
    let mut backoff = OutageBackoff::new();
    loop {
        match pipe.query_async::<redis::Value>(conn).await {
            Ok(v) => {
                log_command_errors(&v);
                return;
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, jobs = batch.len(), retry_in = ?wait,
                    "queue: cannot write results; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn log_command_errors(v: &redis::Value) {
    if let redis::Value::Array(items) = v {
        if let Some(redis::Value::ServerError(e)) = items
            .iter()
            .find(|i| matches!(i, redis::Value::ServerError(_)))
        {
            tracing::warn!(error = ?e, "queue: a result write command failed");
        }
    }
}

fn push_result(p: &mut redis::Pipeline, r: &ResultWrite, ttl_s: u64, maxlen: usize) {
    p.cmd("SET")
        .arg(result_key(&r.id))
        .arg(&r.json)
        .arg("EX")
        .arg(ttl_s);
    let done = done_key(&r.id);
    p.cmd("LPUSH").arg(&done).arg(r.status);
    p.cmd("EXPIRE").arg(&done).arg(ttl_s);
    p.cmd("XADD")
        .arg(RESULTS_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg("id")
        .arg(&r.id)
        .arg("status")
        .arg(r.status)
        .arg("result")
        .arg(&r.json);
}

/// One transaction for the whole batch: results, retries and dead letters
/// first, then the acks (grouped per lane).
pub(crate) fn build(shared: &Shared, batch: &[Write]) -> redis::Pipeline {
    let ttl_s = shared.cfg.result_ttl.as_secs().max(1);
    let maxlen = shared.cfg.results_maxlen.max(1);
    let mut p = redis::pipe();
    p.atomic().ignore_errors();
    let mut acks: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for w in batch {
        match &w.action {
            Action::Ack => {}
            Action::Result(r) => push_result(&mut p, r, ttl_s, maxlen),
            Action::Retry { due_ms, member } => {
                p.cmd("ZADD").arg(DELAYED_KEY).arg(*due_ms).arg(member);
            }
            Action::Dead {
                field,
                record,
                result,
            } => {
                p.cmd("HSET").arg(DEAD_KEY).arg(field).arg(record);
                if let Some(r) = result {
                    push_result(&mut p, r, ttl_s, maxlen);
                }
            }
        }
        if let Some(id) = &w.release {
            p.cmd("DEL").arg(inflight_key(id));
        }
        acks.entry(w.lane).or_default().push(&w.entry_id);
    }
    for (lane, ids) in acks {
        let key = &shared.lanes[lane].key;
        p.cmd("XACK").arg(key).arg(GROUP).arg(&ids);
        p.cmd("XDEL").arg(key).arg(&ids);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &[u8], max: usize) -> serde_json::Value {
        serde_json::from_str(&dead_record("too large", body, max, "normal", 1)).unwrap()
    }

    #[test]
    fn a_10_mb_dead_body_is_stored_truncated_with_its_original_length() {
        let body = format!(
            r#"{{"id":"big","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(10 * 1024 * 1024)
        );
        let rec = record(body.as_bytes(), 4096);
        let job = rec["job"].as_str().unwrap();
        assert_eq!(job.len(), 4096);
        assert!(body.starts_with(job));
        assert_eq!(rec["job_bytes"], body.len());
        assert_eq!(rec["job_truncated"], true);
        assert_eq!(rec["reason"], "too large");
        let whole = serde_json::to_string(&rec).unwrap();
        assert!(
            whole.len() < 5000,
            "the record stays small: {}",
            whole.len()
        );
    }

    #[test]
    fn short_bodies_are_kept_whole_and_cuts_respect_characters() {
        let rec = record(b"{not json", 4096);
        assert_eq!(rec["job"], "{not json");
        assert_eq!(rec["job_bytes"], 9);
        assert_eq!(rec["job_truncated"], false);
        // "é" is two bytes: a cut through it drops it whole.
        let rec = record("aé".as_bytes(), 2);
        assert_eq!(rec["job"], "a");
        assert_eq!(rec["job_truncated"], true);
        // Invalid UTF-8 is shown with replacement characters, still within the limit.
        let rec = record(&[0xff, 0xfe, b'a', b'b'], 4);
        let job = rec["job"].as_str().unwrap();
        assert!(job.len() <= 4 && job.starts_with('\u{fffd}'), "{job:?}");
        assert_eq!(rec["job_bytes"], 4);
        let rec = record(b"abc", 0);
        assert_eq!(rec["job"], "");
        assert_eq!(rec["job_truncated"], true);
    }
}
