//! Prometheus metrics: the metric names (the scrape contract), their
//! descriptions and the process-wide recorder.
//!
//! The recorder has no HTTP listener of its own: the admin API's `/metrics`
//! renders the [`PrometheusHandle`] from [`install`]. Counters and the
//! histogram are emitted where things happen (the executor); the gauges
//! describe state and are refreshed by the admin API from its backend right
//! before each scrape (so this module knows nothing of the admin views).
//! Labels carry key ids (`groq#2`), never secrets.

use std::sync::OnceLock;

use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: finished jobs, by `lane` and `outcome` (`succeeded`/`failed`).
pub const JOBS_TOTAL: &str = "llmq_jobs_total";
/// Counter: upstream calls, by `provider`, `key` (the key id) and `outcome`.
pub const UPSTREAM_CALLS_TOTAL: &str = "llmq_upstream_calls_total";
/// Counter: tokens used, by `provider` and `direction` (`input`/`output`).
pub const TOKENS_TOTAL: &str = "llmq_tokens_total";
/// Counter: spend in millionths of a USD, by `provider`.
pub const COST_USD_MICROS_TOTAL: &str = "llmq_cost_usd_micros_total";
/// Gauge: 1 for a key's current `state` (`available`/`cooling`/`disabled`), 0 for the others.
pub const KEY_STATE: &str = "llmq_key_state";
/// Histogram: seconds a job waited for a key's limiter to admit it.
pub const LIMITER_WAIT_SECONDS: &str = "llmq_limiter_wait_seconds";
/// Gauge: entries waiting in a priority `lane`.
pub const QUEUE_DEPTH: &str = "llmq_queue_depth";
/// Gauge: jobs being worked on.
pub const JOBS_IN_FLIGHT: &str = "llmq_jobs_in_flight";
/// Gauge: retries waiting for their due time.
pub const JOBS_DELAYED: &str = "llmq_jobs_delayed";
/// Gauge: dead-lettered jobs.
pub const JOBS_DEAD: &str = "llmq_jobs_dead";

/// Buckets of [`LIMITER_WAIT_SECONDS`]: from "no wait" to "waited minutes".
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Installing the global recorder failed (usually: another recorder was
/// installed first in this process).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot install the Prometheus metrics recorder: {0}")]
pub struct MetricsError(String);

static HANDLE: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder and
/// describes every metric. Idempotent: later calls return the same handle
/// (or the same error).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(LIMITER_WAIT_SECONDS.to_owned()),
                    WAIT_BUCKETS,
                )
                .and_then(|b| b.install_recorder())
                .map_err(|e| MetricsError(e.to_string()))?;
            describe();
            Ok(handle)
        })
        .clone()
}

/// Registers the help text and unit of every llmq metric with the current
/// recorder.
pub(crate) fn describe() {
    describe_counter!(
        JOBS_TOTAL,
        Unit::Count,
        "Finished jobs by lane and outcome."
    );
    describe_counter!(
        UPSTREAM_CALLS_TOTAL,
        Unit::Count,
        "Upstream calls by provider, key id and outcome."
    );
    describe_counter!(
        TOKENS_TOTAL,
        Unit::Count,
        "Tokens used by provider and direction."
    );
    describe_counter!(
        COST_USD_MICROS_TOTAL,
        Unit::Count,
        "Spend in millionths of a USD by provider."
    );
    describe_gauge!(
        KEY_STATE,
        "1 for each key's current state (available, cooling, disabled), 0 for the others."
    );
    describe_histogram!(
        LIMITER_WAIT_SECONDS,
        Unit::Seconds,
        "Time a job waited for a key's limiter to admit it."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Entries waiting in each priority lane."
    );
    describe_gauge!(JOBS_IN_FLIGHT, Unit::Count, "Jobs being worked on.");
    describe_gauge!(
        JOBS_DELAYED,
        Unit::Count,
        "Retries waiting for their due time."
    );
    describe_gauge!(JOBS_DEAD, Unit::Count, "Dead-lettered jobs.");
    describe_counter!(
        crate::plugin_host::PLUGIN_TIMEOUTS_TOTAL,
        Unit::Count,
        "Plugin calls abandoned at [plugins] call_timeout, by plugin and call."
    );
    describe_gauge!(
        crate::plugin_host::PLUGIN_QUARANTINED,
        Unit::Count,
        "1 for a plugin quarantined (its calls kept timing out) until the next reload."
    );
}
