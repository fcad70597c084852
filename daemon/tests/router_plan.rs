//! The router: which routes fit a job, in which order, and why not.

use llmq::config::{load_layers, Config, RouteOrder};
use llmq::job::{parse_job, Job, Tier};
use llmq::router::RouteTable;
use std::collections::BTreeMap;

/// A small fixed config, independent of the catalog's prices.
const FIXED: &str = r#"
[providers.freebie]
base_url = "https://free.example/v1"
tier = "free"
[[providers.freebie.models]]
id = "small-free"
capabilities = ["json"]
context = 8192
[[providers.freebie.models]]
id = "big-free"
capabilities = ["json", "tools"]
context = 131072
[[providers.freebie.models]]
id = "vision-free"
aliases = ["eyes"]
capabilities = ["vision"]
context = 32768

[providers.trialco]
base_url = "https://trial.example/v1"
tier = "trial"
[[providers.trialco.models]]
id = "t-vision"
capabilities = ["vision", "json"]
context = 128000
price = { input = 0.15, output = 0.15 }

[providers.paidco]
plugin = "anthropic"
base_url = "https://paid.example/v1"
tier = "paid"
[[providers.paidco.models]]
id = "p-cheap"
aliases = ["cheap"]
capabilities = ["vision", "json", "tools"]
context = 128000
price = { input = 0.15, output = 0.6 }
[[providers.paidco.models]]
id = "p-pricey"
aliases = ["pricey"]
capabilities = ["vision", "json", "tools"]
context = 128000
price = { input = 2.5, output = 10.0 }
[[providers.paidco.models]]
id = "p-huge"
capabilities = ["json"]
context = 1000000
price = { input = 1.0, output = 4.0 }
[[providers.paidco.models]]
id = "big-free"
context = 131072
price = { input = 0.5, output = 0.5 }

[providers.nokeys]
base_url = "https://nokeys.example/v1"
tier = "free"
keys_env = "NOKEYS"
[[providers.nokeys.models]]
id = "nk-model"
capabilities = ["vision"]
context = 8192

[providers.off]
base_url = "https://off.example/v1"
enabled = false
[[providers.off.models]]
id = "off-model"
"#;

fn fixed_config() -> Config {
    toml::from_str(FIXED).unwrap()
}

fn fixed() -> RouteTable {
    RouteTable::new(&fixed_config(), |p| p != "nokeys")
}

fn job(json: &str) -> Job {
    parse_job(json.as_bytes(), 1 << 20).unwrap()
}

fn text_job(extra: &str) -> Job {
    job(&format!(
        r#"{{"id":"j","messages":[{{"role":"user","content":"hello there"}}]{extra}}}"#
    ))
}

fn image_job(extra: &str) -> Job {
    job(&format!(
        r#"{{"id":"j","messages":[{{"role":"user","content":[{{"type":"text","text":"what is this"}},{{"type":"image_url","image_url":{{"url":"https://x/y.png"}}}}]}}]{extra}}}"#
    ))
}

fn names(t: &RouteTable, j: &Job) -> Vec<String> {
    t.plan(j, None)
        .unwrap()
        .routes
        .iter()
        .map(|r| r.name())
        .collect()
}

fn no_route(t: &RouteTable, j: &Job) -> String {
    t.plan(j, None).unwrap_err().message
}

#[test]
fn cost_order_is_free_trial_paid_then_cheapest() {
    let t = fixed();
    assert_eq!(
        names(&t, &text_job("")),
        vec![
            // free, all $0: by name
            "freebie/big-free",
            "freebie/small-free",
            "freebie/vision-free",
            // trial
            "trialco/t-vision",
            // paid, cheapest estimate first: ~7 prompt tokens + 256
            // max_tokens make big-free ($0.5/$0.5) cheaper than p-cheap
            // ($0.15/$0.6), whose output costs more
            "paidco/big-free",
            "paidco/p-cheap",
            "paidco/p-huge",
            "paidco/p-pricey",
        ]
    );
}

