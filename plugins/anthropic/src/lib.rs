//! The llmq provider plugin for the Anthropic Messages API (`POST /v1/messages`).
//!
//! Sans-I/O: [`prepare`] turns a canonical (OpenAI-shaped) job into a Messages
//! API request, [`parse`] classifies a response into exactly one outcome and
//! reads the `anthropic-ratelimit-*` headers. The cdylib exports it through
//! [`llmq_sdk::export_plugin!`]; the rlib lets tests call it directly.

pub mod parse;
pub mod prepare;

use llmq_sdk::{HttpRequest, HttpResponse, Manifest, Parsed, PluginError, PrepareInput};

/// The plugin name config refers to (`plugin = "anthropic"`).
pub const NAME: &str = "anthropic";
/// The wire protocol served.
pub const PROTOCOL: &str = "anthropic-messages";
/// The default base URL (without a trailing slash).
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";

/// Outcome kinds that no Anthropic answer can produce, each with the reason.
/// The fixture test insists that the fixtures cover every other kind.
pub const IMPOSSIBLE_OUTCOMES: [(&str, &str); 1] = [(
    "request_too_large",
    "Anthropic has no per-key size limit answer: its 413 `request_too_large` is the \
     32 MB request body limit that Cloudflare applies to every key alike (another key \
     cannot help, so it is invalid_request), and over a rate limit it answers 429 \
     rate_limit_error (https://platform.claude.com/docs/en/api/errors)",
)];

/// The Anthropic plugin.
#[derive(Debug, Clone, Copy, Default)]
pub struct Anthropic;

impl llmq_sdk::Plugin for Anthropic {
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

llmq_sdk::export_plugin!(Anthropic);

#[cfg(test)]
mod fixture_tests {
    //! Runs every recorded fixture through the rlib (no `.so` involved).

    use super::Anthropic;
    use llmq_sdk::conformance::{check_direct, load_fixtures, missing_outcome_kinds};
    use llmq_sdk::Plugin;
    use std::path::{Path, PathBuf};

    fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
    }

    #[test]
    fn every_fixture_passes_through_the_rlib() {
        let report = check_direct::<Anthropic>(&fixtures_dir()).unwrap();
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
    fn fixtures_cover_every_finish_reason() {
        let covered: std::collections::BTreeSet<String> = load_fixtures(&fixtures_dir())
            .unwrap()
            .into_iter()
            .filter_map(|(_, fx)| {
                Some(fx.expect?["outcome"]["finish_reason"].as_str()?.to_string())
            })
            .collect();
        for want in ["stop", "length", "tool_calls", "refusal"] {
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
    fn manifest_names_the_plugin_and_protocol() {
        let m = Anthropic::manifest();
        assert_eq!(m.name, "anthropic");
        assert_eq!(m.protocols, vec!["anthropic-messages".to_string()]);
        assert_eq!(m.providers[0].name, "anthropic");
        assert_eq!(m.providers[0].base_url, "https://api.anthropic.com/v1");
        assert!(!m.version.is_empty());
    }
}
