//! A plugin that panics: in `parse` always, in `prepare` when the model is
//! `panic`. The host must turn each panic into one failed job.

use llmq_sdk::{HttpRequest, HttpResponse, Manifest, Parsed, Plugin, PluginError, PrepareInput};

#[derive(Debug)]
pub struct Panicky;

impl Plugin for Panicky {
    fn manifest() -> Manifest {
        Manifest {
            name: "panicky".into(),
            version: "0.0.1".into(),
            protocols: vec!["openai-chat".into()],
            providers: vec![],
        }
    }

    fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
        if input.request.model == "panic" {
            panic!("panicky plugin: prepare was told to panic");
        }
        Ok(HttpRequest {
            method: "POST".into(),
            url: format!("{}/chat/completions", input.provider.base_url),
            headers: vec![],
            body: "{}".into(),
        })
    }

    fn parse(_response: &HttpResponse) -> Result<Parsed, PluginError> {
        panic!("panicky plugin: parse always panics");
    }
}

llmq_sdk::export_plugin!(Panicky);
