//! The conformance kit: checks a plugin against recorded fixtures.
//!
//! A plugin author keeps a folder of fixtures, one JSON file per case:
//!
//! ```json
//! {"name": "429 with retry-after", "call": "parse",
//!  "input": {"status": 429, "headers": [["retry-after", "20"]], "body": "{…}"},
//!  "expect": {"outcome": {"kind": "rate_limited", "retry_after_ms": 20000}}}
//! ```
//!
//! - `call` is `parse` or `prepare`; `input` is a [`crate::HttpResponse`] or a
//!   [`crate::PrepareInput`].
//! - `expect` is matched as a JSON *subset* of the answer: every field given
//!   must be present and equal, fields not given are not checked. An expected
//!   `null` also passes when the field is absent, which is how a fixture says
//!   "no hint" (`"retry_after_ms": null`): the SDK types leave out empty
//!   optional fields. For `prepare`, `expect.headers` is an object matched
//!   case-insensitively against the header list, `expect.absent_headers`
//!   lists headers that must not be sent, `expect.body` is matched against the
//!   body parsed as JSON, and `expect.url_excludes` lists strings the URL must
//!   not contain.
//! - `"expect_error": true` instead of `expect` says the call must be refused
//!   (a [`crate::PluginError`]; a panic is never a refusal).
//! - `doc` (optional) is the URL of the provider documentation page the case
//!   follows, so a reviewer can check the mapping against its source. The kit
//!   does not fetch it; a plugin's own tests may insist that every fixture has
//!   one (see [`fixtures_without_doc`]).
//!
//! # Running it
//!
//! - `check_plugin` (feature `host`) loads the built `cdylib` and runs every
//!   fixture through the C ABI, as `llmq plugins --check DIR` does;
//!   [`cdylib_path`] finds the library that `cargo test` built next to the
//!   test binary.
//! - [`check_direct`] calls a [`Plugin`] implementation directly (the rlib, no
//!   loading, no `host` feature), for quick unit tests; panics are caught and
//!   reported as failures.
//! - [`missing_outcome_kinds`] names the outcome kinds no `parse` fixture
//!   expects, so a test can insist that every kind is covered.
//!
//! ```ignore
//! // tests/conformance.rs of a plugin crate (dev-dependency: llmq-sdk, features = ["host"])
//! use llmq_sdk::conformance::{cdylib_path, check_direct, check_plugin, load_fixtures, missing_outcome_kinds};
//!
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
//! let report = check_plugin(&cdylib_path(env!("CARGO_PKG_NAME")).unwrap(), &dir).unwrap();
//! assert!(report.ok(), "{report}");
//! let report = check_direct::<MyPlugin>(&dir).unwrap();
//! assert!(report.ok(), "{report}");
//! assert_eq!(missing_outcome_kinds(&load_fixtures(&dir).unwrap()), Vec::<&str>::new());
//! ```

#[cfg(feature = "host")]
use crate::host::{CallError, LoadedPlugin};
use crate::types::{HttpResponse, Manifest, Outcome, PluginError, PrepareInput};
use crate::Plugin;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One recorded case.
#[derive(Debug, Clone, Deserialize)]
pub struct Fixture {
    pub name: String,
    pub call: String,
    /// The provider documentation page this case follows (an `http(s)` URL).
    #[serde(default)]
    pub doc: Option<String>,
    pub input: Value,
    #[serde(default)]
    pub expect: Option<Value>,
    #[serde(default)]
    pub expect_error: bool,
}

/// A failed case: which file, and what differed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub file: PathBuf,
    pub name: String,
    pub reason: String,
}

