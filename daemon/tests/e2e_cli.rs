//! The producer-facing CLI as a user runs it: the real `llmq` binary with
//! `--config`/`--redis`, against a private Redis and (where a result is
//! needed) a real `llmq serve` with the mock provider. Checks output, exit
//! codes (0 ok, 1 failure, 2 bad usage/config, 3 not found) and that no
//! secret is ever printed.

#[path = "support/e2e.rs"]
mod e2e;

use e2e::*;
use llmq::job::{JobResult, Status};
use llmq_mock::{KeySpec, MockConfig, MockServer, Protocol};
use llmq_testkit::{free_port, RedisServer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SECRET: &str = "sk-test-oa-cli-000000000001";

/// One `llmq` invocation with a clean environment (no stray LLMQ_* or API
/// keys of the machine) in a scratch dir (no `.env` there).
struct Llmq {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Llmq {
    fn new() -> Llmq {
        Llmq {
            dir: tempfile::tempdir().unwrap(),
            env: vec![],
        }
    }

    fn env(mut self, k: &str, v: &str) -> Llmq {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Writes a config file in the scratch dir.
    fn config_file(&self, toml: &str) -> PathBuf {
        let p = self.dir.path().join("llmq.toml");
        std::fs::write(&p, toml).unwrap();
        p
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmq"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("LLMQ_LOG", "warn")
            .current_dir(self.dir.path())
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("llmq runs");
        if let Some(text) = stdin {
            let mut w = child.stdin.take().unwrap();
            w.write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            !all.contains(SECRET),
            "llmq {args:?} printed an API key:\n{all}"
        );
        out
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// Asserts the exit code, showing the output when it differs.
fn expect_code(o: &Output, want: i32, what: &str) {
    assert_eq!(
        code(o),
        want,
        "{what}\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

fn job_json(id: &str) -> String {
    job(id).to_string()
}

/// The entries of a lane as (entry id, job JSON).
fn lane_entries(redis: &RedisServer, lane: &str) -> Vec<serde_json::Value> {
    let mut c = redis.client();
    let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("llmq:{{jobs}}:{lane}"))
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    v.into_iter()
        .map(|(_, fields)| {
            let job = fields
                .iter()
                .find(|(f, _)| f == "job")
                .map(|(_, v)| v.clone())
                .expect("entry has a job field");
            serde_json::from_str(&job).unwrap()
        })
        .collect()
}

async fn oa_mock() -> MockServer {
    mock(MockConfig::default().key(KeySpec::new(SECRET).label("oa#1"))).await
}

fn oa_config(redis: &RedisServer, mock: &MockServer) -> String {
    let providers = [Provider::new("oa", Protocol::OpenAi, "free", "m1")];
    config(redis, mock, &providers, "")
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_wait_and_result_against_a_running_daemon() {
    let redis = RedisServer::start();
    let mock = oa_mock().await;
    let toml = oa_config(&redis, &mock);
    let daemon = start(&spec(toml.clone()).env("OA_API_KEY_1", SECRET));
    let cli = Llmq::new();
    let cfg = cli.config_file(&toml);
    let cfg = path_str(&cfg);

    // push with the job as an argument: prints the id.
    let out = cli.run(&["--config", cfg, "push", &job_json("cli-1")]);
    expect_code(&out, 0, "push");
    assert_eq!(stdout(&out).trim(), "cli-1");

    // wait ID: the human summary and the output.
    let out = cli.run(&["--config", cfg, "wait", "cli-1", "--timeout", "15"]);
    expect_code(&out, 0, "wait");
    let text = stdout(&out);
    assert!(
        text.contains("cli-1 succeeded via oa/m1 key oa#1 (free)"),
        "{text}"
    );
    assert!(text.contains("mock reply to: hello from cli-1"), "{text}");

    // result ID --json: the contract's result JSON.
    let out = cli.run(&["--config", cfg, "--json", "result", "cli-1"]);
    expect_code(&out, 0, "result --json");
    let r: JobResult = serde_json::from_str(&stdout(&out)).expect("result JSON");
    assert_eq!(r.id, "cli-1");
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.key.as_deref(), Some("oa#1"));

    // push from stdin with --wait: prints the result when it is there.
    let mut j = job("cli-2");
    j["metadata"] = serde_json::json!({"via": "stdin"});
    let out = cli.run_with_stdin(
        &["--config", cfg, "push", "--wait", "--timeout", "15"],
        Some(&j.to_string()),
    );
    expect_code(&out, 0, "push --wait from stdin");
    let text = stdout(&out);
    assert!(text.starts_with("cli-2 succeeded via oa/m1"), "{text}");
    assert!(text.contains("mock reply to: hello from cli-2"), "{text}");

    // push --wait --json, "-" meaning stdin, no id: a generated ULID.
    let body = r#"{"messages":[{"role":"user","content":"no id given"}],"metadata":{"n":7}}"#;
    let out = cli.run_with_stdin(
        &[
            "--config",
            cfg,
            "--json",
            "push",
            "-",
            "--lane",
            "low",
            "--wait",
            "--timeout",
            "15",
        ],
        Some(body),
    );
    expect_code(&out, 0, "push - --wait --json");
    let r: JobResult = serde_json::from_str(&stdout(&out)).expect("result JSON");
    assert_eq!(r.status, Status::Succeeded);
    assert!(r.id.parse::<ulid::Ulid>().is_ok(), "generated id {}", r.id);
    assert_eq!(r.metadata, Some(serde_json::json!({"n": 7})));
    assert_eq!(
        r.output.as_deref(),
        Some("mock reply to: no id given"),
        "{r:?}"
    );

    // --redis overrides the config's URL (a config pointing nowhere).
    let elsewhere = toml.replace(&redis.url(), &format!("redis://127.0.0.1:{}", free_port()));
    let other = Llmq::new();
    let bad_cfg = other.config_file(&elsewhere);
    let out = other.run(&[
        "--config",
        path_str(&bad_cfg),
        "--redis",
        &redis.url(),
        "result",
        "cli-2",
    ]);
    expect_code(&out, 0, "result with --redis");
    assert!(
        stdout(&out).starts_with("cli-2 succeeded"),
        "{}",
        stdout(&out)
    );

    // A job that cannot run: push --wait prints the failure and exits 1.
    let mut j = job("cli-fail");
    j["route"] = serde_json::json!({"provider": "nowhere"});
    let out = cli.run(&[
        "--config",
        cfg,
        "push",
        "--wait",
        "--timeout",
        "15",
        &j.to_string(),
    ]);
    expect_code(&out, 1, "a failed job");
    assert!(
        stdout(&out).starts_with("cli-fail failed (no_route)"),
        "{}",
        stdout(&out)
    );
    let out = cli.run(&["--config", cfg, "result", "cli-fail"]);
    expect_code(&out, 1, "result of a failed job");

    assert_eq!(mock.stats().total_calls, 3, "{}", tail(&daemon.log(), 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_writes_the_contract_entry_and_bad_input_exits_2() {
    let redis = RedisServer::start();
    let url = redis.url();
    let cli = Llmq::new();

    // Argument, default lane.
    let out = cli.run(&["--redis", &url, "push", &job_json("p-1")]);
    expect_code(&out, 0, "push");
    assert_eq!(stdout(&out).trim(), "p-1");
    // stdin, --lane high, --json.
    let out = cli.run_with_stdin(
        &["--redis", &url, "--json", "push", "--lane", "high"],
        Some(&job_json("p-2")),
    );
    expect_code(&out, 0, "push --lane high --json");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v, serde_json::json!({"id": "p-2"}));
    // No id: one is generated and written into the entry.
    let out = cli.run(&[
        "--redis",
        &url,
        "push",
        "--lane",
        "low",
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    ]);
    expect_code(&out, 0, "push without id");
    let generated = stdout(&out).trim().to_string();
    assert!(generated.parse::<ulid::Ulid>().is_ok(), "{generated}");

    let normal = lane_entries(&redis, "normal");
    let high = lane_entries(&redis, "high");
    let low = lane_entries(&redis, "low");
    assert_eq!(normal.len(), 1);
    assert_eq!(normal[0]["id"], "p-1");
    assert_eq!(normal[0]["messages"][0]["content"], "hello from p-1");
    assert_eq!(high.len(), 1);
    assert_eq!(high[0]["id"], "p-2");
    assert_eq!(low.len(), 1);
    assert_eq!(low[0]["id"], generated.as_str());

    // Bad input is bad usage (2) and says why; nothing is pushed.
    let out = cli.run(&["--redis", &url, "push", "{not json"]);
    expect_code(&out, 2, "invalid JSON");
    assert!(stderr(&out).contains("not valid JSON"), "{}", stderr(&out));
    let out = cli.run(&["--redis", &url, "push", r#"{"id":"x","messages":"hi"}"#]);
    expect_code(&out, 2, "wrong type");
    assert!(stderr(&out).contains("`messages`"), "{}", stderr(&out));
    let out = cli.run(&[
        "--redis",
        &url,
        "push",
        "--lane",
        "no such lane!",
        &job_json("p-3"),
    ]);
    expect_code(&out, 2, "invalid lane");
    assert!(stderr(&out).contains("invalid lane"), "{}", stderr(&out));
    let out = cli.run_with_stdin(&["--redis", &url, "push"], Some(""));
    expect_code(&out, 2, "empty stdin");
    let total: usize = ["normal", "high", "low"]
        .iter()
        .map(|l| lane_entries(&redis, l).len())
        .sum();
    assert_eq!(total, 3, "bad jobs are not pushed");

    // Missing results: 3.
    let out = cli.run(&["--redis", &url, "result", "nope"]);
    expect_code(&out, 3, "result of an unknown job");
    assert!(
        stderr(&out).contains("no result for job nope"),
        "{}",
        stderr(&out)
    );
    let out = cli.run(&["--redis", &url, "wait", "nope", "--timeout", "1"]);
    expect_code(&out, 3, "wait times out");
    assert!(stderr(&out).contains("within 1s"), "{}", stderr(&out));

    // Redis unreachable: a runtime failure (1) that says so.
    let down = format!("redis://127.0.0.1:{}", free_port());
    let out = cli.run(&["--redis", &down, "result", "p-1"]);
    expect_code(&out, 1, "redis down");
    assert!(stderr(&out).contains("redis"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_exits_2_naming_the_file_and_the_field() {
    let redis = RedisServer::start();
    let cli = Llmq::new();
    let cfg = cli.config_file("[queue]\nconcurrency = \"many\"\n");
    let cfg = path_str(&cfg);
    let url = redis.url();
    for args in [
        vec!["check-config"],
        vec!["push", r#"{"messages":[{"role":"user","content":"x"}]}"#],
        vec!["result", "x"],
        vec!["wait", "x", "--timeout", "1"],
        vec!["routes"],
        vec!["serve"],
    ] {
        let mut full = vec!["--config", cfg, "--redis", &url];
        full.extend(args.iter().copied());
        let out = cli.run(&full);
        expect_code(&out, 2, &format!("{args:?} with a bad config"));
        let err = stderr(&out);
        assert!(err.contains(cfg), "{args:?} names the file: {err}");
        assert!(
            err.contains("queue.concurrency"),
            "{args:?} names the field: {err}"
        );
    }
    // A missing file.
    let out = cli.run(&["--config", "/nonexistent/llmq.toml", "check-config"]);
    expect_code(&out, 2, "missing config file");
    assert!(
        stderr(&out).contains("/nonexistent/llmq.toml"),
        "{}",
        stderr(&out)
    );
    // A bad env override names the variable.
    let cli = Llmq::new().env("LLMQ__QUEUE__MAX_ATTEMPTS", "lots");
    let out = cli.run(&["check-config"]);
    expect_code(&out, 2, "bad env override");
    let err = stderr(&out);
    assert!(
        err.contains("LLMQ__QUEUE__MAX_ATTEMPTS") && err.contains("queue.max_attempts"),
        "{err}"
    );
    // Bad usage (clap) is 2 as well.
    let out = Llmq::new().run(&["push", "--no-such-flag"]);
    expect_code(&out, 2, "unknown flag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_routes_and_plugins_describe_the_setup() {
    let redis = RedisServer::start();
    let mock = oa_mock().await;
    let cli = Llmq::new().env("OA_API_KEY_1", SECRET);
    let cfg = cli.config_file(&oa_config(&redis, &mock));
    let cfg = path_str(&cfg);

    let out = cli.run(&["--config", cfg, "check-config"]);
    expect_code(&out, 0, "check-config");
    assert!(
        stdout(&out).contains("1 keys, 1 routes"),
        "{}",
        stdout(&out)
    );
    let out = cli.run(&["--config", cfg, "--json", "check-config"]);
    expect_code(&out, 0, "check-config --json");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["keys"], 1);
    assert_eq!(v["routes"], 1);

    // A routed provider whose plugin is not in the plugins dir: serve starts
    // with that provider disabled (its keys say why), and check-config, the
    // operator's pre-flight, fails naming the file and field.
    let other = Llmq::new().env("OA_API_KEY_1", SECRET);
    let bad = other
        .config_file(&oa_config(&redis, &mock).replace("plugin = \"openai\"", "plugin = \"nope\""));
    let out = other.run(&["--config", path_str(&bad), "check-config"]);
    expect_code(&out, 2, "check-config with a missing plugin");
    let err = stderr(&out);
    assert!(
        err.contains(path_str(&bad)) && err.contains("providers.oa.plugin"),
        "{err}"
    );

    let out = cli.run(&["--config", cfg, "routes"]);
    expect_code(&out, 0, "routes");
    let text = stdout(&out);
    assert!(text.contains("oa/m1"), "{text}");
    assert!(
        text.contains("provider openai is disabled"),
        "explains exclusions: {text}"
    );
    let out = cli.run(&[
        "--config",
        cfg,
        "--json",
        "routes",
        r#"{"messages":[{"role":"user","content":"x"}],"model":"m1"}"#,
    ]);
    expect_code(&out, 0, "routes --json");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("routes JSON");
    assert!(v.to_string().contains("\"oa\""), "{v}");
    let out = cli.run(&["--config", cfg, "routes", "{bad"]);
    expect_code(&out, 2, "routes with a bad job");

    let out = cli.run(&["--config", cfg, "plugins"]);
    expect_code(&out, 0, "plugins");
    let text = stdout(&out);
    for name in ["openai", "anthropic", "gemini"] {
        assert!(text.contains(name), "{text}");
    }
    let out = cli.run(&["--config", cfg, "--json", "plugins"]);
    expect_code(&out, 0, "plugins --json");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<&str> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(names.contains(&"openai"), "{v}");
    assert_eq!(v["refused"], serde_json::json!([]));
}

#[test]
fn every_subcommand_has_help() {
    let cli = Llmq::new();
    let out = cli.run(&["--help"]);
    expect_code(&out, 0, "llmq --help");
    let top = stdout(&out);
    // Every subcommand the help lists (so new ones are covered too).
    let listed: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|s| *s != "help")
        .collect();
    for sub in [
        "serve",
        "push",
        "wait",
        "result",
        "keys",
        "usage",
        "routes",
        "plugins",
        "check-config",
        "demo",
    ] {
        assert!(listed.contains(&sub), "top-level help lists {sub}: {top}");
    }
    for sub in listed {
        let out = cli.run(&[sub, "--help"]);
        expect_code(&out, 0, &format!("llmq {sub} --help"));
        let text = stdout(&out);
        assert!(
            text.contains("Usage:") && text.contains(&format!("llmq {sub}")),
            "{sub}: {text}"
        );
    }
    for args in [["keys", "reset"], ["keys", "disable"]] {
        let out = cli.run(&[args[0], args[1], "--help"]);
        expect_code(&out, 0, &format!("{args:?} --help"));
    }
    let out = cli.run(&["push", "--help"]);
    for flag in [
        "--lane",
        "--wait",
        "--timeout",
        "--json",
        "--redis",
        "--config",
    ] {
        assert!(stdout(&out).contains(flag), "push --help shows {flag}");
    }
}
