//! An in-memory `AdminBackend` for the admin API tests, and a helper that
//! serves the admin router on 127.0.0.1:0 with a real TcpListener.
#![allow(dead_code)] // each test binary uses a different part of this file

use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use llmq::admin::{
    AdminBackend, AdminError, KeyLimits, KeyView, KeyViewStatus, LaneDepth, QueueView, Readiness,
    UsageCount, UsageRow,
};
use secrecy::SecretString;
use serde_json::{json, Value};

/// A secret that the fake's keys stand for. It must never appear in any
/// response: the views only carry [`FAKE_MASKED`].
pub const FAKE_SECRET: &str = "gsk_test_SUPERSECRET_fake_KEY_x9f2";
/// The masked form of [`FAKE_SECRET`].
pub const FAKE_MASKED: &str = "gsk_…x9f2";

/// What the fake saw and what it answers.
#[derive(Default)]
pub struct FakeState {
    pub keys: Vec<KeyView>,
    pub resets: Vec<String>,
    pub disables: Vec<(String, String)>,
    pub usage_calls: Vec<Option<String>>,
    pub route_jobs: Vec<Option<Value>>,
    pub runs: Vec<Value>,
    pub ready: Readiness,
    pub queue: QueueView,
    /// When set, `queue()` fails with this.
    pub queue_error: Option<AdminError>,
}

pub struct FakeBackend {
    state: Mutex<FakeState>,
}

impl FakeBackend {
    pub fn new(keys: Vec<KeyView>) -> Arc<FakeBackend> {
        Arc::new(FakeBackend {
            state: Mutex::new(FakeState {
                keys,
                ready: Readiness {
                    redis: true,
                    plugins: 3,
                },
                queue: QueueView {
                    lanes: vec![
                        LaneDepth {
                            lane: "high".into(),
                            depth: 1,
                        },
                        LaneDepth {
                            lane: "normal".into(),
                            depth: 7,
                        },
                        LaneDepth {
                            lane: "low".into(),
                            depth: 0,
                        },
                    ],
                    in_flight: 2,
                    delayed: 3,
                    dead: 1,
                    throughput_per_s: None,
                },
                ..FakeState::default()
            }),
        })
    }

    /// The usual fixture: `groq#1` disabled, `groq#2` cooling, `openai#0` available.
    pub fn standard() -> Arc<FakeBackend> {
        FakeBackend::new(vec![
            key("groq#1", KeyViewStatus::Disabled),
            key("groq#2", KeyViewStatus::Cooling),
            key("openai#0", KeyViewStatus::Available),
        ])
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    pub fn resets(&self) -> Vec<String> {
        self.state().resets.clone()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut KeyView)) -> Result<KeyView, AdminError> {
        let mut st = self.state();
        let k = st
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| AdminError::NotFound(format!("no key {id}")))?;
        f(k);
        Ok(k.clone())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A key view with some usage, masked as [`FAKE_MASKED`].
pub fn key(id: &str, status: KeyViewStatus) -> KeyView {
    let (provider, instance) = id.split_once('#').unwrap();
    KeyView {
        id: id.into(),
        provider: provider.into(),
        instance: instance.parse().unwrap(),
        masked: FAKE_MASKED.into(),
        account: None,
        status,
        reason: match status {
            KeyViewStatus::Disabled => Some("auth_failed: invalid API key".into()),
            KeyViewStatus::Cooling => Some("rate_limited".into()),
            KeyViewStatus::Available => None,
        },
        cooldown_until_ms: (status == KeyViewStatus::Cooling).then(|| now_ms() + 90_000),
        cooldown_remaining_ms: (status == KeyViewStatus::Cooling).then_some(90_000),
        limits: KeyLimits {
            rpm: Some(30),
            tpm: Some(6000),
            rpd: Some(14400),
            tpd: None,
            max_concurrent: Some(5),
        },
        window: UsageCount {
            requests: 3,
            tokens: 1200,
        },
        today: UsageCount {
            requests: 40,
            tokens: 9000,
        },
        in_flight: 1,
        requests: 40,
        failures: 2,
        rate_limited: 1,
        tokens_in: 6000,
        tokens_out: 3000,
        cost_usd: 0.0123,
        last_used_ms: Some(1_700_000_000_000),
        parked_models: vec![],
    }
}

impl AdminBackend for FakeBackend {
    fn keys(&self) -> BoxFuture<'_, Result<Vec<KeyView>, AdminError>> {
        Box::pin(async move {
            let mut keys = self.state().keys.clone();
            // Like the real pool: the remaining cooldown shrinks as time passes.
            for k in &mut keys {
                k.cooldown_remaining_ms = k.cooldown_until_ms.map(|u| u.saturating_sub(now_ms()));
            }
            Ok(keys)
        })
    }

