//! The producer contract: the job JSON a producer pushes and the result JSON
//! it reads back (SPEC §3). Parsing and validation live here so that every
//! malformed job gets the same readable reason wherever it is caught.

use llmq_sdk::{Content, Message};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Largest job body accepted by default (1 MiB).
pub const DEFAULT_MAX_JOB_BYTES: usize = 1024 * 1024;

/// A job as the producer wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Idempotency id; a ULID is generated when absent.
    #[serde(default)]
    pub id: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Fan-out: the same prompt on each model, one aggregated result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<Capability>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "RouteHints::is_empty")]
    pub route: RouteHints,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// A model capability a job may require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Vision,
    Json,
    Tools,
}

impl Capability {
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Vision => "vision",
            Capability::Json => "json",
            Capability::Tools => "tools",
        }
    }
}

/// Cost tiers, cheapest first. The derived order is the routing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Free,
    Trial,
    Paid,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Trial => "trial",
            Tier::Paid => "paid",
        }
    }
}

/// Key selection strategy within a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Least recently used.
    #[default]
    RoundRobin,
    Random,
    /// Fewest requests in flight.
    LeastLoaded,
    /// Random, proportional to key weight.
    Weighted,
}

/// The producer's routing hints (`route` in the job JSON).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteHints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// A pinned key id, e.g. `groq#2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A pinned instance number, as in `/chat instance_id=2` (needs `provider`
    /// or a model that names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
}

impl RouteHints {
    pub fn is_empty(&self) -> bool {
        *self == RouteHints::default()
    }
}

/// Why a job body was refused. The text is what the dead-letter entry and
/// the failed result say.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error("job is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("job is not valid JSON: {0}")]
    NotJson(String),
    #[error("job JSON does not match the job format: {0}")]
    Shape(String),
    #[error("job has no messages: `messages` must be a non-empty list")]
    NoMessages,
    #[error("job is invalid: {0}")]
    Invalid(String),
}

/// Reads a job body: size check, JSON, shape, then semantic checks.
/// On failure, also returns the job `id` when one could be read, so a failed
/// result can still be written.
pub fn parse_job(body: &[u8], max_bytes: usize) -> Result<Job, (JobError, Option<String>)> {
    if body.len() > max_bytes {
        return Err((
            JobError::TooLarge {
                size: body.len(),
                limit: max_bytes,
            },
            None,
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| (JobError::NotJson(e.to_string()), None))?;
    let id = value
        .get("id")
        .and_then(|v| v.as_str())
        .filter(|s| valid_id(s))
        .map(str::to_string);
    let mut job: Job = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = if path.is_empty() || path == "." {
            e.inner().to_string()
        } else {
            format!("`{path}`: {}", e.inner())
        };
        (JobError::Shape(msg), id.clone())
    })?;
    if let Err(e) = job.validate() {
        return Err((e, id));
    }
    if job.id.is_empty() {
        job.id = ulid::Ulid::new().to_string();
    }
    Ok(job)
}

/// Ids become parts of Redis key names: keep them printable and bounded.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '{' && c != '}')
}

impl Job {
    /// Semantic checks beyond the JSON shape.
    pub fn validate(&self) -> Result<(), JobError> {
        if !self.id.is_empty() && !valid_id(&self.id) {
            return Err(JobError::Invalid(
                "`id` must be 1-200 printable ASCII characters without spaces or braces".into(),
            ));
        }
        if self.messages.is_empty() {
            return Err(JobError::NoMessages);
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(JobError::Invalid(format!(
                    "messages[{i}].role is {:?}; expected system, user or assistant",
                    m.role
                )));
            }
        }
        if self.model.is_some() && !self.models.is_empty() {
            return Err(JobError::Invalid(
                "give either `model` or `models` (fan-out), not both".into(),
            ));
        }
        if let Some(0) = self.max_tokens {
            return Err(JobError::Invalid("`max_tokens` must be at least 1".into()));
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(JobError::Invalid(format!(
                    "`temperature` is {t}; expected 0.0 to 2.0"
                )));
            }
        }
        Ok(())
    }

    /// True when any message carries an image.
    pub fn has_image(&self) -> bool {
        self.messages.iter().any(|m| m.content.has_image())
    }

    /// The capabilities this job needs, including those implied by its content.
    pub fn needed_capabilities(&self) -> Vec<Capability> {
        let mut caps = self.require.clone();
        if self.has_image() && !caps.contains(&Capability::Vision) {
            caps.push(Capability::Vision);
        }
        caps.sort();
        caps.dedup();
        caps
    }

    /// Text of the last user message (for logs it is never used: prompts stay out of logs).
    pub fn last_user_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.text())
            .unwrap_or_default()
    }
}

/// Content helper used by tests and the CLI.
pub fn user_message(text: &str) -> Message {
    Message {
        role: "user".into(),
        content: Content::Text(text.into()),
    }
}

/// Final status of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

