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
