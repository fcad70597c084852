//! Finds (building if needed) the first-party plugin `.so` files.
//!
//! `cargo test --workspace` builds them as workspace members; a bare
//! `cargo test -p llmq` does not, so we ask cargo to build them and read the
//! artifact paths from its JSON messages. The files are copied into one
//! temporary plugins dir shared by the whole test binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The first-party plugin packages.
pub const PLUGIN_PACKAGES: &[&str] = &[
    "llmq-plugin-openai",
    "llmq-plugin-anthropic",
    "llmq-plugin-gemini",
];

/// Deliberately broken plugins for negative tests (tests/fixture-plugins).
pub const FIXTURE_PACKAGES: &[&str] = &[
    "llmq-fixture-panicky",
    "llmq-fixture-garbage",
    "llmq-fixture-bad-abi",
    "llmq-fixture-looping",
];

static DIR: OnceLock<PathBuf> = OnceLock::new();
static FIXTURES: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// The built `.so` of a fixture plugin, by its short name (`panicky`, `garbage`, `bad-abi`, `looping`).
pub fn fixture_plugin(name: &str) -> PathBuf {
    let files = FIXTURES.get_or_init(|| build_cdylibs(FIXTURE_PACKAGES));
    let stem = format!("llmq_fixture_{}", name.replace('-', "_"));
    files
        .iter()
        .find(|f| {
            f.file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|s| s.trim_start_matches("lib") == stem)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no fixture plugin {name} among {files:?}"))
}

/// A directory holding exactly the three first-party plugins.
pub fn plugin_dir() -> &'static Path {
    DIR.get_or_init(|| {
        let files = build_cdylibs(PLUGIN_PACKAGES);
        let dir = std::env::temp_dir().join(format!("llmq-test-plugins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {dir:?}: {e}"));
        for f in files {
            let name = f.file_name().unwrap_or_default();
            std::fs::copy(&f, dir.join(name)).unwrap_or_else(|e| panic!("copy {f:?}: {e}"));
        }
        dir
    })
}

/// Builds cdylib packages with the same profile as this test binary and
/// returns the cdylib paths.
pub fn build_cdylibs(packages: &[&str]) -> Vec<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--message-format=json-render-diagnostics");
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.arg("-p").arg(p);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    cmd.arg("--manifest-path").arg(manifest);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo build for plugins: {e}"));
    if !out.status.success() {
        panic!(
            "building plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut files = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_cdylib = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
        if !is_cdylib {
            continue;
        }
        for f in msg["filenames"].as_array().into_iter().flatten() {
            if let Some(f) = f.as_str() {
                if f.ends_with(std::env::consts::DLL_SUFFIX) {
                    files.push(PathBuf::from(f));
                }
            }
        }
    }
    assert_eq!(
        files.len(),
        packages.len(),
        "expected one cdylib per plugin package, got {files:?}"
    );
    files
}
