//! The admin HTTP API over a real socket: auth on every route, the bodies,
//! the error mapping, readiness, `/metrics`, the dashboard page, the
//! loopback rule and "no secret in any response".

#[path = "support/fake_admin.rs"]
mod fake_admin;

use std::net::SocketAddr;

use fake_admin::{serve_admin, FakeBackend, FAKE_MASKED, FAKE_SECRET};
use llmq::admin::{
    check_listen, AdminError, KeyView, KeyViewStatus, QueueView, Readiness, UsageRow,
};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};

const TOKEN: &str = "admin-t0ken-for-tests";
const JOB: &str = r#"{"messages":[{"role":"user","content":"hi"}],"model":"llama-3.1-8b-instant"}"#;

/// Every route that needs the token: (method, path, body).
const PROTECTED: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/v1/keys", None),
    ("POST", "/v1/keys/groq%231/reset", None),
    (
        "POST",
        "/v1/keys/groq%232/disable",
        Some(r#"{"reason":"rotated"}"#),
    ),
    ("GET", "/v1/usage?since=2024-05-01", None),
    ("GET", "/v1/routes", None),
    ("POST", "/v1/routes", Some(JOB)),
    ("GET", "/v1/queue", None),
    ("POST", "/v1/run", Some(JOB)),
    ("GET", "/v1/cluster", None),
    ("GET", "/metrics", None),
];

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut req = client().request(
        Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{base}{path}"),
    );
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

