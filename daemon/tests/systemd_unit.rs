//! The shipped `systemd/llmq.service` is a valid, hardened unit:
//! `systemd-analyze verify` accepts it (with `ExecStart` pointed at the
//! binary this build produced) and `systemd-analyze security --offline=yes`
//! rates its exposure at 2.0 or less. Skips with a message when
//! `systemd-analyze` is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/llmq.service")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).expect("systemd/llmq.service")
}

/// `systemd-analyze`, or a failure that says how to get it: the test never
/// passes by skipping (scripts/test.sh installs systemd).
fn require_analyze(test: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{test} needs systemd-analyze: not found (apt-get install -y systemd; scripts/test.sh installs it)")
        })
}

/// The unit with `ExecStart` running the `llmq` this build produced, in a
/// temp dir, under its real name (the name matters to systemd).
fn unit_with_real_binary() -> (tempfile::TempDir, PathBuf) {
    let text = unit_text();
    let exec = text
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("an ExecStart= line");
    let args = exec
        .strip_prefix("ExecStart=/usr/bin/llmq")
        .expect("ExecStart runs /usr/bin/llmq");
    let fixed = text.replace(
        exec,
        &format!("ExecStart={}{args}", env!("CARGO_BIN_EXE_llmq")),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llmq.service");
    std::fs::write(&path, fixed).unwrap();
    (dir, path)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = require_analyze("the_unit_passes_systemd_analyze_verify");
    let (_dir, unit) = unit_with_real_binary();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    let about_us: Vec<&str> = text.lines().filter(|l| l.contains("llmq")).collect();
    assert!(about_us.is_empty(), "warnings about the unit:\n{text}");
}

#[test]
fn the_unit_is_hardened_to_an_exposure_of_at_most_2() {
    let analyze = require_analyze("the_unit_is_hardened_to_an_exposure_of_at_most_2");
    let (_dir, unit) = unit_with_real_binary();
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for llmq.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line:\n{text}"));
    let score: f64 = line
        .split("llmq.service:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable exposure line: {line}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

/// What the SPEC promises of the unit, line by line.
#[test]
fn the_unit_has_the_promised_settings() {
    let text = unit_text();
    let set = |line: &str| text.lines().any(|l| l.trim() == line);
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "EnvironmentFile=-/etc/llmq/keys.env",
    ] {
        assert!(set(line), "llmq.service lacks {line}");
    }
    let watchdog = text
        .lines()
        .find_map(|l| l.strip_prefix("WatchdogSec="))
        .expect("WatchdogSec= (the daemon pings at half of it)");
    assert!(watchdog.ends_with('s'), "{watchdog}");
    // The daemon calls provider APIs on the internet.
    assert!(
        !set("IPAddressDeny=any")
            || text
                .lines()
                .any(|l| l.starts_with("IPAddressAllow=") && !l.ends_with("localhost")),
        "egress is denied: the daemon could not reach any provider"
    );
    // The drain of in-flight jobs (the default `queue.shutdown_grace`) and
    // the final flush of key counters (up to 5 s) fit in the stop timeout.
    let stop = text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec=");
    let stop_s: u64 = stop.trim_end_matches('s').parse().unwrap();
    let grace = llmq::config::Config::default()
        .queue
        .shutdown_grace
        .as_secs();
    assert!(
        stop_s >= grace + 5,
        "TimeoutStopSec={stop} leaves no room for a {grace} s drain and the final flush"
    );
}
