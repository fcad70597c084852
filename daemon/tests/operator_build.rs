//! The binary operators install is built with `--no-default-features`
//! (README, "Install"): it must not link the mock provider or the test kit,
//! which only `llmq demo` needs.

use std::process::Command;

fn cargo_tree(args: &[&str]) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["tree", "--offline", "-p", "llmq", "--prefix", "none"])
        .args(args)
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_operators_build_links_neither_the_mock_nor_the_testkit() {
    let lean = cargo_tree(&["-e", "normal", "--no-default-features"]);
    assert!(lean.lines().any(|l| l.starts_with("llmq-sdk ")), "{lean}");
    for crate_name in ["llmq-mock", "llmq-testkit"] {
        assert!(
            !lean
                .lines()
                .any(|l| l.starts_with(&format!("{crate_name} "))),
            "{crate_name} is in the operator's build:\n{lean}"
        );
    }
    // The default build (with `llmq demo`) does link the mock: the check
    // above is not passing because the tree is empty.
    let full = cargo_tree(&["-e", "normal"]);
    assert!(full.lines().any(|l| l.starts_with("llmq-mock ")), "{full}");
}

/// The release binary operators install stays small (issue 16: at most
/// 25 MB). A release build takes minutes on two cores, so this is ignored
/// by default: `cargo test -p llmq --test operator_build -- --ignored`.
#[test]
#[ignore = "builds the release binary (minutes)"]
fn the_operators_release_binary_is_at_most_25_mb() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--offline",
            "--release",
            "-p",
            "llmq",
            "--no-default-features",
            "--message-format",
            "json",
        ])
        .output()
        .expect("cargo build runs");
    assert!(
        out.status.success(),
        "cargo build --release failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The path of the built executable, from cargo's own report.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exe = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "llmq")
        .find_map(|m| m["executable"].as_str().map(str::to_owned))
        .expect("cargo reported the llmq executable");
    let bytes = std::fs::metadata(&exe).expect("the binary exists").len();
    eprintln!("{exe}: {bytes} bytes");
    assert!(
        bytes <= 25 * 1024 * 1024,
        "{exe} is {:.1} MiB, over 25 MiB",
        bytes as f64 / (1024.0 * 1024.0)
    );
}