#[tokio::test]
async fn every_protected_route_needs_the_token() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let wrong = [
        None,
        Some("Bearer nope-not-it"),
        Some("Basic YWRtaW46YWRtaW4="),
        Some("Bearer "),
        Some(TOKEN),
    ];
    for &(method, path, body) in PROTECTED {
        for auth in wrong {
            let (status, headers, text) = call(&srv.base, method, path, body, auth).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {auth:?}"
            );
            assert_eq!(headers["www-authenticate"], "Bearer", "{method} {path}");
            let err: Value = serde_json::from_str(&text).unwrap();
            assert!(err["error"].as_str().unwrap().contains("token"), "{text}");
            assert!(
                !text.contains("nope-not-it") && !text.contains("YWRtaW4"),
                "401 echoes the credentials: {text}"
            );
        }
    }
    // Nothing reached the backend.
    {
        let st = fake.state();
        assert!(
            st.resets.is_empty()
                && st.disables.is_empty()
                && st.runs.is_empty()
                && st.route_jobs.is_empty()
        );
    }
    for &(method, path, body) in PROTECTED {
        let (status, _, text) = call(&srv.base, method, path, body, Some(&bearer())).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {text}");
        // The scheme is case-insensitive.
        let (status, _, _) = call(
            &srv.base,
            method,
            path,
            body,
            Some(&format!("bearer {TOKEN}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{method} {path} lowercase scheme");
    }
}

#[tokio::test]
async fn without_a_configured_token_every_route_is_open() {
    let srv = serve_admin(FakeBackend::standard(), None).await;
    for &(method, path, body) in PROTECTED {
        let (status, _, text) = call(&srv.base, method, path, body, None).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {text}");
    }
}

#[tokio::test]
async fn a_blank_token_counts_as_no_token() {
    let srv = serve_admin(FakeBackend::standard(), Some("  ")).await;
    let (status, _, _) = call(&srv.base, "GET", "/v1/keys", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let blank = SecretString::from("  ".to_owned());
    assert!(check_listen(&"0.0.0.0:9090".parse().unwrap(), Some(&blank)).is_err());
}

#[tokio::test]
async fn keys_lists_the_backend_views() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let (status, headers, text) = call(&srv.base, "GET", "/v1/keys", None, Some(&bearer())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "no-store");
    let mut keys: Vec<KeyView> = serde_json::from_str(&text).unwrap();
    let remaining = keys[1].cooldown_remaining_ms.take().unwrap();
    assert!((80_000..=90_000).contains(&remaining), "{remaining}");
    let mut expected = fake.state().keys.clone();
    expected[1].cooldown_remaining_ms = None;
    assert_eq!(keys, expected);
    let raw: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(raw[0]["status"], "disabled");
    assert_eq!(raw[1]["status"], "cooling");
    assert!(raw[1]["cooldown_remaining_ms"].is_u64());
    assert_eq!(raw[0]["limits"]["rpm"], 30);
    assert_eq!(raw[0]["window"]["tokens"], 1200);
    assert_eq!(raw[0]["masked"], FAKE_MASKED);
}

#[tokio::test]
async fn reset_clears_a_key_and_unknown_ids_are_404() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let (status, _, text) = call(
        &srv.base,
        "POST",
        "/v1/keys/groq%231/reset",
        None,
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let view: KeyView = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (view.id.as_str(), view.status),
        ("groq#1", KeyViewStatus::Available)
    );
    assert_eq!(fake.resets(), vec!["groq#1".to_owned()]);

    let (status, _, text) = call(
        &srv.base,
        "POST",
        "/v1/keys/groq%2399/reset",
        None,
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let err: Value = serde_json::from_str(&text).unwrap();
    assert!(err["error"].as_str().unwrap().contains("groq#99"), "{text}");
    assert_eq!(fake.resets().len(), 1);
}

#[tokio::test]
async fn disable_takes_an_optional_reason() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let (status, _, text) = call(
        &srv.base,
        "POST",
        "/v1/keys/openai%230/disable",
        Some(r#"{"reason":"over budget"}"#),
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let view: KeyView = serde_json::from_str(&text).unwrap();
    assert_eq!(view.status, KeyViewStatus::Disabled);
    assert_eq!(view.reason.as_deref(), Some("over budget"));

    let (status, _, _) = call(
        &srv.base,
        "POST",
        "/v1/keys/groq%232/disable",
        None,
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, text) = call(
        &srv.base,
        "POST",
        "/v1/keys/groq%232/disable",
        Some("{not json"),
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
    let (status, _, _) = call(
        &srv.base,
        "POST",
        "/v1/keys/nope%230/disable",
        Some(r#"{"reason":"x"}"#),
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    assert_eq!(
        fake.state().disables,
        vec![
            ("openai#0".to_owned(), "over budget".to_owned()),
            ("groq#2".to_owned(), "disabled by operator".to_owned()),
        ]
    );
}

#[tokio::test]
async fn usage_passes_a_validated_since() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let (status, _, text) = call(
        &srv.base,
        "GET",
        "/v1/usage?since=2024-05-01",
        None,
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let rows: Vec<UsageRow> = serde_json::from_str(&text).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].key.as_str(), rows[0].requests), ("groq#1", 12));
    let (status, _, _) = call(&srv.base, "GET", "/v1/usage", None, Some(&bearer())).await;
    assert_eq!(status, StatusCode::OK);
    for bad in ["yesterday", "2024-02-30", "2024-5-1"] {
        let (status, _, text) = call(
            &srv.base,
            "GET",
            &format!("/v1/usage?since={bad}"),
            None,
            Some(&bearer()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {text}");
    }
    assert_eq!(
        fake.state().usage_calls,
        vec![Some("2024-05-01".to_owned()), None]
    );
}

#[tokio::test]
async fn routes_takes_a_job_by_query_or_body() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let job: Value = serde_json::from_str(JOB).unwrap();
    let url = reqwest::Url::parse_with_params(&format!("{}/v1/routes", srv.base), &[("job", JOB)])
        .unwrap();
    let resp = client()
        .get(url)
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let routes: Value = resp.json().await.unwrap();
    assert_eq!(routes[0]["key"], "groq#2");

    let (status, _, _) = call(&srv.base, "POST", "/v1/routes", Some(JOB), Some(&bearer())).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&srv.base, "GET", "/v1/routes", None, Some(&bearer())).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        &srv.base,
        "GET",
        "/v1/routes?job=%7Bbroken",
        None,
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = call(
        &srv.base,
        "POST",
        "/v1/routes",
        Some("[1,"),
        Some(&bearer()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    assert_eq!(
        fake.state().route_jobs,
        vec![Some(job.clone()), Some(job), None]
    );
}

#[tokio::test]
async fn queue_run_and_cluster_bodies() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let (_, _, text) = call(&srv.base, "GET", "/v1/queue", None, Some(&bearer())).await;
    let q: QueueView = serde_json::from_str(&text).unwrap();
    assert_eq!(q, fake.state().queue);

    let (status, _, text) = call(&srv.base, "POST", "/v1/run", Some(JOB), Some(&bearer())).await;
    assert_eq!(status, StatusCode::OK);
    let out: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(out["successful"], 1);
    assert_eq!(
        fake.state().runs,
        vec![serde_json::from_str::<Value>(JOB).unwrap()]
    );
    for bad in ["", "nope", "[1,2]"] {
        let (status, _, _) = call(&srv.base, "POST", "/v1/run", Some(bad), Some(&bearer())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
    }
    // Duplicate keys would vanish in the re-serialized job: refused, named.
    let dup = r#"{"id":"a","id":"b","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, text) = call(&srv.base, "POST", "/v1/run", Some(dup), Some(&bearer())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("`id` more than once"), "{text}");
    assert_eq!(fake.state().runs.len(), 1);

    let (status, _, text) = call(&srv.base, "GET", "/v1/cluster", None, Some(&bearer())).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "[]"));
}

#[tokio::test]
async fn backend_errors_map_to_statuses() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    for (err, code) in [
        (
            AdminError::Unavailable("redis down".into()),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            AdminError::Internal("boom".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (AdminError::BadRequest("no".into()), StatusCode::BAD_REQUEST),
        (AdminError::NotFound("gone".into()), StatusCode::NOT_FOUND),
    ] {
        fake.state().queue_error = Some(err.clone());
        let (status, _, text) = call(&srv.base, "GET", "/v1/queue", None, Some(&bearer())).await;
        assert_eq!(status, code, "{err:?}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body, json!({"error": err.to_string()}));
    }
    // Unknown routes: JSON 404 too.
    let (status, _, text) = call(&srv.base, "GET", "/v1/nothing", None, Some(&bearer())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
}

#[tokio::test]
async fn healthz_and_readyz_need_no_token() {
    let fake = FakeBackend::standard();
    let srv = serve_admin(fake.clone(), Some(TOKEN)).await;
    let (status, _, text) = call(&srv.base, "GET", "/healthz", None, None).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ok"));

    let (status, _, text) = call(&srv.base, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["ready"], true);

    fake.state().ready = Readiness {
        redis: false,
        plugins: 3,
    };
    let (status, _, text) = call(&srv.base, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], "redis unreachable");

    fake.state().ready = Readiness {
        redis: true,
        plugins: 0,
    };
    let (status, _, text) = call(&srv.base, "GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"],
        "no plugins loaded"
    );
    // Still healthy: liveness does not depend on Redis.
    let (status, _, _) = call(&srv.base, "GET", "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_renders_every_llmq_metric() {
    use llmq::metrics as m;
    let srv = serve_admin(FakeBackend::standard(), Some(TOKEN)).await;
    // What the executor records, with its exact names.
    metrics::counter!(m::JOBS_TOTAL, "lane" => "normal", "outcome" => "succeeded").increment(2);
    metrics::counter!(m::UPSTREAM_CALLS_TOTAL, "provider" => "groq", "key" => "groq#2", "outcome" => "success").increment(1);
    metrics::counter!(m::TOKENS_TOTAL, "provider" => "groq", "direction" => "input").increment(12);
    metrics::counter!(m::COST_USD_MICROS_TOTAL, "provider" => "groq").increment(5);
    metrics::histogram!(m::LIMITER_WAIT_SECONDS).record(0.02);

    let (status, headers, text) = call(&srv.base, "GET", "/metrics", None, Some(&bearer())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for name in [
        m::JOBS_TOTAL,
        m::UPSTREAM_CALLS_TOTAL,
        m::TOKENS_TOTAL,
        m::COST_USD_MICROS_TOTAL,
        m::KEY_STATE,
        m::LIMITER_WAIT_SECONDS,
        m::QUEUE_DEPTH,
        m::JOBS_IN_FLIGHT,
        m::JOBS_DELAYED,
        m::JOBS_DEAD,
    ] {
        assert!(
            text.contains(&format!("# HELP {name}")),
            "no HELP for {name}:\n{text}"
        );
    }
    let has = |needle: &str| text.lines().any(|l| l == needle);
    assert!(
        has(r#"llmq_jobs_total{lane="normal",outcome="succeeded"} 2"#),
        "{text}"
    );
    assert!(
        has(r#"llmq_upstream_calls_total{provider="groq",key="groq#2",outcome="success"} 1"#),
        "{text}"
    );
    assert!(
        has(r#"llmq_key_state{key="groq#1",state="disabled"} 1"#),
        "{text}"
    );
    assert!(
        has(r#"llmq_key_state{key="groq#1",state="available"} 0"#),
        "{text}"
    );
    assert!(
        has(r#"llmq_key_state{key="groq#2",state="cooling"} 1"#),
        "{text}"
    );
    assert!(has(r#"llmq_queue_depth{lane="normal"} 7"#), "{text}");
    assert!(has("llmq_jobs_in_flight 2"), "{text}");
    assert!(
        text.contains("llmq_limiter_wait_seconds_bucket{le=\"0.05\"}"),
        "histogram, not summary:\n{text}"
    );
}

#[test]
fn metrics_install_is_idempotent() {
    let a = llmq::metrics::install().unwrap();
    let b = llmq::metrics::install().unwrap();
    metrics::counter!("llmq_idempotency_probe").increment(1);
    assert!(a.render().contains("llmq_idempotency_probe"));
    assert!(b.render().contains("llmq_idempotency_probe"));
}

#[tokio::test]
async fn dashboard_page_is_served_with_the_key_table() {
    let srv = serve_admin(FakeBackend::standard(), Some(TOKEN)).await;
    // The page holds no data, so it is served without the token; its fetches need it.
    let (status, headers, html) = call(&srv.base, "GET", "/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("connect-src 'self'"));
    for hook in [
        r#"id="keys""#,
        r#"id="keys-body""#,
        r#"id="auth""#,
        r#"id="token""#,
        r#"id="q-in-flight""#,
        "sessionStorage",
        "data-reset",
    ] {
        assert!(html.contains(hook), "dashboard lacks {hook}");
    }
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page must not load anything remote"
    );
}

#[test]
fn check_listen_requires_a_token_off_loopback() {
    let token = SecretString::from(TOKEN.to_owned());
    let any4: SocketAddr = "0.0.0.0:9090".parse().unwrap();
    let lan: SocketAddr = "192.168.1.5:9090".parse().unwrap();
    let any6: SocketAddr = "[::]:9090".parse().unwrap();
    for addr in [any4, lan, any6] {
        let err = check_listen(&addr, None).unwrap_err();
        assert!(matches!(err, AdminError::BadRequest(_)));
        assert!(err.to_string().contains("token"), "{err}");
        assert!(check_listen(&addr, Some(&token)).is_ok());
    }
    for addr in [
        "127.0.0.1:9090",
        "[::1]:9090",
        "127.0.0.2:1",
        "[::ffff:127.0.0.1]:9090",
    ] {
        assert!(check_listen(&addr.parse().unwrap(), None).is_ok(), "{addr}");
    }
}

#[tokio::test]
async fn no_secret_in_any_response() {
    let srv = serve_admin(FakeBackend::standard(), Some(TOKEN)).await;
    let mut seen = 0;
    let extra: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/", None),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("POST", "/v1/keys/none%230/reset", None),
        ("GET", "/v1/usage?since=bad", None),
        ("GET", "/v1/unknown", None),
    ];
    for &(method, path, body) in PROTECTED.iter().chain(extra) {
        for auth in [Some(bearer()), None, Some(format!("Bearer {FAKE_SECRET}"))] {
            let (_, headers, text) = call(&srv.base, method, path, body, auth.as_deref()).await;
            let all = format!("{headers:?}\n{text}");
            assert!(
                !all.contains(FAKE_SECRET),
                "{method} {path} leaks the key secret"
            );
            assert!(
                !all.contains(TOKEN),
                "{method} {path} leaks the admin token"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, (PROTECTED.len() + extra.len()) * 3);
    // The views do carry the masked form.
    let (_, _, text) = call(&srv.base, "GET", "/v1/keys", None, Some(&bearer())).await;
    assert!(text.contains(FAKE_MASKED));
}

#[test]
fn wire_types_round_trip() {
    let k = fake_admin::key("groq#2", KeyViewStatus::Cooling);
    let back: KeyView = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
    assert_eq!(back, k);
    // Optional fields may be absent (older daemons, hand-written fakes).
    let minimal: KeyView = serde_json::from_value(json!({
        "id": "ollama#0", "provider": "ollama", "instance": 0, "masked": "…", "status": "available"
    }))
    .unwrap();
    assert_eq!(minimal.limits.rpm, None);
    assert_eq!(minimal.window.requests, 0);
    let e: AdminError =
        serde_json::from_str(&serde_json::to_string(&AdminError::NotFound("x".into())).unwrap())
            .unwrap();
    assert_eq!(e, AdminError::NotFound("x".into()));
    assert_eq!(
        Readiness {
            redis: true,
            plugins: 0
        }
        .reason()
        .as_deref(),
        Some("no plugins loaded")
    );
}