/// The outcome of a conformance run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub plugin: String,
    pub passed: usize,
    pub failures: Vec<Failure>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.passed > 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "plugin {}: {} passed, {} failed",
            self.plugin,
            self.passed,
            self.failures.len()
        )?;
        for fail in &self.failures {
            writeln!(
                f,
                "  FAIL {} ({}): {}",
                fail.name,
                fail.file.display(),
                fail.reason
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[cfg(feature = "host")]
    #[error(transparent)]
    Load(#[from] crate::host::LoadError),
    #[error("fixtures {path}: {reason}")]
    Fixtures { path: PathBuf, reason: String },
    #[error("plugin library {file}: {reason}")]
    Library { file: String, reason: String },
}

/// Loads every `*.json` fixture in `dir`, sorted by file name.
pub fn load_fixtures(dir: &Path) -> Result<Vec<(PathBuf, Fixture)>, ConformanceError> {
    let err = |reason: String| ConformanceError::Fixtures {
        path: dir.to_path_buf(),
        reason,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| ConformanceError::Fixtures {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        let fx: Fixture = serde_json::from_str(&text).map_err(|e| ConformanceError::Fixtures {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        out.push((file, fx));
    }
    if out.is_empty() {
        return Err(err("no *.json fixtures".into()));
    }
    Ok(out)
}

/// Loads the plugin at `so` and checks its manifest and every fixture in `dir`.
#[cfg(feature = "host")]
pub fn check_plugin(so: &Path, dir: &Path) -> Result<Report, ConformanceError> {
    let plugin = LoadedPlugin::load(so)?;
    let fixtures = load_fixtures(dir)?;
    Ok(check_loaded(&plugin, &fixtures))
}

/// Checks an already loaded plugin against fixtures.
#[cfg(feature = "host")]
pub fn check_loaded(plugin: &LoadedPlugin, fixtures: &[(PathBuf, Fixture)]) -> Report {
    check_with(plugin.manifest(), plugin.path(), fixtures, |fx| {
        run_fixture(plugin, fx)
    })
}

/// Runs one fixture through a loaded plugin; `Err` says what differed.
#[cfg(feature = "host")]
pub fn run_fixture(plugin: &LoadedPlugin, fx: &Fixture) -> Result<(), String> {
    fn answer<T: Serialize>(result: Result<T, CallError>) -> Answer {
        match result {
            Ok(v) => Answer::Value(serde_json::to_value(v).unwrap_or(Value::Null)),
            Err(e @ CallError::Refused { .. }) => Answer::Refused(e.to_string()),
            Err(e) => Answer::Broken(e.to_string()),
        }
    }
    run_with(
        fx,
        |resp| answer(plugin.parse(resp)),
        |inp| answer(plugin.prepare(inp)),
    )
}

/// Checks the plugin `P` itself (no `.so`, no C ABI): its manifest and every
/// fixture in `dir`. The same matching as `check_plugin`, for the rlib.
pub fn check_direct<P: Plugin>(dir: &Path) -> Result<Report, ConformanceError> {
    let fixtures = load_fixtures(dir)?;
    let manifest = P::manifest();
    Ok(check_with(
        &manifest,
        Path::new("Plugin::manifest()"),
        &fixtures,
        run_fixture_direct::<P>,
    ))
}

/// Runs one fixture through `P` directly; `Err` says what differed.
pub fn run_fixture_direct<P: Plugin>(fx: &Fixture) -> Result<(), String> {
    fn answer<T: Serialize>(call: &str, f: impl FnOnce() -> Result<T, PluginError>) -> Answer {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(v)) => Answer::Value(serde_json::to_value(v).unwrap_or(Value::Null)),
            Ok(Err(e)) => Answer::Refused(format!("plugin refused {call}: {e}")),
            Err(payload) => Answer::Broken(format!(
                "plugin panicked in {call}: {}",
                crate::abi::panic_message(payload.as_ref())
            )),
        }
    }
    run_with(
        fx,
        |resp| answer("parse", || P::parse(resp)),
        |inp| answer("prepare", || P::prepare(inp)),
    )
}

/// The outcome kinds ([`Outcome::KINDS`]) that no `parse` fixture expects,
/// in declaration order: empty when the fixtures cover every kind.
pub fn missing_outcome_kinds(fixtures: &[(PathBuf, Fixture)]) -> Vec<&'static str> {
    let covered: BTreeSet<&str> = fixtures
        .iter()
        .filter(|(_, fx)| fx.call == "parse")
        .filter_map(|(_, fx)| fx.expect.as_ref()?["outcome"]["kind"].as_str())
        .collect();
    Outcome::KINDS
        .into_iter()
        .filter(|kind| !covered.contains(kind))
        .collect()
}

/// The fixtures whose `doc` is missing or is not an `http(s)://` URL, by
/// file: empty when every case names the documentation page it follows.
pub fn fixtures_without_doc(fixtures: &[(PathBuf, Fixture)]) -> Vec<PathBuf> {
    fixtures
        .iter()
        .filter(|(_, fx)| {
            !fx.doc.as_deref().map(str::trim).is_some_and(|d| {
                (d.starts_with("https://") || d.starts_with("http://"))
                    && !d.contains(char::is_whitespace)
            })
        })
        .map(|(file, _)| file.clone())
        .collect()
}

/// The `cdylib` of the crate `crate_name` (`-` or `_` alike) that this
/// `cargo test` run built. Test binaries live in `target/<profile>/deps/`,
/// and `cargo test` leaves the fresh cdylib there too; `cargo build` copies
/// it one level up, where an older copy may linger. So: the newer of the two,
/// `deps/` on a tie.
pub fn cdylib_path(crate_name: &str) -> Result<PathBuf, ConformanceError> {
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        crate_name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let err = |reason: String| ConformanceError::Library {
        file: file.clone(),
        reason,
    };
    let exe = std::env::current_exe().map_err(|e| err(format!("no current_exe: {e}")))?;
    let deps = exe
        .parent()
        .ok_or_else(|| err(format!("{} has no parent dir", exe.display())))?;
    newest_in(
        &[Some(deps), deps.parent()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        &file,
    )
    .ok_or_else(|| {
        err(format!(
            "not found next to {} (does the crate build a cdylib?)",
            exe.display()
        ))
    })
}

/// The newest `dir/file` among `dirs`; the earlier dir wins a tie.
fn newest_in(dirs: &[&Path], file: &str) -> Option<PathBuf> {
    dirs.iter()
        .map(|dir| dir.join(file))
        .filter(|p| p.is_file())
        .map(|p| {
            let modified = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            (modified, p)
        })
        .reduce(|best, next| if next.0 > best.0 { next } else { best })
        .map(|(_, p)| p)
}

/// What one call answered, before it is matched against its fixture.
enum Answer {
    /// The call returned this (as JSON).
    Value(Value),
    /// The plugin refused the input: what `expect_error` asks for.
    Refused(String),
    /// The call broke (a panic, garbage across the ABI): never a pass.
    Broken(String),
}

/// The manifest check plus one result per fixture.
fn check_with(
    manifest: &Manifest,
    manifest_file: &Path,
    fixtures: &[(PathBuf, Fixture)],
    run: impl Fn(&Fixture) -> Result<(), String>,
) -> Report {
    let mut report = Report {
        plugin: manifest.name.clone(),
        ..Report::default()
    };
    let mut manifest_problems = Vec::new();
    if manifest.version.is_empty() {
        manifest_problems.push("manifest.version is empty");
    }
    if manifest.protocols.is_empty() {
        manifest_problems.push("manifest.protocols is empty");
    }
    if manifest_problems.is_empty() {
        report.passed += 1;
    } else {
        report.failures.push(Failure {
            file: manifest_file.to_path_buf(),
            name: "manifest".into(),
            reason: manifest_problems.join("; "),
        });
    }
    for (file, fx) in fixtures {
        match run(fx) {
            Ok(()) => report.passed += 1,
            Err(reason) => report.failures.push(Failure {
                file: file.clone(),
                name: fx.name.clone(),
                reason,
            }),
        }
    }
    report
}

/// Decodes the fixture's input, makes the call it names and matches the answer.
fn run_with(
    fx: &Fixture,
    parse: impl FnOnce(&HttpResponse) -> Answer,
    prepare: impl FnOnce(&PrepareInput) -> Answer,
) -> Result<(), String> {
    let answer = match fx.call.as_str() {
        "parse" => {
            let resp: HttpResponse = serde_json::from_value(fx.input.clone())
                .map_err(|e| format!("input is not an HttpResponse: {e}"))?;
            parse(&resp)
        }
        "prepare" => {
            let inp: PrepareInput = serde_json::from_value(fx.input.clone())
                .map_err(|e| format!("input is not a PrepareInput: {e}"))?;
            prepare(&inp)
        }
        other => {
            return Err(format!(
                "unknown call {other:?} (expected parse or prepare)"
            ))
        }
    };
    match (answer, fx.expect_error) {
        (Answer::Refused(_), true) => Ok(()),
        (Answer::Broken(e), true) => Err(format!("expected a refusal, got {e}")),
        (Answer::Value(v), true) => Err(format!("expected a refusal, got {v}")),
        (Answer::Refused(e) | Answer::Broken(e), false) => Err(e),
        (Answer::Value(actual), false) => {
            let expect = fx
                .expect
                .as_ref()
                .ok_or("fixture has neither expect nor expect_error")?;
            if fx.call == "prepare" {
                match_prepare(expect, &actual)
            } else {
                json_subset(expect, &actual, "$")
            }
        }
    }
}

/// Matches a `prepare` expectation (see the module docs).
pub fn match_prepare(expect: &Value, actual: &Value) -> Result<(), String> {
    let obj = expect
        .as_object()
        .ok_or("prepare expect must be an object")?;
    for (k, want) in obj {
        match k.as_str() {
            "headers" => {
                let want = want.as_object().ok_or("expect.headers must be an object")?;
                let have = actual["headers"].as_array().cloned().unwrap_or_default();
                for (name, value) in want {
                    let found = have.iter().find_map(|pair| {
                        let n = pair.get(0)?.as_str()?;
                        n.eq_ignore_ascii_case(name).then(|| pair.get(1).cloned())?
                    });
                    match found {
                        Some(v) if &v == value => {}
                        Some(v) => return Err(format!("header {name}: expected {value}, got {v}")),
                        None => return Err(format!("header {name} missing")),
                    }
                }
            }
            "absent_headers" => {
                let names = want
                    .as_array()
                    .ok_or("expect.absent_headers must be a list")?;
                let have = actual["headers"].as_array().cloned().unwrap_or_default();
                for name in names.iter().filter_map(|n| n.as_str()) {
                    if have.iter().any(|p| {
                        p.get(0)
                            .and_then(|n| n.as_str())
                            .is_some_and(|n| n.eq_ignore_ascii_case(name))
                    }) {
                        return Err(format!("header {name} must be absent"));
                    }
                }
            }
            "body" => {
                let text = actual["body"].as_str().unwrap_or("");
                let body: Value =
                    serde_json::from_str(text).map_err(|e| format!("body is not JSON: {e}"))?;
                json_subset(want, &body, "$.body")?;
            }
            "url_excludes" => {
                let url = actual["url"].as_str().unwrap_or("");
                for s in want
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                {
                    if url.contains(s) {
                        return Err(format!("url must not contain {s:?}"));
                    }
                }
            }
            other => json_subset(want, &actual[other], &format!("$.{other}"))?,
        }
    }
    Ok(())
}

/// `expect` is a subset of `actual`: objects by key, arrays element-wise with
/// equal length, scalars by equality.
pub fn json_subset(expect: &Value, actual: &Value, at: &str) -> Result<(), String> {
    match (expect, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => json_subset(ev, av, &format!("{at}.{k}"))?,
                    None if ev.is_null() => {}
                    None => return Err(format!("{at}.{k}: missing (expected {ev})")),
                }
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!("{at}: expected {} items, got {}", e.len(), a.len()));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                json_subset(ev, av, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Number(e), Value::Number(a)) if e.as_f64() == a.as_f64() => Ok(()),
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{at}: expected {e}, got {a}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_matches_and_reports_path() {
        let a = json!({"outcome": {"kind": "success", "usage": {"input_tokens": 3}}, "x": 1});
        assert!(json_subset(&json!({"outcome": {"kind": "success"}}), &a, "$").is_ok());
        let err = json_subset(&json!({"outcome": {"kind": "transient"}}), &a, "$").unwrap_err();
        assert!(err.contains("$.outcome.kind"), "{err}");
        assert!(json_subset(&json!({"missing": 1}), &a, "$").is_err());
    }

    #[test]
    fn prepare_headers_case_insensitive_and_url_excludes() {
        let actual = json!({"method": "POST", "url": "https://x/v1?alt=sse",
            "headers": [["X-Goog-Api-Key", "k"]], "body": "{\"a\":{\"b\":1}}"});
        let ok = json!({"method": "POST", "headers": {"x-goog-api-key": "k"},
            "body": {"a": {"b": 1}}, "url_excludes": ["key="], "absent_headers": ["authorization"]});
        assert!(match_prepare(&ok, &actual).is_ok());
        let bad = json!({"url_excludes": ["alt="]});
        assert!(match_prepare(&bad, &actual).is_err());
    }

    #[test]
    fn expected_null_passes_when_absent_but_not_when_set() {
        let a = json!({"outcome": {"kind": "rate_limited"}});
        let no_hint = json!({"outcome": {"kind": "rate_limited", "retry_after_ms": null}});
        assert!(json_subset(&no_hint, &a, "$").is_ok());
        let a = json!({"outcome": {"kind": "rate_limited", "retry_after_ms": 5}});
        assert!(json_subset(&no_hint, &a, "$").is_err());
    }

    /// A toy plugin: the model name picks what `prepare` does.
    struct Toy;

    impl Plugin for Toy {
        fn manifest() -> Manifest {
            Manifest {
                name: "toy".into(),
                version: "1".into(),
                protocols: vec!["toy".into()],
                providers: vec![],
            }
        }
        fn prepare(input: &PrepareInput) -> Result<crate::HttpRequest, PluginError> {
            match input.request.model.as_str() {
                "refuse" => Err(PluginError::new("no such thing")),
                "panic" => panic!("toy prepare blew up"),
                model => Ok(crate::HttpRequest {
                    method: "POST".into(),
                    url: format!("{}/{model}", input.provider.base_url),
                    headers: vec![("X-Key".into(), input.api_key.clone().unwrap_or_default())],
                    body: json!({"model": model}).to_string(),
                }),
            }
        }
        fn parse(resp: &HttpResponse) -> Result<crate::Parsed, PluginError> {
            Ok(crate::Parsed::new(match resp.status {
                200 => Outcome::Success {
                    text: resp.body.clone(),
                    usage: crate::Usage::default(),
                    finish_reason: None,
                    refusal: None,
                },
                429 => Outcome::RateLimited {
                    retry_after_ms: None,
                },
                _ => Outcome::Transient,
            }))
        }
    }

    fn prepare_fixture(model: &str, expect: Option<Value>) -> Value {
        let input = json!({"request": {"model": model, "messages": []}, "api_key": "k1",
            "provider": {"name": "toy", "base_url": "http://toy"}});
        match expect {
            Some(e) => json!({"name": model, "call": "prepare", "input": input, "expect": e}),
            None => json!({"name": model, "call": "prepare", "input": input, "expect_error": true}),
        }
    }

    fn write_fixtures(cases: &[Value]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, case) in cases.iter().enumerate() {
            std::fs::write(dir.path().join(format!("{i:02}.json")), case.to_string()).unwrap();
        }
        dir
    }

    #[test]
    fn check_direct_runs_every_fixture_through_the_plugin() {
        let dir = write_fixtures(&[
            json!({"name": "ok", "call": "parse", "input": {"status": 200, "body": "hi"},
                "expect": {"outcome": {"kind": "success", "text": "hi"}}}),
            json!({"name": "slow down", "call": "parse", "input": {"status": 429},
                "expect": {"outcome": {"kind": "rate_limited", "retry_after_ms": null}}}),
            prepare_fixture(
                "m1",
                Some(json!({"url": "http://toy/m1", "headers": {"x-key": "k1"},
                    "body": {"model": "m1"}, "url_excludes": ["k1"], "absent_headers": ["authorization"]})),
            ),
            prepare_fixture("refuse", None),
        ]);
        let report = check_direct::<Toy>(dir.path()).unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!(report.plugin, "toy");
        assert_eq!(
            report.passed,
            1 + 4,
            "the manifest check plus every fixture"
        );
    }

    #[test]
    fn check_direct_reports_mismatches_panics_and_wrong_refusals() {
        let dir = write_fixtures(&[
            json!({"name": "wrong kind", "call": "parse", "input": {"status": 500},
                "expect": {"outcome": {"kind": "success"}}}),
            prepare_fixture("panic", None),
            prepare_fixture("m1", None),
            prepare_fixture("refuse", Some(json!({"url": "http://toy/refuse"}))),
            json!({"name": "odd call", "call": "stream", "input": {}}),
            json!({"name": "no expectation", "call": "parse", "input": {"status": 200}}),
        ]);
        let report = check_direct::<Toy>(dir.path()).unwrap();
        assert!(!report.ok());
        assert_eq!(report.passed, 1, "only the manifest passes: {report}");
        let reason = |name: &str| {
            report
                .failures
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.reason.clone())
                .unwrap_or_else(|| panic!("{name} did not fail: {report}"))
        };
        assert!(reason("wrong kind").contains("$.outcome.kind"));
        // A panic is caught, and it is not the refusal the fixture asks for.
        assert!(reason("panic")
            .contains("expected a refusal, got plugin panicked in prepare: toy prepare blew up"));
        assert!(reason("m1").starts_with("expected a refusal, got {"));
        assert!(reason("refuse").contains("plugin refused prepare: no such thing"));
        assert!(reason("odd call").contains("unknown call \"stream\""));
        assert!(reason("no expectation").contains("neither expect nor expect_error"));
    }

    #[test]
    fn missing_outcome_kinds_names_what_no_parse_fixture_expects() {
        let fx = |call: &str, kind: &str| {
            let f: Fixture = serde_json::from_value(json!({"name": kind, "call": call,
                "input": {}, "expect": {"outcome": {"kind": kind}}}))
            .unwrap();
            (PathBuf::from(format!("{kind}.json")), f)
        };
        let mut fixtures: Vec<_> = Outcome::KINDS.iter().map(|k| fx("parse", k)).collect();
        assert!(missing_outcome_kinds(&fixtures).is_empty());
        fixtures.retain(|(_, f)| f.name != "transient" && f.name != "auth_failed");
        // A prepare fixture does not count as coverage.
        fixtures.push(fx("prepare", "transient"));
        assert_eq!(
            missing_outcome_kinds(&fixtures),
            ["auth_failed", "transient"]
        );
    }

    #[test]
    fn fixtures_without_doc_names_cases_with_no_doc_url() {
        let fx = |name: &str, doc: Value| {
            let f: Fixture = serde_json::from_value(json!({"name": name, "call": "parse",
                "input": {}, "expect": {}, "doc": doc}))
            .unwrap();
            (PathBuf::from(format!("{name}.json")), f)
        };
        let fixtures = vec![
            fx(
                "ok",
                json!("https://platform.openai.com/docs/guides/error-codes"),
            ),
            fx("missing", Value::Null),
            fx("not_a_url", json!("see the docs")),
            fx("blank", json!("  ")),
        ];
        assert_eq!(
            fixtures_without_doc(&fixtures),
            [
                PathBuf::from("missing.json"),
                PathBuf::from("not_a_url.json"),
                PathBuf::from("blank.json")
            ]
        );
        let no_field: Fixture =
            serde_json::from_value(json!({"name": "n", "call": "parse", "input": {}})).unwrap();
        assert_eq!(no_field.doc, None);
    }

    #[test]
    fn the_newest_library_wins_and_deps_wins_a_tie() {
        let root = tempfile::tempdir().unwrap();
        let deps = root.path().join("deps");
        std::fs::create_dir(&deps).unwrap();
        let dirs = [deps.as_path(), root.path()];
        let file = "libtoy.so";
        assert_eq!(newest_in(&dirs, file), None);

        let touch = |path: &Path, secs: u64| {
            let f = std::fs::File::create(path).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                .unwrap();
        };
        touch(&root.path().join(file), 1_000);
        assert_eq!(newest_in(&dirs, file), Some(root.path().join(file)));
        touch(&deps.join(file), 2_000);
        assert_eq!(newest_in(&dirs, file), Some(deps.join(file)));
        touch(&root.path().join(file), 3_000);
        assert_eq!(newest_in(&dirs, file), Some(root.path().join(file)));
        touch(&deps.join(file), 3_000);
        assert_eq!(newest_in(&dirs, file), Some(deps.join(file)));
    }

    #[test]
    fn cdylib_path_names_the_library_it_could_not_find() {
        let err = cdylib_path("llmq-no-such-plugin").unwrap_err().to_string();
        assert!(err.contains("llmq_no_such_plugin"), "{err}");
        assert!(err.contains("not found next to"), "{err}");
    }
}