#[test]
fn cost_order_over_the_catalog_never_puts_a_dearer_route_first() {
    let cfg = load_layers(None, &BTreeMap::new()).unwrap();
    let t = RouteTable::new(&cfg, |_| true);
    let plan = t.plan(&text_job(""), None).unwrap();
    assert!(plan.routes.len() > 30);
    for w in plan.routes.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(a.tier <= b.tier, "{} before {}", a.name(), b.name());
        if a.tier == b.tier {
            let ca = a.estimate_cost(plan.prompt_tokens, plan.max_tokens);
            let cb = b.estimate_cost(plan.prompt_tokens, plan.max_tokens);
            assert!(ca <= cb, "{} (${ca}) before {} (${cb})", a.name(), b.name());
        }
    }
    assert_eq!(plan.routes[0].tier, Tier::Free);
    assert_eq!(plan.routes.last().unwrap().tier, Tier::Paid);
    // OpenRouter's `:free` model is free although the provider is paid.
    let or_free = plan
        .routes
        .iter()
        .find(|r| r.model == "meta-llama/llama-3.3-70b-instruct:free")
        .unwrap();
    assert_eq!(or_free.tier, Tier::Free);
    // Z.AI's GLM-5 is paid although the provider is free.
    let glm5 = plan.routes.iter().find(|r| r.model == "glm-5").unwrap();
    assert_eq!(glm5.tier, Tier::Paid);
}

#[test]
fn priority_order_reproduces_seed_002s_table() {
    let mut cfg = load_layers(None, &BTreeMap::new()).unwrap();
    cfg.routing.order = RouteOrder::Priority;
    let t = RouteTable::new(&cfg, |_| true);
    let plan = t.plan(&text_job(""), None).unwrap();
    // Seed 002, "Provider Priority Order" (retired models replaced by their
    // successors, see config/catalog.toml).
    let table: Vec<(i64, &str, &str)> = vec![
        (1, "anthropic", "claude-sonnet-4-5"),
        (2, "openai", "gpt-4o"),
        (3, "anthropic", "claude-opus-4-5"),
        (4, "openai", "gpt-4-turbo"),
        (5, "anthropic", "claude-haiku-4-5"),
        (6, "gemini", "gemini-2.5-flash"),
        (7, "gemini", "gemini-2.5-pro"),
        (8, "zai", "glm-4.6v-flash"),
        (9, "groq", "meta-llama/llama-4-scout-17b-16e-instruct"),
        (10, "groq", "meta-llama/llama-4-maverick-17b-128e-instruct"),
        (11, "nvidia", "meta/llama-3.2-11b-vision-instruct"),
        (12, "nvidia", "meta/llama-3.2-90b-vision-instruct"),
        (13, "nvidia", "microsoft/phi-3.5-vision-instruct"),
        (14, "mistral", "pixtral-12b-2409"),
        (15, "mistral", "pixtral-large-latest"),
        (16, "gemini", "gemini-3-flash-preview"),
        (17, "gemini", "gemini-3-pro-preview"),
        (18, "gemini", "gemini-2.5-flash-lite"),
        (20, "zai", "glm-4.6v"),
        (21, "zai", "glm-4.5v"),
        (25, "zai", "glm-5"),
    ];
    let got: Vec<(i64, &str, &str)> = plan.routes[..table.len()]
        .iter()
        .map(|r| (r.priority.unwrap(), r.provider.as_str(), r.model.as_str()))
        .collect();
    assert_eq!(got, table);
    // Everything else has no priority and comes after.
    assert!(plan.routes[table.len()..]
        .iter()
        .all(|r| r.priority.is_none()));

    // A vision job keeps the same relative order (GLM-5 has no vision).
    let plan = t.plan(&image_job(""), None).unwrap();
    let vision: Vec<i64> = plan.routes.iter().filter_map(|r| r.priority).collect();
    let expected: Vec<i64> = table.iter().map(|e| e.0).filter(|p| *p != 25).collect();
    assert_eq!(vision, expected);
}

