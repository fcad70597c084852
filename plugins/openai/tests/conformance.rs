//! Loads the built `cdylib` through the C ABI and runs the SDK's conformance
//! kit over `fixtures/`: what a third-party author would run, and what
//! `llmq plugins --check` does.

use llmq_sdk::conformance::{cdylib_path, check_plugin, load_fixtures};
use std::path::Path;

#[test]
fn cdylib_passes_the_conformance_kit() {
    let so = cdylib_path(env!("CARGO_PKG_NAME")).expect("cargo test builds the cdylib");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let fixtures = load_fixtures(&dir).expect("fixtures load").len();
    let report = check_plugin(&so, &dir).expect("plugin loads");
    assert!(report.ok(), "{report}");
    assert_eq!(report.plugin, "openai");
    // Every fixture plus the manifest check.
    assert_eq!(report.passed, fixtures + 1, "{report}");
}
