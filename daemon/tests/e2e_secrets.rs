//! No API key ever leaves the daemon: known fake secrets go in through the
//! env, a workload with invalid, out-of-credit and suspended keys, injected
//! 500s and 429s, and an upstream that quotes the full key back in its
//! error bodies runs through the real `llmq serve`; then everything the
//! daemon produced is searched for the key material: its logs (human at
//! debug level, JSON at trace level), every admin API answer, `/metrics`, the pub/sub
//! key events, every result and every Redis key and value, and the CLI.

#[path = "support/e2e.rs"]
mod e2e;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use e2e::*;
use llmq::job::Status;
use llmq_mock::{FailureKind, Injection, KeySpec, KeyState, MockConfig, Protocol};
use llmq_testkit::RedisServer;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every secret contains `SECRET` in its hidden middle: that marker must
/// appear nowhere. Each also has a distinct head and tail checked below.
const OA_OK: &str = "sk-test-SECRETSECRET0001";
const OA_INVALID: &str = "sk-test-SECRETINVALID0002";
const OA_BROKE: &str = "sk-proj-test-SECRETNOCREDIT0003";
const GE_OK: &str = "AIza-test-SECRETGEMINIxxxxxxxxxx0001";
const GE_INVALID: &str = "AIza-test-SECRETGEMINIbadbadbad0002";
const AN_OK: &str = "sk-ant-api03-test-SECRETANTHROPIC-0001";
const AN_SUSPENDED: &str = "sk-ant-api03-test-SECRETANTHROPIC-0002";
const AN_BROKE: &str = "sk-ant-api03-test-SECRETANTHROPIC-0003";
/// Keys of a fake upstream that quotes the whole key in its errors.
const ECHO_401: &str = "sk-echo-SECRETQUOTEDBACK-0401";
const ECHO_500: &str = "sk-echo-SECRETQUOTEDBACK-0500";
const ECHO_400: &str = "sk-echo-SECRETQUOTEDBACK-0400";
const ADMIN_TOKEN: &str = "admin-SECRET-token-77f1e0";
const WAIT: Duration = Duration::from_secs(15);

fn secrets() -> Vec<&'static str> {
    vec![
        OA_OK,
        OA_INVALID,
        OA_BROKE,
        GE_OK,
        GE_INVALID,
        AN_OK,
        AN_SUSPENDED,
        AN_BROKE,
        ECHO_401,
        ECHO_500,
        ECHO_400,
        ADMIN_TOKEN,
    ]
}

/// What must not appear: the marker, each whole secret, its first 12 and
/// its last 8 characters (masked forms show at most a vendor prefix and 4).
fn needles() -> Vec<String> {
    let mut n = vec!["SECRET".to_string()];
    for s in secrets() {
        n.push(s.to_string());
        n.push(s[..12].to_string());
        n.push(s[s.len() - 8..].to_string());
    }
    n
}

/// Panics naming the source and the context of any key material in `text`.
fn assert_clean(source: &str, text: &str) {
    for needle in needles() {
        if let Some(at) = text.find(&needle) {
            let from = text[..at]
                .char_indices()
                .rev()
                .nth(120)
                .map_or(0, |(i, _)| i);
            let to = (at + needle.len() + 120).min(text.len());
            let to = (to..=text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(text.len());
            panic!(
                "{source} contains key material {needle:?}:\n…{}…",
                &text[from..to]
            );
        }
    }
}

/// A fake OpenAI-compatible upstream that quotes the caller's key back in
/// every error, the way some providers do: 401 for one key, 500 for
/// another, 400 for the third.
async fn echo_upstream() -> String {
    async fn chat(headers: HeaderMap) -> axum::response::Response {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        let (status, kind, code) = if key.ends_with("0401") {
            (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            )
        } else if key.ends_with("0500") {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
            )
        } else {
            (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_request",
            )
        };
        let body = json!({"error": {
            "message": format!("Request with API key {key} failed (key={key})"),
            "type": kind,
            "param": null,
            "code": code,
        }});
        (status, axum::Json(body)).into_response()
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1")
}

/// Three providers on the mock, and `echo` (retargeted by [`retarget_echo`]).
fn providers() -> Vec<Provider> {
    vec![
        Provider::new("oa", Protocol::OpenAi, "free", "m-oa"),
        Provider::new("ge", Protocol::Gemini, "free", "m-ge"),
        Provider::new("an", Protocol::Anthropic, "free", "m-an"),
        Provider::new("echo", Protocol::OpenAi, "free", "m-echo"),
    ]
}

/// Points `[providers.echo]` at the echoing upstream instead of the mock.
fn retarget_echo(config: &str, echo_base: &str) -> String {
    let at = config.find("[providers.echo]\n").expect("echo provider");
    let line = config[at..].find("base_url = ").expect("echo base_url") + at;
    let end = config[line..].find('\n').unwrap() + line;
    format!(
        "{}base_url = \"{echo_base}\"{}",
        &config[..line],
        &config[end..]
    )
}

/// Pub/sub messages on every channel, captured by a thread.
fn capture_pubsub(redis: &RedisServer) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let out = seen.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ps = conn.as_pubsub();
        ps.psubscribe("*").unwrap();
        let _ = ready_tx.send(());
        while let Ok(msg) = ps.get_message() {
            let payload: String = msg.get_payload().unwrap_or_default();
            out.lock()
                .unwrap()
                .push(format!("{} {payload}", msg.get_channel_name()));
        }
    });
    ready_rx.recv_timeout(WAIT).expect("pubsub subscribed");
    seen
}

