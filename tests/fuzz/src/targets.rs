//! The fuzz targets: each takes raw bytes, feeds them to one input surface of
//! llmq the way the daemon does, and panics when an invariant breaks. A panic
//! anywhere below (in llmq or in a check here) is a crash.

use llmq::config::{self, Config};
use llmq::job::{self, Job, DEFAULT_MAX_JOB_BYTES};
use llmq::keys::{load_keys, mask, EnvSource, KeyRing};
use llmq::pool::{Acquire, AcquireRequest, KeyPool};
use llmq::router::RouteTable;
use llmq_sdk::{ChatRequest, HttpResponse, Parsed, Plugin, PrepareInput, ProviderInfo};
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The secret handed to `prepare` by the job target.
const JOB_SECRET: &str = "sk-FUZZSECRET-job-0123456789abcdef";

/// The built-in config (defaults and catalog, no file) and its routes, as if
/// every provider had a key.
fn base() -> &'static (Config, RouteTable) {
    static BASE: OnceLock<(Config, RouteTable)> = OnceLock::new();
    BASE.get_or_init(|| {
        let cfg = config::load_from_str("", "fuzz").expect("the built-in config loads");
        let routes = RouteTable::new(&cfg, |_| true);
        (cfg, routes)
    })
}

/// A job body, as the queue reads it (`parse_job`), then what the executor
/// does with an accepted job before any I/O: deadline math, the route plan,
/// the token charge, and `prepare` in every first-party plugin.
pub fn job(data: &[u8]) -> bool {
    let job = match job::parse_job(data, DEFAULT_MAX_JOB_BYTES) {
        Ok(job) => job,
        Err((e, id)) => {
            assert!(!e.to_string().is_empty(), "a refusal says why");
            if let Some(id) = id {
                assert!(
                    job::valid_id(&id),
                    "the id returned with a refusal is valid"
                );
            }
            return false;
        }
    };
    job.validate().expect("an accepted job validates");
    assert!(job::valid_id(&job.id), "an accepted job has a valid id");

    // The result and dead-letter paths write the job back as JSON; what is
    // written must read back as the same job.
    let text = serde_json::to_vec(&job).expect("an accepted job serializes");
    let again = job::parse_job(&text, usize::MAX).expect("an accepted job, written back, parses");
    assert_eq!(comparable(&again), comparable(&job));
    assert!(close_f32(again.temperature, job.temperature));
    assert!(close_f64(again.route.max_cost_usd, job.route.max_cost_usd));

    // The executor's deadline: `now + deadline_s` on the monotonic clock.
    if let Some(d) = job.deadline_s {
        let limit = Duration::from_secs(d);
        assert!(
            Instant::now().checked_add(limit).is_some()
                && Duration::from_secs(100 * 365 * 86_400)
                    .checked_add(limit)
                    .is_some(),
            "deadline_s {d} was accepted but overflows the executor's clock math"
        );
    }

    let _ = job.needed_capabilities();
    let _ = job.last_user_text();
    let (_, routes) = base();
    let models: Vec<Option<&str>> = if job.models.is_empty() {
        vec![None]
    } else {
        job.models
            .iter()
            .take(40)
            .map(|m| Some(m.as_str()))
            .collect()
    };
    for model in &models {
        if let Ok(plan) = routes.plan(&job, *model) {
            for r in plan.routes.iter().take(3) {
                let _ = r.estimate_cost(plan.prompt_tokens, plan.max_tokens);
            }
        }
    }
    let _ = routes.explain_data(&job);

    let request = ChatRequest {
        model: job
            .model
            .clone()
            .or_else(|| job.models.first().cloned())
            .unwrap_or_else(|| "fuzz-model".into()),
        messages: job.messages.clone(),
        max_tokens: job.max_tokens,
        temperature: job.temperature,
        json: job.require.contains(&job::Capability::Json),
    };
    let _ = llmq_sdk::estimate::charged_tokens(&request);
    for (plugin, base_url) in [
        ("openai", "https://api.openai.com/v1"),
        ("anthropic", llmq_plugin_anthropic::DEFAULT_BASE_URL),
        ("gemini", llmq_plugin_gemini::DEFAULT_BASE_URL),
    ] {
        let input = PrepareInput {
            request: request.clone(),
            api_key: Some(JOB_SECRET.into()),
            provider: ProviderInfo {
                name: plugin.into(),
                base_url: base_url.into(),
                options: Default::default(),
            },
        };
        match plugin {
            "openai" => check_prepare::<llmq_plugin_openai::OpenAiPlugin>(&input),
            "anthropic" => check_prepare::<llmq_plugin_anthropic::Anthropic>(&input),
            _ => check_prepare::<llmq_plugin_gemini::Gemini>(&input),
        };
    }
    true
}

