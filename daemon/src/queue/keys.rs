//! Redis key names of the queue (SPEC §3). Every key that the Lua scripts
//! touch together carries the `{jobs}` hash tag, so they share one Cluster
//! slot; result keys are per job and live on other slots.

/// Consumer group every daemon reads the lanes with.
pub(crate) const GROUP: &str = "llmq";
/// ZSET of delayed retries, scored by due time (Unix ms).
pub(crate) const DELAYED_KEY: &str = "llmq:{jobs}:delayed";
/// Hash of dead letters: job id (or stream entry id) → JSON record.
pub(crate) const DEAD_KEY: &str = "llmq:dead";
/// Stream of finished jobs, capped with `MAXLEN ~`.
pub(crate) const RESULTS_STREAM: &str = "llmq:results";

/// The stream of a lane: `llmq:{jobs}:<lane>`.
pub(crate) fn lane_key(lane: &str) -> String {
    format!("llmq:{{jobs}}:{lane}")
}

/// Where a job's result JSON is stored.
pub(crate) fn result_key(id: &str) -> String {
    format!("llmq:result:{id}")
}

/// The list a producer `BLPOP`s to learn that a job finished.
pub(crate) fn done_key(id: &str) -> String {
    format!("llmq:done:{id}")
}

/// Held while a job runs, so the same id is not run twice at once.
pub(crate) fn inflight_key(id: &str) -> String {
    format!("llmq:inflight:{id}")
}

/// Lane names become key names and parts of the in-flight marker: keep
/// them short and plain.
pub(crate) fn valid_lane(lane: &str) -> bool {
    !lane.is_empty()
        && lane.len() <= 64
        && lane
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The millisecond part of a stream entry id (`1700000000000-3` → 1700000000000).
pub(crate) fn entry_ms(entry_id: &str) -> Option<u64> {
    entry_id.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_the_spec() {
        assert_eq!(lane_key("normal"), "llmq:{jobs}:normal");
        assert_eq!(result_key("a1"), "llmq:result:a1");
        assert_eq!(done_key("a1"), "llmq:done:a1");
        assert_eq!(entry_ms("1700000000000-3"), Some(1_700_000_000_000));
        assert_eq!(entry_ms("x"), None);
        assert!(valid_lane("high") && valid_lane("bulk_2"));
        assert!(!valid_lane("") && !valid_lane("a b") && !valid_lane("{x}") && !valid_lane("a|b"));
    }
}