/// Every key in Redis with its type and full value, as text.
fn dump_redis(redis: &RedisServer) -> String {
    let mut c = redis.client();
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query(&mut c)
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut out = String::new();
    for k in &keys {
        let kind: String = redis::cmd("TYPE").arg(k).query(&mut c).unwrap();
        let value: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET").arg(k).query(&mut c).unwrap(),
            "hash" => redis::cmd("HGETALL").arg(k).query(&mut c).unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .query(&mut c)
                .unwrap(),
            "set" => redis::cmd("SMEMBERS").arg(k).query(&mut c).unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(&mut c)
                .unwrap(),
            "stream" => {
                let entries: redis::Value = redis::cmd("XRANGE")
                    .arg(k)
                    .arg("-")
                    .arg("+")
                    .query(&mut c)
                    .unwrap();
                let groups: redis::Value = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(k)
                    .query(&mut c)
                    .unwrap_or(redis::Value::Nil);
                redis::Value::Array(vec![entries, groups])
            }
            other => panic!("unexpected Redis type {other} for {k}"),
        };
        out.push_str(&format!("{k} ({kind}) = {}\n", render(&value)));
    }
    out
}

fn render(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(n) => n.to_string(),
        redis::Value::Double(d) => d.to_string(),
        redis::Value::Array(a) | redis::Value::Set(a) => {
            format!("[{}]", a.iter().map(render).collect::<Vec<_>>().join(", "))
        }
        redis::Value::Map(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", render(k), render(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other:?}"),
    }
}

/// Runs the `llmq` CLI with the daemon's config and env; `(code, stdout+stderr)`.
fn cli(config: &std::path::Path, env: &[(String, String)], args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run llmq");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn job_for(id: &str, model: &str) -> Value {
    let mut j = job(id);
    j["model"] = json!(model);
    j
}

