//! The conformance kit: checks a plugin `.so` against recorded fixtures.
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
//!   must be present and equal, fields not given are not checked. For
//!   `prepare`, `expect.headers` is an object matched case-insensitively
//!   against the header list, `expect.body` is matched against the body parsed
//!   as JSON, and `expect.url_excludes` lists strings the URL must not contain.
//! - `"expect_error": true` instead of `expect` says the call must be refused.
//!
//! Run it from a test with [`check_plugin`], or from the command line with
//! `llmq plugins --check DIR`.

use crate::host::{CallError, LoadedPlugin};
use crate::types::{HttpResponse, PrepareInput};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One recorded case.
#[derive(Debug, Clone, Deserialize)]
pub struct Fixture {
    pub name: String,
    pub call: String,
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
    #[error(transparent)]
    Load(#[from] crate::host::LoadError),
    #[error("fixtures {path}: {reason}")]
    Fixtures { path: PathBuf, reason: String },
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
pub fn check_plugin(so: &Path, dir: &Path) -> Result<Report, ConformanceError> {
    let plugin = LoadedPlugin::load(so)?;
    let fixtures = load_fixtures(dir)?;
    Ok(check_loaded(&plugin, &fixtures))
}

/// Checks an already loaded plugin against fixtures.
pub fn check_loaded(plugin: &LoadedPlugin, fixtures: &[(PathBuf, Fixture)]) -> Report {
    let mut report = Report {
        plugin: plugin.name().to_string(),
        ..Report::default()
    };
    let m = plugin.manifest();
    let mut manifest_problems = Vec::new();
    if m.version.is_empty() {
        manifest_problems.push("manifest.version is empty");
    }
    if m.protocols.is_empty() {
        manifest_problems.push("manifest.protocols is empty");
    }
    if manifest_problems.is_empty() {
        report.passed += 1;
    } else {
        report.failures.push(Failure {
            file: plugin.path().to_path_buf(),
            name: "manifest".into(),
            reason: manifest_problems.join("; "),
        });
    }
    for (file, fx) in fixtures {
        match run_fixture(plugin, fx) {
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

/// Runs one fixture; `Err` says what differed.
pub fn run_fixture(plugin: &LoadedPlugin, fx: &Fixture) -> Result<(), String> {
    let answer: Result<Value, CallError> = match fx.call.as_str() {
        "parse" => {
            let resp: HttpResponse = serde_json::from_value(fx.input.clone())
                .map_err(|e| format!("input is not an HttpResponse: {e}"))?;
            plugin
                .parse(&resp)
                .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
        }
        "prepare" => {
            let inp: PrepareInput = serde_json::from_value(fx.input.clone())
                .map_err(|e| format!("input is not a PrepareInput: {e}"))?;
            plugin
                .prepare(&inp)
                .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        }
        other => {
            return Err(format!(
                "unknown call {other:?} (expected parse or prepare)"
            ))
        }
    };
    match (answer, fx.expect_error) {
        (Err(CallError::Refused { .. }), true) => Ok(()),
        (Err(e), true) => Err(format!("expected a refusal, got {e}")),
        (Ok(v), true) => Err(format!("expected a refusal, got {v}")),
        (Err(e), false) => Err(e.to_string()),
        (Ok(actual), false) => {
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
}
