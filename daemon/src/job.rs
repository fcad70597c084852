//! The producer contract: the job JSON a producer pushes and the result JSON
//! it reads back (SPEC §3). Parsing and validation live here so that every
//! malformed job gets the same readable reason wherever it is caught.

use llmq_sdk::{Content, Message};
use serde::{Deserialize, Serialize};

/// Largest job body accepted by default (1 MiB).
pub const DEFAULT_MAX_JOB_BYTES: usize = 1024 * 1024;

/// Most `models` (fan-out) entries a job may have by default
/// (`queue.max_models`).
pub(crate) const DEFAULT_MAX_MODELS: usize = 32;

/// Longest `deadline_s` accepted: 30 days.
pub(crate) const MAX_DEADLINE_S: u64 = 30 * 24 * 3600;

/// Largest `max_tokens` accepted: 2^31 - 1, far above any model's output
/// limit, so token estimates and budgets never come near an overflow.
pub(crate) const MAX_TOKENS_LIMIT: u32 = i32::MAX as u32;

/// The configured limits a job body is checked against (`[queue]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// `queue.max_job_bytes`.
    pub max_bytes: usize,
    /// `queue.max_models`.
    pub max_models: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            max_bytes: DEFAULT_MAX_JOB_BYTES,
            max_models: DEFAULT_MAX_MODELS,
        }
    }
}

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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn is_empty(&self) -> bool {
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
    /// The same key twice in one object: which value was meant is unknowable
    /// (JSON parsers disagree), so the job is refused.
    #[error("job JSON has the key `{key}` more than once {place}; each key may appear once")]
    DuplicateKey { key: String, place: String },
    #[error("job has no messages: `messages` must be a non-empty list")]
    NoMessages,
    #[error("job is invalid: {0}")]
    Invalid(String),
}

/// Reads a job body: size check, JSON, shape, then semantic checks, with
/// the default [`JobLimits`] except for `max_bytes`.
/// On failure, also returns the job `id` when one could be read, so a failed
/// result can still be written.
pub fn parse_job(body: &[u8], max_bytes: usize) -> Result<Job, (JobError, Option<String>)> {
    parse_job_with(
        body,
        &JobLimits {
            max_bytes,
            ..JobLimits::default()
        },
    )
}

/// [`parse_job`] against the configured limits.
pub(crate) fn parse_job_with(
    body: &[u8],
    limits: &JobLimits,
) -> Result<Job, (JobError, Option<String>)> {
    if body.len() > limits.max_bytes {
        return Err((
            JobError::TooLarge {
                size: body.len(),
                limit: limits.max_bytes,
            },
            None,
        ));
    }
    let (value, duplicate) =
        unique::from_slice(body).map_err(|e| (JobError::NotJson(e.to_string()), None))?;
    let id = value
        .get("id")
        .and_then(|v| v.as_str())
        .filter(|s| valid_id(s))
        .map(str::to_string);
    if let Some(d) = duplicate {
        // With two `id`s there is no telling which one the producer waits on.
        let id = if d.is_top_level_id() { None } else { id };
        return Err((d.into_error(), id));
    }
    if let Err(e) = check_numbers(&value, limits) {
        return Err((e, id));
    }
    let mut job: Job = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = if path.is_empty() || path == "." {
            e.inner().to_string()
        } else {
            format!("`{path}`: {}", e.inner())
        };
        (JobError::Shape(msg), id.clone())
    })?;
    if let Err(e) = job.validate_with(limits) {
        return Err((e, id));
    }
    if job.id.is_empty() {
        job.id = ulid::Ulid::new().to_string();
    }
    Ok(job)
}

/// Parses a job body as JSON in one pass, refusing a key that appears twice
/// in any object (for callers that handle the JSON before [`parse_job`],
/// such as the admin API's `/v1/run`).
pub(crate) fn json_value(body: &[u8]) -> Result<serde_json::Value, JobError> {
    match unique::from_slice(body) {
        Ok((_, Some(d))) => Err(d.into_error()),
        Ok((v, None)) => Ok(v),
        Err(e) => Err(JobError::NotJson(e.to_string())),
    }
}