async fn secrets_never_leave_the_daemon(log_format: &str, level: &str) {
    let redis = RedisServer::start();
    let events = capture_pubsub(&redis);
    let mock = mock(
        MockConfig::default()
            .key(KeySpec::new(OA_OK).label("oa#1"))
            .key(
                KeySpec::new(OA_INVALID)
                    .label("oa#2")
                    .state(KeyState::Invalid),
            )
            .key(
                KeySpec::new(OA_BROKE)
                    .label("oa#3")
                    .state(KeyState::NoCredit),
            )
            // An rpm, so the injected 429s say "limit: 1000" (a "limit: 0"
            // 429 is Gemini's zero-quota answer: the key would be disabled).
            .key(KeySpec::new(GE_OK).label("ge#1").rpm(1000))
            .key(
                KeySpec::new(GE_INVALID)
                    .label("ge#2")
                    .state(KeyState::Invalid),
            )
            .key(KeySpec::new(AN_OK).label("an#1"))
            .key(
                KeySpec::new(AN_SUSPENDED)
                    .label("an#2")
                    .state(KeyState::Suspended),
            )
            .key(
                KeySpec::new(AN_BROKE)
                    .label("an#3")
                    .state(KeyState::NoCredit),
            ),
    )
    .await;
    mock.inject(
        Some("oa#1"),
        vec![
            Injection::new(FailureKind::Status500, 2),
            Injection::new(FailureKind::RateLimited429, 1).retry_after_ms(200),
        ],
    );
    mock.inject(
        Some("ge#1"),
        vec![Injection::new(FailureKind::RateLimited429, 2).retry_after_ms(200)],
    );
    mock.inject(
        Some("an#1"),
        vec![
            Injection::new(FailureKind::Status500, 1),
            Injection::new(FailureKind::Overloaded529, 1),
        ],
    );
    let echo = echo_upstream().await;
    let listen = free_listen();
    let cfg = with_admin(
        &retarget_echo(
            &config(
                &redis,
                &mock,
                &providers(),
                "[routing]\ndefault_deadline = \"10s\"\n",
            ),
            &echo,
        ),
        &listen,
    );
    let env: Vec<(String, String)> = [
        ("OA_API_KEY_1", OA_OK),
        ("OA_API_KEY_2", OA_INVALID),
        ("OA_API_KEY_3", OA_BROKE),
        ("GE_API_KEY_1", GE_OK),
        ("GE_API_KEY_2", GE_INVALID),
        ("AN_API_KEY_1", AN_OK),
        ("AN_API_KEY_2", AN_SUSPENDED),
        ("AN_API_KEY_3", AN_BROKE),
        ("ECHO_API_KEY_1", ECHO_401),
        ("ECHO_API_KEY_2", ECHO_500),
        ("ECHO_API_KEY_3", ECHO_400),
        ("LLMQ_ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut spec = spec(cfg);
    for (k, v) in &env {
        spec = spec.env(k, v);
    }
    spec = spec.env("LLMQ_LOG", level);
    spec.args
        .extend(["--log-format".to_string(), log_format.to_string()]);
    // The sweep is not vacuous: it catches a secret, a head and a tail.
    for leak in [OA_OK, &GE_OK[..12], &AN_OK[AN_OK.len() - 8..]] {
        let caught = std::panic::catch_unwind(|| assert_clean("control", &format!("x {leak} y")));
        assert!(caught.is_err(), "{leak} not caught");
    }
    let mut daemon = start(&spec);
    let admin = Admin::new(&listen, Some(ADMIN_TOKEN));
    admin.wait_up(&mut daemon, WAIT).await;

    // The workload: every model, with keys that fail in every way.
    let mut ids = Vec::new();
    for (model, n) in [("m-oa", 8), ("m-ge", 6), ("m-an", 6), ("m-echo", 4)] {
        for i in 0..n {
            let id = format!("{model}-{i}");
            push(
                &redis,
                ["high", "normal", "low"][i % 3],
                &job_for(&id, model),
            );
            ids.push(id);
        }
    }
    let results = tokio::task::block_in_place(|| wait_results(&redis, &daemon, &ids, WAIT));
    let mut answers: Vec<(String, String)> = Vec::new();
    for r in &results {
        let ok = r.status == Status::Succeeded;
        assert_eq!(
            ok,
            !r.id.starts_with("m-echo"),
            "{r:?}\n{}",
            tail(&daemon.log(), 40)
        );
    }
    // The upstream quoted keys back; the failed results carry its message.
    let echo_failures: Vec<String> = results
        .iter()
        .filter(|r| r.id.starts_with("m-echo"))
        .filter_map(|r| r.error.as_ref().map(|e| e.message.clone()))
        .collect();
    assert!(
        echo_failures
            .iter()
            .any(|m| m.contains("Request with API key")),
        "the echoing upstream's message reached a result: {echo_failures:?}"
    );
    // A job pinned to a disabled key, and one no route can serve.
    let mut pinned = job_for("pinned-invalid", "m-oa");
    pinned["route"] = json!({"key": "oa#2"});
    push(&redis, "normal", &pinned);
    let mut vision = job_for("needs-vision", "m-oa");
    vision["require"] = json!(["vision"]);
    push(&redis, "normal", &vision);
    push(&redis, "normal", &json!({"id": "no-messages"}));
    let more = ["pinned-invalid", "needs-vision", "no-messages"].map(String::from);
    let failed = tokio::task::block_in_place(|| wait_results(&redis, &daemon, &more, WAIT));
    assert!(
        failed.iter().all(|r| r.status == Status::Failed),
        "{failed:?}"
    );

    // The failures really happened upstream.
    let stats = mock.stats();
    let outcome = |key: &str, what: &str| {
        stats
            .keys
            .get(key)
            .and_then(|k| k.outcomes.get(what))
            .copied()
            .unwrap_or(0)
    };
    assert!(outcome("oa#2", "invalid_key") >= 1, "{stats:?}");
    assert!(outcome("oa#3", "no_credit") >= 1, "{stats:?}");
    assert!(outcome("oa#1", "status_500") == 2, "{stats:?}");
    assert!(outcome("oa#1", "rate_limited_429") == 1, "{stats:?}");
    assert!(outcome("ge#1", "rate_limited_429") == 2, "{stats:?}");
    assert!(outcome("ge#2", "invalid_key") >= 1, "{stats:?}");
    assert!(outcome("an#2", "suspended") >= 1, "{stats:?}");
    assert!(outcome("an#3", "no_credit") >= 1, "{stats:?}");

    // Every admin answer, including errors, fan-out and operator actions.
    let fan = admin
        .post(
            "/v1/run",
            Some(&json!({"messages": [{"role": "user", "content": "all"}],
                         "models": ["m-oa", "m-ge", "m-an", "m-echo"], "max_tokens": 8})),
        )
        .await;
    assert_eq!(fan.status, 200, "{fan:?}");
    assert_eq!(fan.json()["failed"], 1, "only m-echo fails: {}", fan.body);
    answers.push(("POST /v1/run".into(), fan.body));
    for (method, path, body) in [
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys/oa%232/reset", None),
        (
            "POST",
            "/v1/keys/oa%231/disable",
            Some(json!({"reason": "sweep"})),
        ),
        ("POST", "/v1/keys/oa%231/reset", None),
        ("POST", "/v1/keys/nope%231/reset", None),
        ("GET", "/v1/usage", None),
        ("GET", "/v1/usage?since=2000-01-01", None),
        ("GET", "/v1/routes", None),
        ("GET", "/v1/queue", None),
        ("GET", "/v1/cluster", None),
        ("GET", "/metrics", None),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/", None),
        ("GET", "/nope", None),
    ] {
        let a = admin.call(method, path, body.as_ref()).await;
        answers.push((format!("{method} {path} ({})", a.status), a.body));
    }
    // The reset invalid key is tried again and fails again.
    let again: Vec<String> = (0..3).map(|i| format!("again-{i}")).collect();
    for id in &again {
        push(&redis, "normal", &job_for(id, "m-oa"));
    }
    tokio::task::block_in_place(|| wait_results(&redis, &daemon, &again, WAIT));
    let keys = admin.get("/v1/keys").await;
    answers.push(("GET /v1/keys (after)".into(), keys.body.clone()));
    let kj = keys.json();
    let status_of = |id: &str| {
        kj.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .map(|k| k["status"].as_str().unwrap().to_string())
    };
    for id in ["oa#3", "ge#2", "an#2", "an#3", "echo#1"] {
        assert_eq!(status_of(id).as_deref(), Some("disabled"), "{id}: {kj}");
    }
    let metrics = admin.get("/metrics").await;
    assert!(metrics.body.contains(r#"key="oa#2""#), "{}", metrics.body);
    answers.push(("GET /metrics (after)".into(), metrics.body));
    for (what, body) in &answers {
        assert_clean(what, body);
    }

    // The CLI, pointed at the same config and env.
    let cfg_path = daemon.config_path();
    for args in [
        &["check-config"][..],
        &["check-config", "--json"],
        &["routes"],
        &["routes", "--json"],
    ] {
        let (code, out) = cli(&cfg_path, &env, args);
        assert_eq!(code, 0, "llmq {args:?}: {out}");
        assert_clean(&format!("llmq {args:?}"), &out);
    }
    // `keys` and `usage` are being written: check their output when they
    // print one, skip them while they still say "not yet implemented".
    for args in [&["keys"][..], &["keys", "--json"], &["usage"]] {
        let (code, out) = cli(&cfg_path, &env, args);
        if out.contains("not yet implemented") {
            eprintln!("SKIP llmq {args:?}: not implemented yet");
            continue;
        }
        assert_eq!(code, 0, "llmq {args:?}: {out}");
        assert!(out.contains("oa#1"), "llmq {args:?} lists keys: {out}");
        assert_clean(&format!("llmq {args:?}"), &out);
    }

    // Stop (drain + final flush), then everything that stayed behind.
    assert_eq!(daemon.stop(), Some(0), "{}", tail(&daemon.log(), 30));
    let log = daemon.log();
    assert!(log.contains("job finished"), "{}", tail(&log, 30));
    assert!(log.lines().count() > 50, "a debug log has some volume");
    assert_clean(&format!("daemon log ({log_format}, {level})"), &log);
    for r in results.iter().chain(&failed) {
        let stored = result(&redis, &r.id).unwrap();
        assert_clean(
            &format!("result {}", r.id),
            &serde_json::to_string(&stored).unwrap(),
        );
    }
    let dump = dump_redis(&redis);
    for must in [
        "llmq:{key:oa#2}:state",
        "llmq:result:m-echo-0",
        "llmq:dead",
        "llmq:results",
    ] {
        assert!(dump.contains(must), "the dump covers {must}:\n{dump}");
    }
    assert_clean("redis dump", &dump);
    let events = events.lock().unwrap().join("\n");
    assert!(
        events.contains("oa#2"),
        "key events were published: {events}"
    );
    assert_clean("redis pub/sub", &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_anything_with_human_debug_logs() {
    secrets_never_leave_the_daemon("human", "debug").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_anything_with_json_trace_logs() {
    secrets_never_leave_the_daemon("json", "trace").await;
}
