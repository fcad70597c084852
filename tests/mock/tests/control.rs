//! The `/_mock/*` control routes, secrecy of keys in stats, and the
//! `llmq-mock` binary.

mod common;

use common::*;
use llmq_mock::{KeySpec, KeyState, MockConfig, MockServer, Stats};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const KEY: &str = "sk-control-secret-0000000001";

#[tokio::test]
async fn stats_over_http_match_and_never_contain_raw_keys() {
    let s = MockServer::start(
        MockConfig::default()
            .key(KeySpec::new(KEY).rpm(100))
            .key(KeySpec::new("short-k").state(KeyState::Invalid))
            .key(KeySpec::new("sk-labelled-secret-00000002").label("groq#2")),
    )
    .await
    .unwrap();
    let c = client(&s);
    let body = openai_body("m", "hi", None);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);
    assert_eq!(openai(&c, &s, "short-k", &body).await.status(), 401);
    assert_eq!(
        openai(&c, &s, "sk-labelled-secret-00000002", &body)
            .await
            .status(),
        200
    );
    assert_eq!(
        openai(&c, &s, "sk-unknown-secret-000000003", &body)
            .await
            .status(),
        401
    );

    let text = c
        .get(s.url("/_mock/stats"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for raw in [
        KEY,
        "short-k",
        "sk-labelled-secret-00000002",
        "sk-unknown-secret-000000003",
    ] {
        assert!(!text.contains(raw), "stats leak a key: {text}");
    }
    let over_http: Stats = serde_json::from_str(&text).unwrap();
    let direct = s.stats();
    assert!(!format!("{direct:?}").contains(KEY));
    assert_eq!(
        over_http.keys.keys().collect::<Vec<_>>(),
        direct.keys.keys().collect::<Vec<_>>()
    );
    assert_eq!((over_http.total_calls, over_http.total_accepted), (4, 2));
    assert_eq!(over_http.window_ms, 60_000);
    assert_eq!(over_http.keys["sk-c…0001"].accepted, 1);
    assert_eq!(over_http.keys["sk-c…0001"].rpm, Some(100));
    assert_eq!(over_http.keys["groq#2"].accepted, 1);
    assert_eq!(over_http.keys["unknown"].outcomes["invalid_key"], 1);
    let short = over_http
        .keys
        .keys()
        .find(|k| k.starts_with("key-"))
        .unwrap();
    assert_eq!(over_http.keys[short].outcomes["invalid_key"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn keys_can_be_added_and_replaced_at_runtime() {
    let s = MockServer::start(MockConfig::default()).await.unwrap();
    let c = client(&s);
    let body = openai_body("m", "hi", None);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 401);

    let r = c
        .post(s.url("/_mock/keys"))
        .json(&json!({"keys": [{"key": KEY, "rpm": 1, "label": "late"}]}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v["labels"].clone()), (200, json!(["late"])));
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 200);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 429);

    // Replacing the spec resets the limiter but keeps the counters.
    s.add_keys(vec![KeySpec::new(KEY)
        .label("late")
        .state(KeyState::NoCredit)]);
    assert_eq!(openai(&c, &s, KEY, &body).await.status(), 429);
    let k = &s.stats().keys["late"];
    assert_eq!(
        (k.calls, k.accepted, k.rejected_429, k.outcomes["no_credit"]),
        (3, 1, 1, 1)
    );

    let r = c
        .post(s.url("/_mock/keys"))
        .json(&json!([{"key": "x", "bogus": 1}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(!r.text().await.unwrap().contains("\"x\""));
    s.shutdown().await;
}

#[tokio::test]
async fn reset_clears_stats_and_health_answers() {
    let s = MockServer::start(MockConfig::default().key(KeySpec::new(KEY).label("k")))
        .await
        .unwrap();
    let c = client(&s);
    assert_eq!(
        openai(&c, &s, KEY, &openai_body("m", "hi", None))
            .await
            .status(),
        200
    );
    assert_eq!(s.stats().total_calls, 1);
    let r = c.post(s.url("/_mock/reset")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let st = s.stats();
    assert_eq!((st.total_calls, st.keys["k"].peak_window_accepted), (0, 0));
    let (status, v) = json_of(c.get(s.url("/_mock/health")).send().await.unwrap()).await;
    assert_eq!((status, v), (200, json!({"status": "ok"})));
    s.shutdown().await;
}

/// Kills the child process when the test ends, even on failure.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the binary with `args`, returning the child and its first `lines`
/// stdout lines.
async fn run_bin(args: Vec<std::ffi::OsString>, lines: usize) -> (Child, Vec<String>) {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_llmq-mock"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let read = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout);
        (0..lines)
            .map(|_| {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                line.trim().to_owned()
            })
            .collect()
    })
    .await
    .unwrap();
    (child, read)
}

#[tokio::test]
async fn the_binary_prints_its_address_and_ca_and_serves_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mock.json");
    let copy = dir.path().join("ca-copy.pem");
    let config = MockConfig::default()
        .window_ms(5_000)
        .key(KeySpec::new(KEY).rpm(1).label("bin"));
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    let (child, lines) = run_bin(
        vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--config".into(),
            path.into(),
            "--ca-out".into(),
            copy.clone().into(),
        ],
        2,
    )
    .await;
    let base = lines[0].strip_prefix("listening on ").unwrap().to_owned();
    assert!(base.starts_with("https://localhost:"), "{lines:?}");
    let ca_file = lines[1].strip_prefix("ca file: ").unwrap();
    let pem = std::fs::read(ca_file).unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), pem);

    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let send = || {
        c.post(format!("{base}/openai/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&openai_body("m", "hi", None))
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );
    assert_eq!(send().await.unwrap().status(), 429);
    let st: Stats = c
        .get(format!("{base}/_mock/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (st.keys["bin"].accepted, st.keys["bin"].rejected_429),
        (1, 1)
    );
    assert_eq!(st.http_versions["HTTP/2.0"], 2);
    drop(child);
}

#[tokio::test]
async fn the_binary_serves_plain_http_on_request() {
    let (child, lines) = run_bin(
        vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--plain-http".into(),
        ],
        1,
    )
    .await;
    let base = lines[0].strip_prefix("listening on ").unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{lines:?}");
    let r = reqwest::get(format!("{base}/_mock/health")).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_11)
    );
    drop(child);
}
