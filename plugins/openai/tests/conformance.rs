//! Loads the built `cdylib` through the C ABI and runs the SDK's conformance
//! kit over `fixtures/`: what a third-party author would run, and what
//! `llmq plugins --check` does.

use llmq_sdk::conformance::{check_plugin, load_fixtures};
use std::path::{Path, PathBuf};

/// `target/<profile>/libllmq_plugin_openai.so`: the test binary lives in
/// `target/<profile>/deps/`, the cdylib one level up. `cargo test` itself
/// leaves the fresh cdylib in `deps/` (only `cargo build` copies it up), so
/// the newer of the two is the one this run built.
fn plugin_library() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    let profile_dir = deps.parent().expect("deps has a parent dir");
    let file = format!(
        "{}llmq_plugin_openai{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [profile_dir.join(&file), deps.join(&file)]
        .into_iter()
        .filter_map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, p)| p)
        .unwrap_or_else(|| profile_dir.join(file))
}

#[test]
fn cdylib_passes_the_conformance_kit() {
    let so = plugin_library();
    assert!(
        so.is_file(),
        "{} not found: `cargo test -p llmq-plugin-openai` builds it",
        so.display()
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let fixtures = load_fixtures(&dir).expect("fixtures load").len();
    let report = check_plugin(&so, &dir).expect("plugin loads");
    assert!(report.ok(), "{report}");
    assert_eq!(report.plugin, "openai");
    // Every fixture plus the manifest check.
    assert_eq!(report.passed, fixtures + 1, "{report}");
}
