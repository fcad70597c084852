//! Loads the built `cdylib` through the SDK host and runs the conformance kit
//! over `fixtures/`, exactly as `llmq plugins --check` would.

use llmq_sdk::conformance::{cdylib_path, check_plugin, load_fixtures};
use std::path::{Path, PathBuf};

/// The plugin library this `cargo test` run built.
fn plugin_library() -> PathBuf {
    cdylib_path(env!("CARGO_PKG_NAME")).unwrap()
}

#[test]
fn cdylib_passes_every_fixture() {
    let so = plugin_library();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let fixtures = load_fixtures(&dir).unwrap();
    let report = check_plugin(&so, &dir).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.plugin, "gemini");
    // The manifest check plus one per fixture file.
    assert_eq!(report.passed, 1 + fixtures.len(), "{report}");
    assert!(fixtures.len() >= 25, "only {} fixtures", fixtures.len());
}

#[test]
fn cdylib_manifest_is_gemini_generate_content() {
    let plugin = llmq_sdk::host::LoadedPlugin::load(&plugin_library()).unwrap();
    let m = plugin.manifest();
    assert_eq!(m.name, "gemini");
    assert_eq!(m.protocols, vec!["gemini-generate-content".to_string()]);
    assert_eq!(
        m.providers[0].base_url,
        "https://generativelanguage.googleapis.com/v1beta"
    );
}