#[test]
fn model_by_id_alias_or_provider_slash_model() {
    let t = fixed();
    assert_eq!(
        names(&t, &text_job(r#","model":"p-pricey""#)),
        vec!["paidco/p-pricey"]
    );
    assert_eq!(
        names(&t, &text_job(r#","model":"pricey""#)),
        vec!["paidco/p-pricey"]
    );
    assert_eq!(
        names(&t, &image_job(r#","model":"eyes""#)),
        vec!["freebie/vision-free"]
    );
    // An id served by two providers: both, free first.
    assert_eq!(
        names(&t, &text_job(r#","model":"big-free""#)),
        vec!["freebie/big-free", "paidco/big-free"]
    );
    // provider/model pins the provider.
    assert_eq!(
        names(&t, &text_job(r#","model":"paidco/big-free""#)),
        vec!["paidco/big-free"]
    );
    assert_eq!(
        names(&t, &text_job(r#","model":"paidco/cheap""#)),
        vec!["paidco/p-cheap"]
    );
    // route.provider pins too.
    assert_eq!(
        names(
            &t,
            &text_job(r#","model":"big-free","route":{"provider":"paidco"}"#)
        ),
        vec!["paidco/big-free"]
    );
    // So does a pinned key.
    assert_eq!(
        names(&t, &text_job(r#","route":{"key":"trialco#2"}"#)),
        vec!["trialco/t-vision"]
    );
}

#[test]
fn catalog_models_resolve_by_alias_and_qualified_id_with_slashes() {
    let cfg = load_layers(None, &BTreeMap::new()).unwrap();
    let t = RouteTable::new(&cfg, |_| true);
    assert_eq!(
        names(&t, &text_job(r#","model":"gpt4o""#)),
        vec!["openai/gpt-4o"]
    );
    assert_eq!(
        names(&t, &text_job(r#","model":"groq/llama-3.1-8b-instant""#)),
        vec!["groq/llama-3.1-8b-instant"]
    );
    // Wire ids with a slash still resolve, bare or provider-qualified.
    assert_eq!(
        names(
            &t,
            &text_job(r#","model":"nvidia/meta/llama-3.3-70b-instruct""#)
        ),
        vec!["nvidia/meta/llama-3.3-70b-instruct"]
    );
    assert_eq!(
        names(&t, &text_job(r#","model":"openai/gpt-4o-mini""#)),
        vec!["openai/gpt-4o-mini"],
        "provider/model wins over OpenRouter's id of the same spelling"
    );
    assert_eq!(
        names(&t, &text_job(r#","model":"openrouter/openai/gpt-4o-mini""#)),
        vec!["openrouter/openai/gpt-4o-mini"]
    );
}

#[test]
fn fan_out_branch_model_overrides_the_job_model() {
    let t = fixed();
    let j = text_job(r#","models":["cheap","small-free"]"#);
    let p = t.plan(&j, Some("cheap")).unwrap();
    assert_eq!(p.routes[0].name(), "paidco/p-cheap");
    let p = t.plan(&j, Some("small-free")).unwrap();
    assert_eq!(p.routes[0].name(), "freebie/small-free");
}

#[test]
fn vision_never_goes_to_a_model_without_vision() {
    let t = fixed();
    let plan = t.plan(&image_job(""), None).unwrap();
    let got: Vec<String> = plan.routes.iter().map(|r| r.name()).collect();
    assert_eq!(
        got,
        vec![
            "freebie/vision-free",
            "trialco/t-vision",
            "paidco/p-cheap",
            "paidco/p-pricey"
        ]
    );
    assert!(plan
        .excluded
        .contains(&("freebie/small-free".to_string(), "lacks vision".to_string())));

    let cfg = load_layers(None, &BTreeMap::new()).unwrap();
    let t = RouteTable::new(&cfg, |_| true);
    let plan = t
        .plan(&text_job(r#","require":["vision","tools"]"#), None)
        .unwrap();
    assert!(!plan.routes.is_empty());
    for r in &plan.routes {
        assert!(r.has(llmq::job::Capability::Vision), "{}", r.name());
        assert!(r.has(llmq::job::Capability::Tools), "{}", r.name());
    }
}

#[test]
fn a_long_prompt_goes_to_a_larger_context() {
    let t = fixed();
    // ~10k prompt tokens: too long for small-free (8192).
    let long = "x".repeat(40_000);
    let j = job(&format!(
        r#"{{"messages":[{{"role":"user","content":"{long}"}}],"require":["json"]}}"#
    ));
    let plan = t.plan(&j, None).unwrap();
    assert_eq!(plan.routes[0].name(), "freebie/big-free");
    assert!(plan.prompt_tokens > 10_000);
    assert!(plan.routes.iter().all(|r| r.model != "small-free"));
    let why = &plan
        .excluded
        .iter()
        .find(|(n, _)| n == "freebie/small-free")
        .unwrap()
        .1;
    assert!(why.contains("context 8192"), "{why}");

    // ~200k tokens fits only p-huge; max_tokens counts toward the need.
    let huge = "x".repeat(800_000);
    let j = job(&format!(
        r#"{{"messages":[{{"role":"user","content":"{huge}"}}],"max_tokens":1000}}"#
    ));
    assert_eq!(names(&t, &j), vec!["paidco/p-huge"]);
}

#[test]
fn max_tier_caps_the_tier() {
    let t = fixed();
    let got = names(&t, &text_job(r#","route":{"max_tier":"free"}"#));
    assert_eq!(
        got,
        vec![
            "freebie/big-free",
            "freebie/small-free",
            "freebie/vision-free"
        ]
    );
    let got = names(&t, &image_job(r#","route":{"max_tier":"trial"}"#));
    assert_eq!(got, vec!["freebie/vision-free", "trialco/t-vision"]);
    let msg = no_route(
        &t,
        &text_job(r#","model":"pricey","route":{"max_tier":"trial"}"#),
    );
    assert!(
        msg.contains("max_tier trial excludes every matching route"),
        "{msg}"
    );
    assert!(msg.contains("paid"), "{msg}");
}

#[test]
fn max_cost_usd_caps_the_estimate() {
    let t = fixed();
    // ~7 prompt tokens + 1000 max_tokens: p-cheap ≈ $0.0006, p-pricey ≈ $0.01.
    let j = text_job(r#","max_tokens":1000,"route":{"max_cost_usd":0.001}"#);
    let got = names(&t, &j);
    assert!(got.contains(&"paidco/p-cheap".to_string()), "{got:?}");
    assert!(!got.contains(&"paidco/p-pricey".to_string()), "{got:?}");
    assert!(!got.contains(&"paidco/p-huge".to_string()), "{got:?}");
    let j = text_job(r#","model":"pricey","max_tokens":1000,"route":{"max_cost_usd":0.001}"#);
    let msg = no_route(&t, &j);
    assert!(
        msg.contains("max_cost_usd $0.001 excludes every matching route"),
        "{msg}"
    );
    assert!(msg.contains("paidco/p-pricey"), "{msg}");
}

#[test]
fn providers_without_keys_and_disabled_ones_are_not_routed() {
    let t = fixed();
    let all: Vec<String> = t.routes().iter().map(|r| r.name()).collect();
    assert!(!all
        .iter()
        .any(|n| n.starts_with("nokeys/") || n.starts_with("off/")));

    let msg = no_route(&t, &text_job(r#","model":"nk-model""#));
    assert!(
        msg.contains("no keys configured for provider nokeys"),
        "{msg}"
    );
    assert!(msg.contains("NOKEYS_API_KEY"), "{msg}");
    let msg = no_route(&t, &text_job(r#","route":{"provider":"nokeys"}"#));
    assert!(
        msg.contains("no keys configured for provider nokeys"),
        "{msg}"
    );
    let msg = no_route(&t, &text_job(r#","model":"off-model""#));
    assert!(msg.contains("disabled"), "{msg}");

    // Catalog: without any key, only keyless routes (Ollama, once enabled).
    let mut cfg = load_layers(None, &BTreeMap::new()).unwrap();
    let t = RouteTable::new(&cfg, |_| false);
    assert!(t.routes().is_empty());
    let msg = no_route(&t, &text_job(r#","model":"gpt-4o""#));
    assert!(
        msg.contains("no keys configured for provider openai"),
        "{msg}"
    );
    cfg.providers.get_mut("ollama").unwrap().enabled = true;
    let t = RouteTable::new(&cfg, |_| false);
    assert!(!t.routes().is_empty());
    assert!(t
        .routes()
        .iter()
        .all(|r| r.provider == "ollama" && r.keyless));
}

#[test]
fn no_route_messages_say_why() {
    let t = fixed();
    let msg = no_route(&t, &text_job(r#","model":"gpt-5""#));
    assert!(
        msg.starts_with("no model matches \"gpt-5\" (known: "),
        "{msg}"
    );
    assert!(msg.contains("p-cheap") && msg.contains("eyes"), "{msg}");

    let msg = no_route(&t, &image_job(r#","model":"small-free""#));
    assert_eq!(
        msg,
        "no route has capability vision for model \"small-free\""
    );

    let msg = no_route(
        &t,
        &text_job(r#","require":["vision","tools"],"model":"eyes""#),
    );
    assert!(msg.contains("vision + tools"), "{msg}");

    let long = "x".repeat(40_000);
    let j = job(&format!(
        r#"{{"messages":[{{"role":"user","content":"{long}"}}],"model":"small-free"}}"#
    ));
    let msg = t.plan(&j, None).unwrap_err().message;
    assert!(msg.starts_with("prompt needs ~10260 tokens"), "{msg}");
    assert!(
        msg.contains("largest context among matching models is 8192"),
        "{msg}"
    );

    let msg = no_route(&t, &text_job(r#","route":{"provider":"nope"}"#));
    assert!(msg.contains("unknown provider \"nope\""), "{msg}");
    let msg = no_route(
        &t,
        &text_job(r#","model":"t-vision","route":{"provider":"freebie"}"#),
    );
    assert!(msg.contains("provider freebie"), "{msg}");
    let msg = no_route(
        &t,
        &text_job(r#","route":{"provider":"freebie","key":"paidco#1"}"#),
    );
    assert!(msg.contains("belongs to provider paidco"), "{msg}");
    // NoRoute displays its message.
    let e = t.plan(&text_job(r#","model":"gpt-5""#), None).unwrap_err();
    assert_eq!(e.to_string(), e.message);
}

#[test]
fn route_costs() {
    let t = fixed();
    let r = t.find("paidco", "pricey").unwrap();
    assert_eq!(r.plugin, "anthropic");
    assert_eq!(r.info.base_url, "https://paid.example/v1");
    assert!((r.cost(1_000_000, 0) - 2.5).abs() < 1e-12);
    assert!((r.cost(1000, 2000) - (0.0025 + 0.02)).abs() < 1e-12);
    assert!((r.estimate_cost(100, 256) - r.cost(100, 256)).abs() < 1e-15);
    assert_eq!(
        t.find("freebie", "small-free")
            .unwrap()
            .cost(10_000, 10_000),
        0.0
    );
}

#[test]
fn the_table_is_shareable() {
    fn shareable<T: Send + Sync + 'static>(_: &T) {}
    let t = std::sync::Arc::new(fixed());
    shareable(&t);
    let t2 = t.clone();
    let h = std::thread::spawn(move || t2.plan(&text_job(""), None).unwrap().routes.len());
    assert_eq!(h.join().unwrap(), t.routes().len());
}
