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

/// Outcome kinds that no Gemini answer can produce, each with the reason.
/// The fixture test insists that the fixtures cover every other kind.
pub const IMPOSSIBLE_OUTCOMES: [(&str, &str); 1] = [(
    "request_too_large",
    "Gemini has no per-key size limit answer: a payload over the size limit is \
     413/400 for every key alike (invalid_request), and a request larger than a \
     per-minute token quota gets the same 429 RESOURCE_EXHAUSTED as any exhausted \
     minute, which the plugin cannot tell apart without the request's size \
     (https://ai.google.dev/gemini-api/docs/troubleshooting, \
     https://ai.google.dev/gemini-api/docs/rate-limits)",
)];

/// The Gemini plugin.
#[derive(Debug, Clone, Copy, Default)]
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
    fn fixtures_cover_every_outcome_kind_but_the_documented_impossible_ones() {
        let missing = missing_outcome_kinds(&load_fixtures(&fixtures_dir()).unwrap());
        let impossible: Vec<&str> = super::IMPOSSIBLE_OUTCOMES.iter().map(|(k, _)| *k).collect();
        // Equal, not a subset: a kind listed as impossible that gains a
        // fixture must leave the list, and any other kind needs a fixture.
        assert_eq!(
            missing, impossible,
            "fixtures must cover every outcome kind except {impossible:?}"
        );
    }

    #[test]
    fn fixtures_cover_every_finish_reason_gemini_gives() {
        let covered: std::collections::BTreeSet<String> = load_fixtures(&fixtures_dir())
            .unwrap()
            .into_iter()
            .filter_map(|(_, fx)| {
                Some(fx.expect?["outcome"]["finish_reason"].as_str()?.to_string())
            })
            .collect();
        // Gemini has no refusal finish: its declines are filter blocks.
        for want in ["stop", "length", "content_filter"] {
            assert!(
                covered.contains(want),
                "no fixture expects finish_reason {want}"
            );
        }
    }

    #[test]
    fn every_fixture_names_its_doc_page() {
        let fixtures = load_fixtures(&fixtures_dir()).unwrap();
        assert!(!fixtures.is_empty());
        let missing = llmq_sdk::conformance::fixtures_without_doc(&fixtures);
        assert!(
            missing.is_empty(),
            "fixtures naming no doc URL: {missing:?}"
        );
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