/// Range checks on the numeric fields, on the JSON value itself so that an
/// out-of-range number (`-1`, `2^64 - 1`, `1e308`) gets the same readable
/// reason as any other, naming the field and the accepted range. Every
/// number that passes fits the arithmetic done on it (deadlines, token
/// estimates, costs) with room to spare.
fn check_numbers(v: &serde_json::Value, limits: &JobLimits) -> Result<(), JobError> {
    use serde_json::Value;
    fn shown(v: &Value) -> String {
        let s = v.to_string();
        if s.len() > 40 {
            let cut = (0..=40).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
            format!("{}…", &s[..cut])
        } else {
            s
        }
    }
    fn bad(field: &str, v: &Value, expected: &str) -> JobError {
        JobError::Invalid(format!("`{field}` is {}; expected {expected}", shown(v)))
    }
    /// A whole number in `lo..=hi`, or null (absent).
    fn int_in(
        field: &str,
        v: Option<&Value>,
        lo: u64,
        hi: u64,
        what: &str,
    ) -> Result<(), JobError> {
        match v {
            None | Some(Value::Null) => Ok(()),
            Some(n) => match n.as_u64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(()),
                _ => Err(bad(field, n, what)),
            },
        }
    }
    /// A finite number in `lo..=hi`, or null (absent).
    fn num_in(
        field: &str,
        v: Option<&Value>,
        lo: f64,
        hi: f64,
        what: &str,
    ) -> Result<(), JobError> {
        match v {
            None | Some(Value::Null) => Ok(()),
            Some(n) => match n.as_f64() {
                Some(x) if x.is_finite() && lo <= x && x <= hi => Ok(()),
                _ => Err(bad(field, n, what)),
            },
        }
    }
    let Value::Object(m) = v else {
        // The shape check says what is wrong with a non-object.
        return Ok(());
    };
    int_in(
        "deadline_s",
        m.get("deadline_s"),
        1,
        MAX_DEADLINE_S,
        "whole seconds from 1 to 2592000 (30 days)",
    )?;
    int_in(
        "max_tokens",
        m.get("max_tokens"),
        1,
        u64::from(MAX_TOKENS_LIMIT),
        "a whole number from 1 to 2147483647",
    )?;
    num_in(
        "temperature",
        m.get("temperature"),
        0.0,
        2.0,
        "a number from 0.0 to 2.0",
    )?;
    if let Some(Value::Array(models)) = m.get("models") {
        if models.len() > limits.max_models {
            return Err(JobError::Invalid(format!(
                "`models` has {} entries; at most {} are allowed (queue.max_models)",
                models.len(),
                limits.max_models
            )));
        }
    }
    if let Some(Value::Object(route)) = m.get("route") {
        int_in(
            "route.instance",
            route.get("instance"),
            0,
            u64::from(u32::MAX),
            "a whole number from 0 to 4294967295",
        )?;
        num_in(
            "route.max_cost_usd",
            route.get("max_cost_usd"),
            0.0,
            f64::MAX,
            "a non-negative number of US dollars",
        )?;
    }
    Ok(())
}