/// The job less what JSON need not give back bit for bit: `metadata` and
/// the floats (serde_json's float parsing is best-effort to the last bit
/// without its `float_roundtrip` feature), compared on their own.
fn comparable(job: &Job) -> Job {
    let mut j = job.clone();
    j.metadata = None;
    j.temperature = None;
    j.route.max_cost_usd = None;
    j
}

fn close_f32(a: Option<f32>, b: Option<f32>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= f32::EPSILON * a.abs().max(b.abs()),
        (a, b) => a.is_none() && b.is_none(),
    }
}

fn close_f64(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs()),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// A plugin's `parse`: the bytes are an [`HttpResponse`] as JSON (what the
/// host sends through the ABI); bytes that are not one are the body of a
/// response whose status comes from their length. True when the bytes were
/// a whole response.
pub fn parse<P: Plugin>(data: &[u8]) -> bool {
    let whole = serde_json::from_slice::<HttpResponse>(data);
    let read = whole.is_ok();
    let response = whole.unwrap_or_else(|_| {
        const STATUSES: [u16; 8] = [200, 400, 401, 403, 404, 413, 429, 503];
        HttpResponse {
            status: STATUSES[data.len() % STATUSES.len()],
            headers: vec![("content-type".into(), "application/json".into())],
            body: String::from_utf8_lossy(data).into_owned(),
            received_at_unix_ms: 1_714_564_800_000,
        }
    });
    match P::parse(&response) {
        Ok(parsed) => {
            // The host reads the answer back from JSON: it must be readable.
            let json = serde_json::to_vec(&parsed).expect("a parse answer serializes");
            let back: Parsed = serde_json::from_slice(&json).expect("the host reads the answer");
            assert_eq!(back.outcome.name(), parsed.outcome.name());
            assert!(llmq_sdk::Outcome::KINDS.contains(&parsed.outcome.name()));
        }
        Err(e) => assert!(!e.message.is_empty(), "a refusal says why"),
    }
    read
}

/// A plugin's `prepare`: the bytes are a [`PrepareInput`] as JSON (what the
/// host sends); bytes that are not one are refused by the ABI shim before the
/// plugin sees them, so only readable inputs go on. True when the plugin
/// made a request.
pub fn prepare<P: Plugin>(data: &[u8]) -> bool {
    match serde_json::from_slice::<PrepareInput>(data) {
        Ok(input) => check_prepare::<P>(&input),
        Err(_) => false,
    }
}

/// True when the plugin made a request.
fn check_prepare<P: Plugin>(input: &PrepareInput) -> bool {
    // The key may only travel in a header, and never in an error. Checked
    // when the key is long enough to be told apart and appears nowhere else
    // in the input (a prompt may quote it).
    let secret = input.api_key.as_deref().filter(|s| {
        let rest = serde_json::to_string(&PrepareInput {
            api_key: None,
            ..input.clone()
        })
        .unwrap_or_default();
        s.len() >= 12 && !rest.contains(*s)
    });
    match P::prepare(input) {
        Ok(req) => {
            let json = serde_json::to_vec(&req).expect("a request serializes");
            let _: llmq_sdk::HttpRequest =
                serde_json::from_slice(&json).expect("the host reads the request");
            assert!(!req.method.is_empty(), "a request has a method");
            serde_json::from_str::<serde_json::Value>(&req.body)
                .expect("a first-party plugin's body is JSON");
            if let Some(s) = secret {
                assert!(!req.url.contains(s), "the key leaked into the URL");
                assert!(!req.body.contains(s), "the key leaked into the body");
            }
            true
        }
        Err(e) => {
            assert!(!e.message.is_empty(), "a refusal says why");
            if let Some(s) = secret {
                assert!(!e.message.contains(s), "the key leaked into an error");
            }
            false
        }
    }
}

/// The key loader: the bytes as a `.env` file (read the way `--env-file`
/// is), and the same lines as process-env pairs; then the keys of the
/// built-in providers, and the pool that limits them. True when the file
/// gave at least one key.
pub fn env_keys(data: &[u8]) -> bool {
    thread_local! {
        static FILE: tempfile::NamedTempFile =
            tempfile::NamedTempFile::new().expect("a temp file for .env text");
    }
    let from_file = FILE.with(|f| {
        std::fs::write(f.path(), data).expect("write the .env text");
        EnvSource::default().with_env_file(f.path())
    });
    let pairs: Vec<(String, String)> = String::from_utf8_lossy(data)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect();
    let from_pairs = EnvSource::from_pairs(pairs);
    let keys = match from_file {
        Ok(env) => check_keys(&env),
        Err(e) => {
            assert_no_secret(&e.to_string(), &secrets_of(&from_pairs), "a .env error");
            false
        }
    };
    check_keys(&from_pairs);
    keys
}

