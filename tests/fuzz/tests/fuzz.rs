//! One test per fuzz target. Each replays the target's corpus
//! (`corpus/<target>/`), then fuzzes it for `LLMQ_FUZZ_SECS` (default
//! [`llmq_fuzz::DEFAULT_SECS`]) with bolero: its random engine under
//! `cargo test`, libFuzzer under `cargo bolero test` (nightly). Crashes found
//! so far are the regression tests at the end.

use bolero::check;
use llmq_fuzz::mutate::{self, Case, Format};
use llmq_fuzz::{budget, corpus, replay, run_named, targets, Target};
use llmq_plugin_anthropic::Anthropic;
use llmq_plugin_gemini::Gemini;
use llmq_plugin_openai::OpenAiPlugin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// A fuzz target test: the corpus as it is, then mutated corpus inputs.
macro_rules! fuzz_target {
    ($name:ident, $format:expr, $f:expr) => {
        #[test]
        fn $name() {
            let target = stringify!($name);
            let f: Target = $f;
            let (files, files_deep) = replay(target, f);
            let seeds: Vec<Vec<u8>> = corpus(target).into_iter().map(|(_, b)| b).collect();
            let (cases, deep) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let started = Instant::now();
            check!()
                .with_type::<Case>()
                .with_test_time(budget())
                .for_each(|case: &Case| {
                    let input = mutate::materialize($format, &seeds, case);
                    cases.fetch_add(1, Ordering::Relaxed);
                    if run_named("a mutated input", &input, f) {
                        deep.fetch_add(1, Ordering::Relaxed);
                    }
                });
            // Seen with `--nocapture`: how far the run got.
            println!(
                "fuzz {target}: corpus {files} files ({files_deep} past parsing); \
                 {} mutated cases ({} past parsing) in {:.1?}",
                cases.into_inner(),
                deep.into_inner(),
                started.elapsed()
            );
        }
    };
}

fuzz_target!(job, Format::Json, targets::job);
fuzz_target!(openai_parse, Format::Json, targets::parse::<OpenAiPlugin>);
fuzz_target!(
    openai_prepare,
    Format::Json,
    targets::prepare::<OpenAiPlugin>
);
fuzz_target!(anthropic_parse, Format::Json, targets::parse::<Anthropic>);
fuzz_target!(
    anthropic_prepare,
    Format::Json,
    targets::prepare::<Anthropic>
);
fuzz_target!(gemini_parse, Format::Json, targets::parse::<Gemini>);
fuzz_target!(gemini_prepare, Format::Json, targets::prepare::<Gemini>);
fuzz_target!(env_keys, Format::Text, targets::env_keys);
fuzz_target!(config, Format::Toml, targets::config);

#[test]
fn the_mutator_edits_json_toml_and_text_as_documented() {
    mutate::self_check();
}

/// Inputs the fuzzers found crashes with, each fixed.
mod regressions {}
