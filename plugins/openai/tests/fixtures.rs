//! Runs every recorded fixture in `fixtures/` through the plugin directly
//! (the rlib, no C ABI) with the SDK's conformance kit, checks that the
//! fixtures cover every outcome kind, and checks what is particular to this
//! plugin: where rate-limit hints come from and where the key may go.

use llmq_plugin_openai::OpenAiPlugin;
use llmq_sdk::conformance::{
    check_direct, fixtures_without_doc, load_fixtures, missing_outcome_kinds, Fixture,
};
use llmq_sdk::{Plugin, PrepareInput};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn fixtures() -> Vec<(PathBuf, Fixture)> {
    load_fixtures(&fixtures_dir()).expect("fixtures load")
}

#[test]
fn every_fixture_passes_through_the_rlib() {
    let report = check_direct::<OpenAiPlugin>(&fixtures_dir()).expect("fixtures load");
    assert!(report.ok(), "{report}");
    // The manifest check plus one per fixture file.
    assert_eq!(report.passed, 1 + fixtures().len(), "{report}");
}

#[test]
fn every_fixture_names_the_documentation_page_it_follows() {
    let missing = fixtures_without_doc(&fixtures());
    assert!(
        missing.is_empty(),
        "fixtures without a \"doc\" URL: {missing:?}"
    );
}

#[test]
fn fixtures_cover_every_normalized_finish_reason() {
    let all = fixtures();
    let covered: Vec<&str> = all
        .iter()
        .filter(|(_, fx)| fx.call == "parse")
        .filter_map(|(_, fx)| fx.expect.as_ref()?["outcome"]["finish_reason"].as_str())
        .collect();
    for reason in ["stop", "length", "tool_calls", "content_filter", "refusal"] {
        assert!(
            covered.contains(&reason),
            "no parse fixture expects finish_reason {reason:?}"
        );
    }
}

#[test]
fn fixtures_cover_every_outcome_kind() {
    let missing = missing_outcome_kinds(&fixtures());
    assert!(missing.is_empty(), "no parse fixture expects {missing:?}");
}

#[test]
fn rate_limit_fixtures_cover_every_hint_source_and_none() {
    let all = fixtures();
    let hints: Vec<(Vec<String>, Option<u64>)> = all
        .iter()
        .filter(|(_, fx)| {
            fx.call == "parse"
                && fx.expect.as_ref().map(|e| &e["outcome"]["kind"])
                    == Some(&Value::from("rate_limited"))
        })
        .map(|(_, fx)| {
            let headers = fx.input["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h[0].as_str().map(String::from))
                .collect();
            let hint = fx
                .expect
                .as_ref()
                .and_then(|e| e["outcome"]["retry_after_ms"].as_u64());
            (headers, hint)
        })
        .collect();
    let has = |h: &str| hints.iter().any(|(names, _)| names.iter().any(|n| n == h));
    assert!(has("retry-after-ms"));
    assert!(has("retry-after"));
    assert!(
        hints
            .iter()
            .any(|(names, hint)| hint.is_some()
                && !names.iter().any(|n| n.starts_with("retry-after")))
    );
    assert!(hints.iter().any(|(_, hint)| hint.is_none()));
}

#[test]
fn prepared_requests_carry_the_key_only_in_the_authorization_header() {
    for (file, fx) in fixtures() {
        if fx.call != "prepare" || fx.expect_error {
            continue;
        }
        let input: PrepareInput = serde_json::from_value(fx.input.clone()).unwrap();
        let req = <OpenAiPlugin as Plugin>::prepare(&input).unwrap();
        match input.api_key.as_deref() {
            Some(key) => {
                assert!(!req.url.contains(key), "{}", file.display());
                assert!(!req.body.contains(key), "{}", file.display());
                let carrying: Vec<&str> = req
                    .headers
                    .iter()
                    .filter(|(_, v)| v.contains(key))
                    .map(|(n, _)| n.as_str())
                    .collect();
                assert_eq!(carrying, ["authorization"], "{}", file.display());
            }
            None => assert!(
                !req.headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("authorization")),
                "{}",
                file.display()
            ),
        }
    }
}

#[test]
fn refusals_do_not_echo_the_key() {
    for (_, fx) in fixtures() {
        if fx.call != "prepare" || !fx.expect_error {
            continue;
        }
        let input: PrepareInput = serde_json::from_value(fx.input.clone()).unwrap();
        let err = <OpenAiPlugin as Plugin>::prepare(&input).unwrap_err();
        if let Some(key) = input.api_key.as_deref() {
            assert!(!err.message.contains(key), "{}", err.message);
        }
    }
}