/// The secrets of the fuzz seeds: values of `…API_KEY…` variables that
/// contain `FUZZ` (comma lists split), and that are not part of any name or
/// of another variable's value (a model list may quote anything). None may
/// show up in errors, reports or `Debug` output.
fn secrets_of(env: &EnvSource) -> Vec<String> {
    let names: Vec<&str> = env.names().collect();
    let value = |n: &str| {
        env.secret(n)
            .map(|s| s.expose_secret().to_string())
            .unwrap_or_default()
    };
    let others: Vec<String> = names
        .iter()
        .filter(|n| !n.contains("API_KEY"))
        .map(|n| value(n))
        .collect();
    names
        .iter()
        .filter(|n| n.contains("API_KEY"))
        .flat_map(|n| {
            value(n)
                .split(',')
                .map(|v| v.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|v| v.len() >= 8 && v.contains("FUZZ"))
        .filter(|v| !names.iter().any(|n| n.contains(v.as_str())))
        .filter(|v| !others.iter().any(|o| o.contains(v.as_str())))
        .collect()
}

fn assert_no_secret(text: &str, secrets: &[String], what: &str) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "a secret leaked into {what}");
    }
}

/// True when the env gave at least one key.
fn check_keys(env: &EnvSource) -> bool {
    let secrets = secrets_of(env);
    let (cfg, _) = base();
    let ring = match load_keys(&cfg.providers, env) {
        Ok(ring) => ring,
        Err(e) => {
            assert_no_secret(&e.to_string(), &secrets, "a key error");
            return false;
        }
    };
    assert_no_secret(&format!("{ring:?}"), &secrets, "the key ring's Debug");
    let report = serde_json::to_string(ring.report()).expect("the key report serializes");
    assert_no_secret(&report, &secrets, "the key report");
    for key in ring.iter() {
        assert_no_secret(&key.to_string(), &secrets, "a key's Display");
        if let Some(s) = key.expose_secret() {
            let n = s.chars().count();
            if n >= 2 {
                assert!(
                    mask(s).chars().count() < n,
                    "the masked form of a {n}-character key shows all of it"
                );
            }
        }
    }
    exercise_pool(cfg, &ring);
    !ring.is_empty()
}

/// What `serve` builds from a config and keys before taking jobs: the pool
/// (one limiter per key) and the routes; then one acquire per route.
fn exercise_pool(cfg: &Config, ring: &KeyRing) {
    let clock: llmq::clock::SharedClock =
        Arc::new(llmq::clock::ManualClock::new(1_714_564_800_000));
    let pool = KeyPool::new(cfg, ring, clock);
    let routes = RouteTable::new(cfg, |p| !ring.for_provider(p).is_empty());
    let probe = job::Job {
        id: String::new(),
        messages: vec![job::user_message("hello")],
        model: None,
        models: Vec::new(),
        require: Vec::new(),
        max_tokens: None,
        temperature: None,
        route: Default::default(),
        deadline_s: None,
        metadata: None,
    };
    if let Ok(plan) = routes.plan(&probe, None) {
        for route in plan.routes.iter().take(8) {
            let req = AcquireRequest {
                provider: &route.provider,
                model: &route.model,
                tokens: plan.prompt_tokens + plan.max_tokens,
                strategy: None,
                pinned: None,
                instance: None,
            };
            if let Acquire::Granted(permit) = pool.try_acquire(&req) {
                drop(permit);
            }
        }
    }
    let _ = pool.snapshot();
}

/// The config loader: TOML text over the catalog, validated; then the keys,
/// pool and routes a valid config leads to. True when the config is valid.
pub fn config(data: &[u8]) -> bool {
    // `config::load` reads the file with `read_to_string`: not UTF-8 is an
    // I/O error before any parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let cfg = match config::load_from_str(text, "fuzz.toml") {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "a refusal says why");
            return false;
        }
    };
    let vars: BTreeMap<String, String> = cfg
        .providers
        .keys()
        .enumerate()
        .map(|(i, p)| {
            (
                format!("{}_API_KEY", config::default_keys_env(p)),
                format!("sk-FUZZSECRET-config-{i:04}-abcdefgh"),
            )
        })
        .collect();
    let env = EnvSource::from_pairs(vars);
    match load_keys(&cfg.providers, &env) {
        Ok(ring) => exercise_pool(&cfg, &ring),
        Err(e) => assert_no_secret(&e.to_string(), &secrets_of(&env), "a key error"),
    }
    true
}
