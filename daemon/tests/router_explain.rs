//! `explain`: the human table `llmq routes` prints, checked against a
//! snapshot (`UPDATE_SNAPSHOTS=1` rewrites it), and its JSON form.

use llmq::config::Config;
use llmq::job::{parse_job, Job};
use llmq::router::RouteTable;
use std::path::PathBuf;

const CONFIG: &str = r#"
[providers.groq]
base_url = "https://api.groq.com/openai/v1"
tier = "free"
[[providers.groq.models]]
id = "llama-3.1-8b-instant"
capabilities = ["json", "tools"]
context = 8192
priority = 3
[[providers.groq.models]]
id = "llama-4-scout"
capabilities = ["vision", "json"]
context = 131072
priority = 2

[providers.mistral]
base_url = "https://api.mistral.ai/v1"
tier = "trial"
[[providers.mistral.models]]
id = "pixtral-12b-2409"
aliases = ["pixtral"]
capabilities = ["vision"]
context = 131072
price = { input = 0.15, output = 0.15 }

[providers.openai]
base_url = "https://api.openai.com/v1"
tier = "paid"
[[providers.openai.models]]
id = "gpt-4o-mini"
capabilities = ["vision", "json", "tools"]
context = 128000
price = { input = 0.15, output = 0.6 }
[[providers.openai.models]]
id = "gpt-4o"
aliases = ["gpt4o"]
capabilities = ["vision", "json", "tools"]
context = 128000
price = { input = 2.5, output = 10.0 }
priority = 1

[providers.anthropic]
plugin = "anthropic"
base_url = "https://api.anthropic.com/v1"
tier = "paid"
keys_env = "ANTHROPIC"
[[providers.anthropic.models]]
id = "claude-sonnet-4-5"
capabilities = ["vision", "json", "tools"]
context = 200000
price = { input = 3.0, output = 15.0 }
"#;

fn table(order: &str) -> RouteTable {
    let mut cfg: Config = toml::from_str(CONFIG).unwrap();
    cfg.routing.order = toml::Value::String(order.into()).try_into().unwrap();
    RouteTable::new(&cfg, |p| p != "anthropic")
}

fn job(json: &str) -> Job {
    parse_job(json.as_bytes(), 1 << 20).unwrap()
}

fn jobs() -> Vec<(&'static str, Job)> {
    let image = r#"[{"type":"text","text":"describe"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]"#;
    let long = "x".repeat(40_000);
    vec![
        (
            "text, any model",
            job(
                r#"{"id":"a","messages":[{"role":"user","content":"Summarise the plot of Hamlet."}]}"#,
            ),
        ),
        (
            "image, max_tier trial",
            job(&format!(
                r#"{{"id":"b","messages":[{{"role":"user","content":{image}}}],"route":{{"max_tier":"trial"}}}}"#
            )),
        ),
        (
            "long prompt, json",
            job(&format!(
                r#"{{"id":"c","messages":[{{"role":"user","content":"{long}"}}],"require":["json"],"max_tokens":1024}}"#
            )),
        ),
        (
            "alias with a cost cap",
            job(
                r#"{"id":"d","messages":[{"role":"user","content":"hi"}],"model":"gpt4o","max_tokens":2000,"route":{"max_cost_usd":0.01}}"#,
            ),
        ),
        (
            "fan-out",
            job(
                r#"{"id":"e","messages":[{"role":"user","content":"hi"}],"models":["groq/llama-3.1-8b-instant","claude-sonnet-4-5","gpt-9"]}"#,
            ),
        ),
    ]
}

fn render_all() -> String {
    let mut out = String::new();
    for order in ["cost", "priority"] {
        let t = table(order);
        for (title, j) in jobs() {
            out.push_str(&format!("=== {title} (order = {order}) ===\n"));
            out.push_str(&t.explain(&j));
            out.push('\n');
        }
    }
    out
}

#[test]
fn explain_matches_the_snapshot() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/router_explain.txt");
    let got = render_all();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "snapshot {} unreadable ({e}); run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    if got != want {
        panic!(
            "explain output differs from {} (UPDATE_SNAPSHOTS=1 to accept):\n--- got ---\n{got}\n--- want ---\n{want}",
            path.display()
        );
    }
}

#[test]
fn explain_json_has_ranks_exclusions_and_errors() {
    let t = table("cost");
    let j = job(
        r#"{"id":"e","messages":[{"role":"user","content":"hi"}],"models":["pixtral","gpt-9"],"require":["vision"]}"#,
    );
    let v = serde_json::to_value(t.explain_data(&j)).unwrap();
    assert_eq!(v["order"], "cost");
    assert_eq!(v["require"], serde_json::json!(["vision"]));
    let b = &v["branches"];
    assert_eq!(b[0]["model"], "pixtral");
    assert_eq!(b[0]["routes"][0]["rank"], 1);
    assert_eq!(b[0]["routes"][0]["route"], "mistral/pixtral-12b-2409");
    assert_eq!(b[0]["routes"][0]["tier"], "trial");
    assert_eq!(b[0]["error"], serde_json::Value::Null);
    assert_eq!(b[1]["model"], "gpt-9");
    assert!(b[1]["error"]
        .as_str()
        .unwrap()
        .starts_with("no model matches \"gpt-9\""));
    assert_eq!(b[1]["routes"], serde_json::json!([]));

    let j = job(
        r#"{"id":"f","messages":[{"role":"user","content":"hi"}],"model":"claude-sonnet-4-5"}"#,
    );
    let v = serde_json::to_value(t.explain_data(&j)).unwrap();
    let err = v["branches"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("no keys configured for provider anthropic"),
        "{err}"
    );
}
