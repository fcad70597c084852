//! Runs every recorded fixture in `fixtures/` through the plugin directly
//! (the rlib, no C ABI), with the same matchers the conformance kit uses, and
//! checks that the fixtures cover every outcome kind.

use llmq_plugin_openai::OpenAiPlugin;
use llmq_sdk::conformance::{json_subset, load_fixtures, match_prepare, Fixture};
use llmq_sdk::{HttpResponse, Plugin, PrepareInput};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn fixtures() -> Vec<(PathBuf, Fixture)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    load_fixtures(&dir).expect("fixtures load")
}

/// Runs one fixture; `Err` says what differed.
fn run(fx: &Fixture) -> Result<Value, String> {
    match fx.call.as_str() {
        "parse" => {
            let resp: HttpResponse =
                serde_json::from_value(fx.input.clone()).map_err(|e| e.to_string())?;
            let parsed = <OpenAiPlugin as Plugin>::parse(&resp).map_err(|e| e.message)?;
            let actual = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
            let expect = fx.expect.as_ref().ok_or("parse fixture without expect")?;
            json_subset(expect, &actual, "$")?;
            Ok(actual)
        }
        "prepare" => {
            let input: PrepareInput =
                serde_json::from_value(fx.input.clone()).map_err(|e| e.to_string())?;
            match (<OpenAiPlugin as Plugin>::prepare(&input), fx.expect_error) {
                (Err(_), true) => Ok(Value::Null),
                (Ok(req), true) => Err(format!("expected a refusal, got {req:?}")),
                (Err(e), false) => Err(format!("refused: {e}")),
                (Ok(req), false) => {
                    let actual = serde_json::to_value(&req).map_err(|e| e.to_string())?;
                    let expect = fx.expect.as_ref().ok_or("prepare fixture without expect")?;
                    match_prepare(expect, &actual)?;
                    Ok(actual)
                }
            }
        }
        other => Err(format!("unknown call {other}")),
    }
}

#[test]
fn every_fixture_passes_through_the_rlib() {
    let all = fixtures();
    let failures: Vec<String> = all
        .iter()
        .filter_map(|(file, fx)| {
            run(fx)
                .err()
                .map(|e| format!("{} ({}): {e}", fx.name, file.display()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[test]
fn fixtures_cover_every_outcome_kind() {
    let kinds: BTreeSet<String> = fixtures()
        .iter()
        .filter(|(_, fx)| fx.call == "parse")
        .filter_map(|(_, fx)| {
            fx.expect.as_ref()?["outcome"]["kind"]
                .as_str()
                .map(String::from)
        })
        .collect();
    for kind in [
        "success",
        "rate_limited",
        "quota_exhausted",
        "auth_failed",
        "invalid_request",
        "context_too_long",
        "model_not_found",
        "transient",
    ] {
        assert!(kinds.contains(kind), "no parse fixture expects {kind}");
    }
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