/// The kinds of job failure in a result's `error.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    InvalidJob,
    InvalidRequest,
    NoRoute,
    Deadline,
    Exhausted,
    Upstream,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::InvalidJob => "invalid_job",
            FailureKind::InvalidRequest => "invalid_request",
            FailureKind::NoRoute => "no_route",
            FailureKind::Deadline => "deadline",
            FailureKind::Exhausted => "exhausted",
            FailureKind::Upstream => "upstream",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    pub kind: FailureKind,
    pub message: String,
}

/// One upstream call (or a refusal before one) made for a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub provider: String,
    pub model: String,
    pub key: String,
    /// An outcome name (`success`, `rate_limited`, …) or `crashed`, `plugin_error`, `network`.
    pub outcome: String,
    pub ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageOut {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The assistant's message in a result (SPEC §9 "Result additions").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text, or `null` when the model answered with none (a refusal,
    /// a content filter, tool calls).
    #[serde(default)]
    pub content: Option<String>,
    /// The model's refusal text when it declined, else `null`.
    #[serde(default)]
    pub refusal: Option<String>,
}

impl ResultMessage {
    /// The message of a successful call: `content` is `null` when the text
    /// is empty.
    pub fn assistant(text: &str, refusal: Option<String>) -> ResultMessage {
        ResultMessage {
            role: "assistant".into(),
            content: (!text.is_empty()).then(|| text.to_string()),
            refusal,
        }
    }
}

/// Why the model stopped, normalized (`stop`, `length`, `tool_calls`,
/// `content_filter`, `refusal`).
pub use llmq_sdk::FinishReason;

/// The result JSON (SPEC §3, with the §9 additions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub id: String,
    pub status: Status,
    /// The message's text, for v1 producers (`""` when `message.content` is `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// How the call ended. Absent when the provider did not say; a call cut
    /// short, filtered or refused is never reported as `stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<ResultMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
    pub cost_usd: f64,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    pub queued_ms: u64,
    pub duration_ms: u64,
    pub finished_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResultError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// Fan-out only: one entry per model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<Vec<ModelResponse>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successful: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<u32>,
}

/// One model's answer inside a fan-out result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    pub model: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<ResultMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
    pub cost_usd: f64,
    pub duration_ms: u64,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResultError>,
}

impl JobResult {
    /// A failed result with no upstream call behind it.
    pub fn failure(id: &str, kind: FailureKind, message: impl Into<String>) -> JobResult {
        JobResult {
            id: id.to_string(),
            status: Status::Failed,
            output: None,
            finish_reason: None,
            message: None,
            provider: None,
            model: None,
            key: None,
            tier: None,
            usage: None,
            cost_usd: 0.0,
            attempts: vec![],
            queued_ms: 0,
            duration_ms: 0,
            finished_at: now_rfc3339(),
            error: Some(ResultError {
                kind,
                message: message.into(),
            }),
            metadata: None,
            responses: None,
            successful: None,
            failed: None,
        }
    }
}

/// The current UTC time in RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Free-form metadata map type (kept for callers that build metadata).
pub type Metadata = BTreeMap<String, serde_json::Value>;

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(body: &str) -> (JobError, Option<String>) {
        parse_job(body.as_bytes(), DEFAULT_MAX_JOB_BYTES).unwrap_err()
    }

    #[test]
    fn minimal_job_gets_an_id() {
        let job = parse_job(br#"{"messages":[{"role":"user","content":"hi"}]}"#, 1024).unwrap();
        assert_eq!(job.id.len(), 26);
        assert_eq!(job.messages[0].content.text(), "hi");
    }

    #[test]
    fn malformed_jobs_have_readable_reasons_and_keep_their_id() {
        let (e, id) = reason("{not json");
        assert!(matches!(e, JobError::NotJson(_)) && id.is_none());
        let (e, id) = reason(r#"{"id":"a1","messages":[]}"#);
        assert_eq!(e, JobError::NoMessages);
        assert_eq!(id.as_deref(), Some("a1"));
        let (e, id) = reason(r#"{"id":"a2","messages":"hello"}"#);
        assert!(e.to_string().contains("messages"), "{e}");
        assert_eq!(id.as_deref(), Some("a2"));
        let (e, _) = reason(r#"{"id":"a3","messages":[{"role":"robot","content":"x"}]}"#);
        assert!(e.to_string().contains("robot"), "{e}");
        let (e, _) = reason(r#"{"messages":[{"role":"user","content":"x"}],"modle":"x"}"#);
        assert!(e.to_string().contains("modle"), "{e}");
        let big = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(2000)
        );
        let (e, _) = parse_job(big.as_bytes(), 1000).unwrap_err();
        assert!(matches!(e, JobError::TooLarge { .. }));
    }

    #[test]
    fn images_imply_vision() {
        let job = parse_job(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"what"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}],"require":["json"]}"#,
            4096,
        )
        .unwrap();
        assert_eq!(
            job.needed_capabilities(),
            vec![Capability::Vision, Capability::Json]
        );
    }

    #[test]
    fn tiers_order_cheapest_first() {
        assert!(Tier::Free < Tier::Trial && Tier::Trial < Tier::Paid);
    }
}