/// A one-pass JSON reader that builds a [`serde_json::Value`] like
/// `serde_json::from_slice` but notes the first key that appears twice in
/// one object, at any depth (serde_json silently keeps the last one).
mod unique {
    use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};
    use std::cell::RefCell;
    use std::fmt;

    /// Where a value sits, as a chain up to the root (no allocation per level).
    enum Path<'a> {
        Root,
        Key(&'a Path<'a>, &'a str),
        Index(&'a Path<'a>, usize),
    }

    impl Path<'_> {
        fn render(&self, out: &mut String) {
            match self {
                Path::Root => {}
                Path::Key(parent, k) => {
                    parent.render(out);
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Path::Index(parent, i) => {
                    parent.render(out);
                    out.push_str(&format!("[{i}]"));
                }
            }
        }
    }

    /// The first repeated key: the key and the object (path) holding it.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) struct Duplicate {
        pub key: String,
        /// Empty for the top-level object.
        pub object: String,
    }

    impl Duplicate {
        pub(crate) fn is_top_level_id(&self) -> bool {
            self.object.is_empty() && self.key == "id"
        }

        pub(crate) fn into_error(self) -> super::JobError {
            let place = if self.object.is_empty() {
                "in the job object".to_string()
            } else {
                format!("in `{}`", self.object)
            };
            super::JobError::DuplicateKey {
                key: self.key,
                place,
            }
        }
    }

    struct Seed<'a> {
        path: &'a Path<'a>,
        dup: &'a RefCell<Option<Duplicate>>,
    }

    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = Value;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
            Ok(Value::Bool(b))
        }
        fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
            Ok(Value::Number(n.into()))
        }
        fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
            Ok(Value::Number(n.into()))
        }
        fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
            Ok(Number::from_f64(f).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E>(self, s: &str) -> Result<Value, E> {
            Ok(Value::String(s.to_string()))
        }
        fn visit_string<E>(self, s: String) -> Result<Value, E> {
            Ok(Value::String(s))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut out = Vec::new();
            loop {
                let path = Path::Index(self.path, out.len());
                let seed = Seed {
                    path: &path,
                    dup: self.dup,
                };
                match seq.next_element_seed(seed)? {
                    Some(v) => out.push(v),
                    None => return Ok(Value::Array(out)),
                }
            }
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                let repeated = out.contains_key(&key);
                if repeated {
                    let mut first = self
                        .dup
                        .try_borrow_mut()
                        .map_err(|_| A::Error::custom("duplicate-key check re-entered"))?;
                    if first.is_none() {
                        let mut object = String::new();
                        self.path.render(&mut object);
                        *first = Some(Duplicate {
                            key: key.clone(),
                            object,
                        });
                    }
                }
                let value = {
                    let path = Path::Key(self.path, &key);
                    map.next_value_seed(Seed {
                        path: &path,
                        dup: self.dup,
                    })?
                };
                out.insert(key, value);
            }
            Ok(Value::Object(out))
        }
    }

    /// Parses `body` in one pass; also returns the first duplicate key.
    pub(super) fn from_slice(body: &[u8]) -> serde_json::Result<(Value, Option<Duplicate>)> {
        let dup = RefCell::new(None);
        let mut de = serde_json::Deserializer::from_slice(body);
        let value = Seed {
            path: &Path::Root,
            dup: &dup,
        }
        .deserialize(&mut de)?;
        de.end()?;
        Ok((value, dup.into_inner()))
    }
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
    /// Semantic checks beyond the JSON shape, with the default limits.
    pub fn validate(&self) -> Result<(), JobError> {
        self.validate_with(&JobLimits::default())
    }

    /// Semantic checks beyond the JSON shape. Every numeric field is
    /// checked against its range (also done on the JSON by [`parse_job`],
    /// kept here for jobs built in code).
    pub(crate) fn validate_with(&self, limits: &JobLimits) -> Result<(), JobError> {
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
        if self.models.len() > limits.max_models {
            return Err(JobError::Invalid(format!(
                "`models` has {} entries; at most {} are allowed (queue.max_models)",
                self.models.len(),
                limits.max_models
            )));
        }
        if let Some(n) = self.max_tokens {
            if !(1..=MAX_TOKENS_LIMIT).contains(&n) {
                return Err(JobError::Invalid(format!(
                    "`max_tokens` is {n}; expected a whole number from 1 to {MAX_TOKENS_LIMIT}"
                )));
            }
        }
        if let Some(d) = self.deadline_s {
            if !(1..=MAX_DEADLINE_S).contains(&d) {
                return Err(JobError::Invalid(format!(
                    "`deadline_s` is {d}; expected whole seconds from 1 to {MAX_DEADLINE_S} (30 days)"
                )));
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(JobError::Invalid(format!(
                    "`temperature` is {t}; expected a number from 0.0 to 2.0"
                )));
            }
        }
        if let Some(c) = self.route.max_cost_usd {
            if !(c.is_finite() && c >= 0.0) {
                return Err(JobError::Invalid(format!(
                    "`route.max_cost_usd` is {c}; expected a non-negative number of US dollars"
                )));
            }
        }
        Ok(())
    }

    /// How long the job may take from its first enqueue: `deadline_s`, else
    /// `default`. Never panics, whatever the job says.
    pub(crate) fn deadline_or(&self, default: std::time::Duration) -> std::time::Duration {
        self.deadline_s.map_or(default, |s| {
            std::time::Duration::from_secs(s.min(MAX_DEADLINE_S))
        })
    }

    /// True when any message carries an image.
    pub(crate) fn has_image(&self) -> bool {
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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn assistant(text: &str, refusal: Option<String>) -> ResultMessage {
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

/// The current UTC time in RFC 3339 (see [`crate::calendar`]).
pub(crate) use crate::calendar::now_rfc3339;

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

    /// A valid job with `field` (a path like `route.instance`) set to `raw`.
    fn with_field(field: &str, raw: &str) -> String {
        let base = r#""id":"x1","messages":[{"role":"user","content":"hi"}]"#;
        match field.split_once('.') {
            Some((outer, inner)) => format!(r#"{{{base},"{outer}":{{"{inner}":{raw}}}}}"#),
            None => format!(r#"{{{base},"{field}":{raw}}}"#),
        }
    }

    /// Every numeric field of the job, fed extreme values: each is either
    /// accepted (and then every derived quantity is computed without a
    /// panic) or refused with a reason naming the field, and the id is kept.
    #[test]
    fn extreme_values_in_every_numeric_field_are_refused_by_name_or_harmless() {
        let huge_array = format!("[{}]", vec!["0"; 100_000].join(","));
        let huge_object = format!(
            "{{{}}}",
            (0..10_000)
                .map(|i| format!(r#""k{i}":1"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let extremes: Vec<(&str, String)> = vec![
            ("0", "0".into()),
            ("-1", "-1".into()),
            ("u64::MAX", u64::MAX.to_string()),
            ("2^64", "18446744073709551616".into()),
            ("i64::MIN", i64::MIN.to_string()),
            ("1e308", "1e308".into()),
            ("-1e308", "-1e308".into()),
            ("0.5", "0.5".into()),
            ("NaN-as-string", r#""NaN""#.into()),
            ("Infinity-as-string", r#""Infinity""#.into()),
            ("huge array", huge_array),
            ("huge object", huge_object),
            ("true", "true".into()),
        ];
        // field → which extreme labels are valid values.
        let fields: [(&str, &[&str]); 5] = [
            ("deadline_s", &[]),
            ("max_tokens", &[]),
            ("temperature", &["0", "0.5"]),
            ("route.instance", &["0"]),
            (
                "route.max_cost_usd",
                &["0", "u64::MAX", "2^64", "1e308", "0.5"],
            ),
        ];
        for (field, valid) in fields {
            for (label, raw) in &extremes {
                let body = with_field(field, raw);
                match parse_job(body.as_bytes(), 4 * 1024 * 1024) {
                    Ok(job) => {
                        assert!(valid.contains(label), "{field} = {label} was accepted");
                        // What the executor and the queue derive from a job.
                        let d = job.deadline_or(std::time::Duration::from_secs(600));
                        let _ = std::time::Duration::MAX.saturating_sub(d);
                        let tokens = job.max_tokens.map_or(0u64, u64::from);
                        let _ = tokens
                            .checked_add(u64::from(u32::MAX))
                            .expect("no overflow");
                    }
                    Err((e, id)) => {
                        assert!(!valid.contains(label), "{field} = {label} refused: {e}");
                        let leaf = field.rsplit('.').next().unwrap_or(field);
                        assert!(
                            e.to_string().contains(leaf),
                            "{field} = {label}: the reason names the field: {e}"
                        );
                        assert_eq!(id.as_deref(), Some("x1"), "{field} = {label}: {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn deadline_and_max_tokens_ranges_are_enforced_at_both_ends() {
        let ok = |f: &str, v: &str| parse_job(with_field(f, v).as_bytes(), 4096).is_ok();
        assert!(ok("deadline_s", "1"));
        assert!(ok("deadline_s", &MAX_DEADLINE_S.to_string()));
        assert!(!ok("deadline_s", &(MAX_DEADLINE_S + 1).to_string()));
        assert!(ok("max_tokens", "1"));
        assert!(ok("max_tokens", "2147483647"));
        assert!(!ok("max_tokens", "2147483648"));
        assert!(!ok("max_tokens", "4294967296"));
        assert!(ok("temperature", "2"));
        assert!(!ok("temperature", "2.0001"));
        let (e, _) = reason(&with_field("deadline_s", &u64::MAX.to_string()));
        assert_eq!(
            e.to_string(),
            "job is invalid: `deadline_s` is 18446744073709551615; expected whole seconds from 1 to 2592000 (30 days)"
        );
        // Jobs built in code get the same checks.
        let mut job = parse_job(with_field("deadline_s", "5").as_bytes(), 4096).unwrap();
        job.deadline_s = Some(u64::MAX);
        job.max_tokens = Some(u32::MAX);
        assert!(job
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_tokens"));
        job.max_tokens = None;
        assert!(job
            .validate()
            .unwrap_err()
            .to_string()
            .contains("deadline_s"));
        assert_eq!(
            job.deadline_or(std::time::Duration::ZERO),
            std::time::Duration::from_secs(MAX_DEADLINE_S)
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth_with_their_path() {
        let (e, id) = reason(r#"{"id":"a","id":"b","messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(
            e,
            JobError::DuplicateKey {
                key: "id".into(),
                place: "in the job object".into()
            }
        );
        assert_eq!(id, None, "two ids: neither is the job's");
        let (e, id) = reason(
            r#"{"id":"a","messages":[{"role":"user","content":[{"type":"text","text":"x","text":"y"}]}]}"#,
        );
        assert_eq!(
            e.to_string(),
            "job JSON has the key `text` more than once in `messages[0].content[0]`; each key may appear once"
        );
        assert_eq!(id.as_deref(), Some("a"), "the id is unambiguous");
        let (e, _) = reason(
            r#"{"messages":[{"role":"user","content":"hi"}],"metadata":{"a":{"b":[1,{"c":1,"c":2}]}}}"#,
        );
        assert!(e.to_string().contains("in `metadata.a.b[1]`"), "{e}");
        let (e, _) = reason(
            r#"{"messages":[{"role":"user","content":"hi"}],"route":{"provider":"a","provider":"a"}}"#,
        );
        assert!(e.to_string().contains("`provider`"), "{e}");
        // The same key in different objects is fine; values survive as before.
        let job = parse_job(
            br#"{"id":"ok","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}],"temperature":0.7,"metadata":{"n":-3,"f":1.5,"big":18446744073709551615,"s":"x","z":null,"t":true}}"#,
            4096,
        )
        .unwrap();
        assert_eq!(job.messages.len(), 2);
        assert_eq!(job.temperature, Some(0.7));
        assert_eq!(
            job.metadata,
            Some(
                serde_json::json!({"n":-3,"f":1.5,"big":18446744073709551615u64,"s":"x","z":null,"t":true})
            )
        );
        assert!(matches!(
            json_value(br#"{"a":{"b":1,"b":1}}"#),
            Err(JobError::DuplicateKey { .. })
        ));
        assert_eq!(
            json_value(br#"{"a":[1,2]}"#).unwrap(),
            serde_json::json!({"a":[1,2]})
        );
        // Not JSON stays "not JSON", trailing garbage included.
        assert!(matches!(reason("{}x").0, JobError::NotJson(_)));
    }

    #[test]
    fn models_are_capped_by_the_configured_limit() {
        let models = |n: usize| {
            let list: Vec<String> = (0..n).map(|i| format!(r#""m{i}""#)).collect();
            format!(
                r#"{{"id":"f","messages":[{{"role":"user","content":"hi"}}],"models":[{}]}}"#,
                list.join(",")
            )
        };
        assert!(parse_job(models(DEFAULT_MAX_MODELS).as_bytes(), 1 << 20).is_ok());
        let (e, id) = parse_job(models(1000).as_bytes(), 1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "job is invalid: `models` has 1000 entries; at most 32 are allowed (queue.max_models)"
        );
        assert_eq!(id.as_deref(), Some("f"));
        let limits = JobLimits {
            max_bytes: 1 << 20,
            max_models: 2,
        };
        assert!(parse_job_with(models(2).as_bytes(), &limits).is_ok());
        assert!(parse_job_with(models(3).as_bytes(), &limits)
            .unwrap_err()
            .0
            .to_string()
            .contains("at most 2"));
    }

    #[test]
    fn tiers_order_cheapest_first() {
        assert!(Tier::Free < Tier::Trial && Tier::Trial < Tier::Paid);
    }
}
