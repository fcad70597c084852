//! Loads the built `cdylib` through the SDK host and runs the conformance kit
//! over `fixtures/`, exactly as `llmq plugins --check` would.

use std::path::{Path, PathBuf};

/// The plugin library built with this test binary. Test binaries live in
/// `target/<profile>/deps/`; `cargo test` leaves the cdylib there too (it is
/// only uplifted to `target/<profile>/` by `cargo build`, so the copy in the
/// parent may be stale and is the fallback).
fn plugin_library() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    let file = format!(
        "{}llmq_plugin_gemini{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let found = [Some(deps), deps.parent()]
        .into_iter()
        .flatten()
        .map(|dir| dir.join(&file))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("{file} not found next to {}", exe.display()))
}

#[test]
fn cdylib_passes_every_fixture() {
    let so = plugin_library();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let fixtures = llmq_sdk::conformance::load_fixtures(&dir).unwrap();
    let report = llmq_sdk::conformance::check_plugin(&so, &dir).unwrap();
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
