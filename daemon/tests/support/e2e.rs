//! End-to-end harness: a private Redis, the mock provider and `llmq serve`
//! as a real child process, plus producer helpers over plain Redis commands.
//! Included by the e2e test files with `#[path = "support/e2e.rs"] mod e2e;`.
#![allow(dead_code)]

use llmq::job::JobResult;
use llmq_mock::{MockConfig, MockServer, Protocol};
use llmq_testkit::daemon::{DaemonProcess, DaemonSpec};
use llmq_testkit::{plugin_dir, wait_until, RedisServer};
use std::time::Duration;

/// One provider of a test config.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub protocol: Protocol,
    pub tier: &'static str,
    pub models: Vec<String>,
    /// Extra TOML lines inside `[providers.<name>]`.
    pub extra: Vec<String>,
}

impl Provider {
    pub fn new(name: &str, protocol: Protocol, tier: &'static str, model: &str) -> Provider {
        Provider {
            name: name.into(),
            protocol,
            tier,
            models: vec![model.into()],
            extra: vec![],
        }
    }

    pub fn with(mut self, line: &str) -> Provider {
        self.extra.push(line.to_string());
        self
    }

    pub fn model(mut self, m: &str) -> Provider {
        self.models.push(m.into());
        self
    }
}

pub fn plugin_name(p: Protocol) -> &'static str {
    match p {
        Protocol::OpenAi => "openai",
        Protocol::Anthropic => "anthropic",
        Protocol::Gemini => "gemini",
    }
}

/// Builds a daemon config for these providers against the mock. Every
/// catalog provider is disabled so only the test's providers route.
pub fn config(
    redis: &RedisServer,
    mock: &MockServer,
    providers: &[Provider],
    extra: &str,
) -> String {
    let mut s = format!(
        "[redis]\nurl = \"{}\"\n\n[plugins]\ndir = \"{}\"\n\n[admin]\nlisten = \"\"\n\n",
        redis.url(),
        plugin_dir().display()
    );
    s.push_str(extra);
    s.push('\n');
    for name in [
        "openai",
        "anthropic",
        "gemini",
        "groq",
        "mistral",
        "nvidia",
        "zai",
        "openrouter",
        "ollama",
    ] {
        if !providers.iter().any(|p| p.name == name) {
            s.push_str(&format!("[providers.{name}]\nenabled = false\n\n"));
        }
    }
    for p in providers {
        s.push_str(&format!(
            "[providers.{}]\nplugin = \"{}\"\nbase_url = \"{}\"\ntier = \"{}\"\nkeys_env = \"{}\"\n",
            p.name,
            plugin_name(p.protocol),
            mock.base_url(p.protocol),
            p.tier,
            p.name.to_uppercase()
        ));
        for l in &p.extra {
            s.push_str(l);
            s.push('\n');
        }
        for m in &p.models {
            s.push_str(&format!(
                "\n[[providers.{}.models]]\nid = \"{m}\"\ncapabilities = [\"json\"]\ncontext = 100000\n",
                p.name
            ));
        }
        s.push('\n');
    }
    s
}

/// Starts the mock in the current tokio runtime.
pub async fn mock(cfg: MockConfig) -> MockServer {
    MockServer::start(cfg).await.expect("mock starts")
}

pub fn spec(config: String) -> DaemonSpec {
    DaemonSpec::new(env!("CARGO_BIN_EXE_llmq"), config)
}

pub fn start(spec: &DaemonSpec) -> DaemonProcess {
    DaemonProcess::start(spec)
}

/// XADDs a job JSON to a lane.
pub fn push(redis: &RedisServer, lane: &str, job: &serde_json::Value) {
    let mut c = redis.client();
    let _: String = redis::cmd("XADD")
        .arg(format!("llmq:{{jobs}}:{lane}"))
        .arg("*")
        .arg("job")
        .arg(job.to_string())
        .query(&mut c)
        .expect("XADD");
}

/// A plain job with this id.
pub fn job(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "messages": [{"role": "user", "content": format!("hello from {id}")}], "max_tokens": 16})
}

pub fn result(redis: &RedisServer, id: &str) -> Option<JobResult> {
    let mut c = redis.client();
    let s: Option<String> = redis::cmd("GET")
        .arg(format!("llmq:result:{id}"))
        .query(&mut c)
        .ok()?;
    s.map(|s| serde_json::from_str(&s).expect("result JSON parses as JobResult"))
}

/// Waits until every id has a result; panics with the daemon log otherwise.
pub fn wait_results(
    redis: &RedisServer,
    daemon: &DaemonProcess,
    ids: &[String],
    timeout: Duration,
) -> Vec<JobResult> {
    let start = std::time::Instant::now();
    let mut c = redis.client();
    loop {
        let keys: Vec<String> = ids.iter().map(|id| format!("llmq:result:{id}")).collect();
        let mut have = 0usize;
        for chunk in keys.chunks(500) {
            let n: usize = redis::cmd("EXISTS").arg(chunk).query(&mut c).unwrap_or(0);
            have += n;
        }
        if have == ids.len() {
            break;
        }
        if start.elapsed() > timeout {
            panic!(
                "only {have} of {} results after {timeout:?}; daemon log:\n{}",
                ids.len(),
                tail(&daemon.log(), 60)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ids.iter()
        .map(|id| result(redis, id).expect("result exists"))
        .collect()
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `f` holds, for up to `timeout`.
pub fn eventually(timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    wait_until(timeout, what, f)
}