    fn reset_key(&self, id: &str) -> BoxFuture<'_, Result<KeyView, AdminError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let v = self.update(&id, |k| {
                k.status = KeyViewStatus::Available;
                k.reason = None;
                k.cooldown_until_ms = None;
                k.cooldown_remaining_ms = None;
            })?;
            self.state().resets.push(id);
            Ok(v)
        })
    }

    fn disable_key(&self, id: &str, reason: &str) -> BoxFuture<'_, Result<KeyView, AdminError>> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        Box::pin(async move {
            let v = self.update(&id, |k| {
                k.status = KeyViewStatus::Disabled;
                k.reason = Some(reason.clone());
            })?;
            self.state().disables.push((id, reason));
            Ok(v)
        })
    }

    fn usage(&self, since: Option<&str>) -> BoxFuture<'_, Result<Vec<UsageRow>, AdminError>> {
        let since = since.map(str::to_owned);
        Box::pin(async move {
            self.state().usage_calls.push(since);
            Ok(vec![UsageRow {
                day: "2024-05-01".into(),
                key: "groq#1".into(),
                provider: "groq".into(),
                model: "llama-3.1-8b-instant".into(),
                requests: 12,
                tokens_in: 340,
                tokens_out: 560,
                cost_usd: 0.0,
            }])
        })
    }

    fn routes(&self, job: Option<Value>) -> BoxFuture<'_, Result<Value, AdminError>> {
        Box::pin(async move {
            self.state().route_jobs.push(job);
            Ok(
                json!([{"provider": "groq", "model": "llama-3.1-8b-instant", "key": "groq#2", "tier": "free"}]),
            )
        })
    }

    fn queue(&self) -> BoxFuture<'_, Result<QueueView, AdminError>> {
        Box::pin(async move {
            let st = self.state();
            match &st.queue_error {
                Some(e) => Err(e.clone()),
                None => Ok(st.queue.clone()),
            }
        })
    }

    fn run(&self, body: Value) -> BoxFuture<'_, Result<Value, AdminError>> {
        Box::pin(async move {
            self.state().runs.push(body.clone());
            Ok(
                json!({"id": "run-1", "successful": 1, "failed": 0, "responses": [{"status": "succeeded", "output": "hi"}]}),
            )
        })
    }

    fn ready(&self) -> BoxFuture<'_, Readiness> {
        Box::pin(async move { self.state().ready })
    }

    fn cluster(&self) -> BoxFuture<'_, Result<Value, AdminError>> {
        Box::pin(async move { Ok(json!([])) })
    }
}

/// The admin router served on 127.0.0.1:0; shuts down on drop.
pub struct AdminServer {
    pub base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves `backend` behind the admin router (with the metrics recorder).
pub async fn serve_admin(backend: Arc<dyn AdminBackend>, token: Option<&str>) -> AdminServer {
    let metrics = llmq::metrics::install().unwrap();
    let router = llmq::admin::router(
        backend,
        token.map(|t| SecretString::from(t.to_owned())),
        Some(metrics),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        llmq::admin::serve(listener, router, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    AdminServer {
        base,
        shutdown: Some(tx),
    }
}
