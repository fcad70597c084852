//! llmq's fuzz targets, driven by [bolero](https://github.com/camshaft/bolero).
//!
//! Each target (in [`targets`]) takes raw bytes and panics when an invariant
//! breaks. `tests/fuzz.rs` runs each one in three ways:
//!
//! 1. every file of its corpus, `corpus/<target>/`, as it is, then the
//!    corpus with each number field set to extreme values ([`mutate::extremes`]);
//! 2. every file of `corpus/<target>/` mutated by bolero-generated [`mutate::Case`]s,
//!    for [`budget`] (`LLMQ_FUZZ_SECS`, default [`DEFAULT_SECS`]) under
//!    `cargo test` — bolero's random engine on stable Rust;
//! 3. the same cases under libFuzzer with `cargo bolero test` (nightly), for
//!    as long as one likes.
//!
//! The corpus is seeded from the plugin fixtures, `config/llmq.toml` and
//! `config/keys.env.example` by `corpus/seed.py`; crash inputs are kept
//! there as `crash-*`.

pub mod mutate;
pub mod targets;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default time each target fuzzes under `cargo test`.
pub const DEFAULT_SECS: f64 = 10.0;

/// How long each target fuzzes: `LLMQ_FUZZ_SECS` (seconds, fractions
/// allowed), else [`DEFAULT_SECS`].
pub fn budget() -> Duration {
    let secs = std::env::var("LLMQ_FUZZ_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_SECS);
    Duration::from_secs_f64(secs.min(1e9))
}

/// The corpus folder of a target.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// The files of a target's corpus, sorted by name.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && name != "README.md"
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

/// A fuzz target: true when the input got past the first parse (a valid
/// job, a whole response, a request made, keys loaded, a valid config).
pub type Target = fn(&[u8]) -> bool;

/// Runs `target` on every corpus file as it is; a panic names the file.
/// Returns how many files there are and how many got past the first parse.
pub fn replay(target: &str, f: Target) -> (usize, usize) {
    let files = corpus(target);
    assert!(!files.is_empty(), "corpus/{target} is empty");
    let deep = files
        .iter()
        .filter(|(path, bytes)| run_named(&path.display().to_string(), bytes, f))
        .count();
    (files.len(), deep)
}

/// Runs one input; on a panic, prints the input (so it can become a
/// regression test) and panics on.
pub fn run_named(what: &str, bytes: &[u8], f: Target) -> bool {
    let started = std::time::Instant::now();
    let result = std::panic::catch_unwind(|| f(bytes));
    let took = started.elapsed();
    if took > std::time::Duration::from_secs(1) {
        eprintln!(
            "fuzz: slow input ({took:.1?}, {} bytes): {:?}",
            bytes.len(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(400)])
        );
    }
    match result {
        Ok(deep) => deep,
        Err(panic) => {
            match std::str::from_utf8(bytes) {
                Ok(s) => eprintln!(
                    "fuzz crash on {what}; input ({} bytes):\n{s:?}",
                    bytes.len()
                ),
                Err(_) => eprintln!(
                    "fuzz crash on {what}; input ({} bytes, not UTF-8):\nb\"{}\"",
                    bytes.len(),
                    bytes.escape_ascii()
                ),
            }
            std::panic::resume_unwind(panic);
        }
    }
}
