//! The llmq provider plugin for Google Gemini (`models/{model}:generateContent`).
//!
//! Sans-I/O: [`prepare`] turns a canonical (OpenAI-shaped) job into a
//! generateContent request with the key in the `x-goog-api-key` header,
//! [`parse`] classifies a response — including the `google.rpc` error
//! details (`RetryInfo`, `QuotaFailure`, `ErrorInfo`) — into exactly one
//! outcome. The cdylib exports it through [`llmq_sdk::export_plugin!`]; the
//! rlib lets tests call it directly.

pub mod parse;
pub mod prepare;

use llmq_sdk::{HttpRequest, HttpResponse, Manifest, Parsed, PluginError, PrepareInput};

/// The plugin name config refers to (`plugin = "gemini"`).
pub const NAME: &str = "gemini";
/// The wire protocol served.
pub const PROTOCOL: &str = "gemini-generate-content";
/// The default base URL (without a trailing slash).
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

/// The Gemini plugin.
pub struct Gemini;

impl llmq_sdk::Plugin for Gemini {
    fn manifest() -> Manifest {
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocols: vec![PROTOCOL.into()],
            providers: vec![llmq_sdk::ProviderDefault {
                name: NAME.into(),
                base_url: DEFAULT_BASE_URL.into(),
            }],
        }
    }

    fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
        prepare::prepare(input)
    }

    fn parse(response: &HttpResponse) -> Result<Parsed, PluginError> {
        Ok(parse::parse(response))
    }
}

llmq_sdk::export_plugin!(Gemini);

#[cfg(test)]
mod fixture_tests {
    //! Runs every recorded fixture through the rlib (no `.so` involved).

    use super::Gemini;
    use llmq_sdk::conformance::{json_subset, load_fixtures, match_prepare};
    use llmq_sdk::{HttpResponse, Plugin, PrepareInput};
    use std::path::Path;

    #[test]
    fn every_fixture_passes_through_the_rlib() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let fixtures = load_fixtures(&dir).unwrap();
        assert!(fixtures.len() >= 25, "only {} fixtures", fixtures.len());
        let mut failures = Vec::new();
        for (file, fx) in &fixtures {
            let result: Result<(), String> = match fx.call.as_str() {
                "parse" => {
                    let resp: HttpResponse = serde_json::from_value(fx.input.clone()).unwrap();
                    let parsed = Gemini::parse(&resp).map_err(|e| e.to_string());
                    match (parsed, fx.expect_error) {
                        (Err(_), true) => Ok(()),
                        (Ok(p), true) => Err(format!("expected a refusal, got {p:?}")),
                        (Err(e), false) => Err(e),
                        (Ok(p), false) => json_subset(
                            fx.expect.as_ref().unwrap(),
                            &serde_json::to_value(p).unwrap(),
                            "$",
                        ),
                    }
                }
                "prepare" => {
                    let inp: PrepareInput = serde_json::from_value(fx.input.clone()).unwrap();
                    match (Gemini::prepare(&inp), fx.expect_error) {
                        (Err(_), true) => Ok(()),
                        (Ok(r), true) => Err(format!("expected a refusal, got {r:?}")),
                        (Err(e), false) => Err(e.to_string()),
                        (Ok(r), false) => match_prepare(
                            fx.expect.as_ref().unwrap(),
                            &serde_json::to_value(r).unwrap(),
                        ),
                    }
                }
                other => Err(format!("unknown call {other}")),
            };
            if let Err(reason) = result {
                failures.push(format!("{} ({}): {reason}", fx.name, file.display()));
            }
        }
        assert!(
            failures.is_empty(),
            "failing fixtures:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn fixtures_cover_every_outcome_kind() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let fixtures = load_fixtures(&dir).unwrap();
        let kinds: std::collections::BTreeSet<String> = fixtures
            .iter()
            .filter(|(_, fx)| fx.call == "parse")
            .filter_map(|(_, fx)| {
                fx.expect.as_ref()?["outcome"]["kind"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        for kind in [
            "success",
            "rate_limited",
            "quota_exhausted",
            "auth_failed",
            "invalid_request",
            "context_too_long",
            "model_not_found",
            "transient",
        ] {
            assert!(kinds.contains(kind), "no fixture for {kind}");
        }
    }

    #[test]
    fn every_prepare_fixture_keeps_the_key_out_of_the_url() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for (_, fx) in load_fixtures(&dir).unwrap() {
            if fx.call != "prepare" || fx.expect_error {
                continue;
            }
            let inp: PrepareInput = serde_json::from_value(fx.input.clone()).unwrap();
            let req = Gemini::prepare(&inp).unwrap();
            assert!(!req.url.contains("key="), "{}: {}", fx.name, req.url);
            if let Some(key) = &inp.api_key {
                assert!(!req.url.contains(key.as_str()), "{}", fx.name);
                assert!(!req.body.contains(key.as_str()), "{}", fx.name);
            }
        }
    }

    #[test]
    fn manifest_names_the_plugin_and_protocol() {
        let m = Gemini::manifest();
        assert_eq!(m.name, "gemini");
        assert_eq!(m.protocols, vec!["gemini-generate-content".to_string()]);
        assert_eq!(m.providers[0].name, "gemini");
        assert_eq!(
            m.providers[0].base_url,
            "https://generativelanguage.googleapis.com/v1beta"
        );
        assert!(!m.version.is_empty());
    }
}
