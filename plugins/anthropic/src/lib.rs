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

/// The Anthropic plugin.
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
    fn fixtures_cover_every_outcome_kind() {
        let missing = missing_outcome_kinds(&load_fixtures(&fixtures_dir()).unwrap());
        assert!(missing.is_empty(), "no fixture for {missing:?}");
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
