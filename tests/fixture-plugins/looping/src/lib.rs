//! A plugin whose `parse` does not return for 10 s (a busy loop, as a
//! plugin stuck in a bug would be): the host must fail the job at its call
//! time limit (`[plugins] call_timeout`) and keep serving other jobs.
//! `prepare` is an ordinary OpenAI-style request, so the call reaches the
//! upstream first.

use llmq_sdk::{HttpRequest, HttpResponse, Manifest, Parsed, Plugin, PluginError, PrepareInput};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Looping;

/// How long `parse` spins.
const SPIN: Duration = Duration::from_secs(10);

impl Plugin for Looping {
    fn manifest() -> Manifest {
        Manifest {
            name: "looping".into(),
            version: "0.0.1".into(),
            protocols: vec!["openai-chat".into()],
            providers: vec![],
        }
    }

    fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
        let body = serde_json::json!({
            "model": input.request.model,
            "messages": input.request.messages,
        });
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(key) = &input.api_key {
            headers.push(("authorization".to_string(), format!("Bearer {key}")));
        }
        Ok(HttpRequest {
            method: "POST".into(),
            url: format!("{}/chat/completions", input.provider.base_url),
            headers,
            body: body.to_string(),
        })
    }

    fn parse(_response: &HttpResponse) -> Result<Parsed, PluginError> {
        let start = Instant::now();
        let mut spins = 0u64;
        while start.elapsed() < SPIN {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        Err(PluginError {
            message: format!("looping plugin: gave up after {spins} spins"),
        })
    }
}

llmq_sdk::export_plugin!(Looping);
