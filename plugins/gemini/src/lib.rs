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
    use llmq_sdk::conformance::{check_direct, load_fixtures, missing_outcome_kinds};
    use llmq_sdk::{Plugin, PrepareInput};
    use std::path::{Path, PathBuf};

    fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
    }

    #[test]
    fn every_fixture_passes_through_the_rlib() {
        let report = check_direct::<Gemini>(&fixtures_dir()).unwrap();
        assert!(report.ok(), "{report}");
        // The manifest check plus one per fixture file.
        assert!(report.passed > 25, "only {} fixtures", report.passed - 1);
    }

    #[test]
    fn fixtures_cover_every_outcome_kind() {
        let missing = missing_outcome_kinds(&load_fixtures(&fixtures_dir()).unwrap());
        assert!(missing.is_empty(), "no fixture for {missing:?}");
    }

    #[test]
    fn every_prepare_fixture_keeps_the_key_out_of_the_url() {
        for (_, fx) in load_fixtures(&fixtures_dir()).unwrap() {
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
