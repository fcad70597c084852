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
            let sweep = mutate::extremes($format, &seeds);
            let started = Instant::now();
            let sweep_deep = sweep
                .iter()
                .filter(|input| run_named("an extreme value", input, f))
                .count();
            let sweep_time = started.elapsed();
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
                 {} extremes ({sweep_deep} past parsing) in {sweep_time:.1?}; \
                 {} mutated cases ({} past parsing) in {:.1?}",
                sweep.len(),
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

/// Inputs the fuzzers found crashes with, each fixed. Each is also in its
/// target's corpus as `crash-*`.
mod regressions {
    use super::*;

    /// `deadline_s` = u64::MAX was accepted and overflowed the executor's
    /// `now + deadline` (issue 15, figure 3). Found by the extremes sweep on
    /// this branch's base; fixed on main by job validation (1 s to 30 days,
    /// the jobval branch). The job is refused at once, naming the field.
    #[test]
    fn job_deadline_at_u64_max_is_refused() {
        let input = br#"{"deadline_s":18446744073709551615,"id":"fan-1","messages":[{"content":"Say hi","role":"user"}],"models":["gpt-4o-mini","claude-3-5-haiku-20241022","gemini-2.0-flash"],"route":{"max_tier":"paid","strategy":"weighted"}}"#;
        assert!(!targets::job(input), "the job must be refused");
        let (e, id) = llmq::job::parse_job(input, llmq::job::DEFAULT_MAX_JOB_BYTES).unwrap_err();
        assert!(e.to_string().contains("deadline_s"), "{e}");
        assert_eq!(id.as_deref(), Some("fan-1"));
    }

    /// Gemini `parse` added `candidatesTokenCount + thoughtsTokenCount`
    /// unchecked: u64::MAX thinking tokens panicked ("attempt to add with
    /// overflow") in a debug build and wrapped in a release one. Found by
    /// the extremes sweep; fixed with a saturating add.
    #[test]
    fn gemini_usage_counts_at_u64_max_do_not_overflow() {
        let input = br#"{"status":200,"headers":[],"received_at_unix_ms":1714564800000,"body":"{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Step one: \"}],\"role\":\"model\"},\"finishReason\":\"MAX_TOKENS\",\"index\":0}],\"usageMetadata\":{\"candidatesTokenCount\":4,\"promptTokenCount\":25,\"thoughtsTokenCount\":18446744073709551615}}"}"#;
        assert!(targets::parse::<Gemini>(input));
        let response: llmq_sdk::HttpResponse = serde_json::from_slice(input).unwrap();
        let parsed = <Gemini as llmq_sdk::Plugin>::parse(&response).unwrap();
        match parsed.outcome {
            llmq_sdk::Outcome::Success { usage, .. } => assert_eq!(usage.output_tokens, u64::MAX),
            other => panic!("expected success, got {other:?}"),
        }
    }
}
