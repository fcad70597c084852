//! The README's demo command works and is quick: `llmq demo` runs a private
//! Redis, the mock provider and the daemon, and exits 0 only when every job
//! succeeded with zero upstream 429s. Here with a compressed window.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_finishes_well_under_two_minutes_with_every_job_served() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .env("LLMQ_LOG", "warn")
        .args(["demo", "--jobs", "60", "--window-s", "2", "--plugins-dir"])
        .arg(llmq_testkit::plugin_dir())
        .output()
        .expect("run llmq demo");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(elapsed < Duration::from_secs(120), "demo took {elapsed:?}");
    // The per-key table shows the story: bad keys parked after one call.
    for line in ["free#3", "free#4"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no row for {line}:\n{stdout}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[2], "disabled", "{row}");
        assert_eq!(cols[3], "1", "exactly one call: {row}");
    }
    assert!(stdout.contains("upstream 429s: 0"), "{stdout}");
    assert!(stdout.contains("spilled to paid"), "{stdout}");
    assert!(
        !stdout.contains("sk-demo-free-key"),
        "no secret in the demo output"
    );
}
