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
///
/// It has an `[upstream]` section (add lines to it with [`with_upstream`];
/// `extra` must not open another one).
pub fn config(
    redis: &RedisServer,
    mock: &MockServer,
    providers: &[Provider],
    extra: &str,
) -> String {
    let mut s = format!(
        "[redis]\nurl = \"{}\"\n\n[plugins]\ndir = \"{}\"\n\n[admin]\nlisten = \"\"\n\n{}\n",
        redis.url(),
        plugin_dir().display(),
        upstream_section(mock)
    );
    s.push_str(extra);
    s.push('\n');
    let catalog = llmq::config::catalog_providers().expect("the built-in catalog parses");
    for name in catalog.keys() {
        if !providers.iter().any(|p| &p.name == name) {
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

/// The `[upstream]` section of [`config`]: the mock serves HTTPS (HTTP/2 by
/// ALPN) with a throwaway CA, trusted through `ca_file`, so every e2e suite
/// takes the path users take. A mock started with `MockConfig::plain_http()`
/// gets no `ca_file`.
fn upstream_section(mock: &MockServer) -> String {
    match mock.ca_file() {
        Some(ca) => format!(
            "{UPSTREAM_HEADER}ca_file = {}\n",
            serde_json::to_string(&ca.display().to_string()).expect("a path as a string")
        ),
        None => UPSTREAM_HEADER.to_string(),
    }
}

const UPSTREAM_HEADER: &str = "[upstream]\n";

/// The config with `line` added to its `[upstream]` section.
pub fn with_upstream(config: &str, line: &str) -> String {
    assert!(
        config.contains(UPSTREAM_HEADER),
        "config has no [upstream] section"
    );
    config.replacen(UPSTREAM_HEADER, &format!("{UPSTREAM_HEADER}{line}\n"), 1)
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

// ---- Admin API helpers (operate-it tests) ----

/// The config with the admin API listening on `listen` (e.g. `127.0.0.1:PORT`).
pub fn with_admin(config: &str, listen: &str) -> String {
    let from = "[admin]\nlisten = \"\"\n";
    assert!(
        config.contains(from),
        "config has no [admin] section to fill"
    );
    config.replacen(from, &format!("[admin]\nlisten = \"{listen}\"\n"), 1)
}

/// A client of a running daemon's admin API.
#[derive(Clone)]
pub struct Admin {
    pub base: String,
    pub token: Option<String>,
    client: reqwest::Client,
}

/// One admin answer: status and body text.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub www_authenticate: Option<String>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Admin {
    /// A client for `http://<listen>` with this bearer token (or none).
    pub fn new(listen: &str, token: Option<&str>) -> Admin {
        Admin {
            base: format!("http://{listen}"),
            token: token.map(str::to_string),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("reqwest client"),
        }
    }

    /// The same daemon with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Admin {
        Admin {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    /// Sends `method path` with an optional JSON body.
    pub async fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Answer {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
        let mut req = self.client.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = resp.status().as_u16();
        let www_authenticate = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.text().await.unwrap_or_default();
        Answer {
            status,
            body,
            www_authenticate,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<&serde_json::Value>) -> Answer {
        self.call("POST", path, body).await
    }

    /// Waits until `/healthz` answers (the daemon is up and serving).
    pub async fn wait_up(&self, daemon: &mut DaemonProcess, timeout: Duration) {
        let start = std::time::Instant::now();
        let url = format!("{}/healthz", self.base);
        loop {
            if let Ok(r) = self.client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if !daemon.is_running() || start.elapsed() > timeout {
                panic!(
                    "admin API not up at {url} after {:?}; daemon log:\n{}",
                    start.elapsed(),
                    tail(&daemon.log(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A free `127.0.0.1:PORT` for the admin API.
pub fn free_listen() -> String {
    format!("127.0.0.1:{}", llmq_testkit::free_port())
}
