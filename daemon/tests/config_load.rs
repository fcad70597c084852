//! Config loading: catalog defaults, field-by-field overrides, env
//! overrides and precise errors (file + field + expectation).

use llmq::config::{self, load_from_str, load_layers, Config, LimitShape, RouteOrder};
use llmq::error::Error;
use llmq::job::{Capability, Strategy, Tier};
use std::collections::BTreeMap;
use std::time::Duration;

fn err(toml: &str) -> (String, String, String) {
    match load_from_str(toml, "test.toml") {
        Err(Error::Config {
            file,
            field,
            expected,
        }) => (file, field, expected),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected an error for:\n{toml}"),
    }
}

fn no_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}

#[test]
fn no_file_gives_the_defaults_and_the_catalog() {
    let cfg = load_layers(None, &no_env()).unwrap();
    let defaults = Config::default();
    assert_eq!(cfg.redis, defaults.redis);
    assert_eq!(cfg.queue, defaults.queue);
    assert_eq!(cfg.routing.order, RouteOrder::Cost);
    let catalog = llmq::config::catalog_providers().unwrap();
    assert_eq!(
        cfg.providers.keys().collect::<Vec<_>>(),
        catalog.keys().collect::<Vec<_>>()
    );
    let groq = &cfg.providers["groq"];
    assert_eq!(groq.base_url, "https://api.groq.com/openai/v1");
    assert_eq!(groq.tier, Tier::Free);
    assert_eq!(groq.keys_env.as_deref(), Some("GROQ"));
    assert_eq!(groq.limits.rpm, Some(30));
    assert_eq!(groq.limits.tpm, Some(6000));
    assert_eq!(groq.limits.rpd, Some(14400));
    assert_eq!(groq.window, Some(Duration::from_secs(60)));
    assert_eq!(
        cfg.providers["anthropic"].limit_shape,
        LimitShape::TokenBucket
    );
    assert_eq!(cfg.providers["openai"].limit_shape, LimitShape::Rolling);
    // Keyless Ollama keeps no keys_env.
    assert!(cfg.providers["ollama"].keyless);
    assert_eq!(cfg.providers["ollama"].keys_env, None);
}

#[test]
fn user_file_overrides_the_catalog_field_by_field() {
    let cfg = load_from_str(
        r#"
        [queue]
        concurrency = 16

        [providers.groq]
        limits = { rpm = 10 }
        strategy = "least-loaded"

        [[providers.groq.models]]
        id = "llama-3.1-8b-instant"
        price = { input = 0.05 }
        context = 4096

        [[providers.groq.models]]
        id = "my-new-model"
        capabilities = ["json"]
        context = 32768
        "#,
        "over.toml",
    )
    .unwrap();
    assert_eq!(cfg.queue.concurrency, 16);
    assert_eq!(cfg.queue.max_attempts, 5, "untouched default kept");
    let groq = &cfg.providers["groq"];
    assert_eq!(groq.limits.rpm, Some(10));
    assert_eq!(groq.limits.tpm, Some(6000), "catalog tpm kept");
    assert_eq!(groq.limits.rpd, Some(14400), "catalog rpd kept");
    assert_eq!(groq.base_url, "https://api.groq.com/openai/v1");
    assert_eq!(groq.strategy, Strategy::LeastLoaded);
    assert_eq!(groq.tier, Tier::Free);

    let catalog_groq = &llmq::config::catalog_providers().unwrap()["groq"];
    assert_eq!(groq.models.len(), catalog_groq.models.len() + 1);
    let m = groq
        .models
        .iter()
        .find(|m| m.id == "llama-3.1-8b-instant")
        .unwrap();
    assert_eq!(m.context, Some(4096));
    assert_eq!(m.price.input, 0.05);
    assert_eq!(m.price.output, 0.0, "catalog output price kept");
    assert_eq!(m.capabilities, vec![Capability::Json, Capability::Tools]);
    let new = groq.models.last().unwrap();
    assert_eq!(new.id, "my-new-model");
    assert_eq!(new.capabilities, vec![Capability::Json]);

    // Other providers untouched.
    assert_eq!(
        cfg.providers["openai"],
        load_layers(None, &no_env()).unwrap().providers["openai"]
    );
}

#[test]
fn a_new_provider_is_added_with_derived_keys_env() {
    let cfg = load_from_str(
        r#"
        [providers.my-llm]
        base_url = "https://llm.example.com/v1/"
        tier = "trial"
        [[providers.my-llm.models]]
        id = "m1"
        "#,
        "new.toml",
    )
    .unwrap();
    let p = &cfg.providers["my-llm"];
    assert_eq!(p.plugin, "openai");
    assert_eq!(
        p.base_url, "https://llm.example.com/v1",
        "trailing slash trimmed"
    );
    assert_eq!(p.keys_env.as_deref(), Some("MY_LLM"));
    assert_eq!(p.tier, Tier::Trial);
    assert!(cfg.providers.contains_key("groq"), "catalog still there");
}

#[test]
fn zero_limit_removes_a_catalog_limit() {
    let cfg = load_from_str("[providers.groq]\nlimits = { rpd = 0 }\n", "z.toml").unwrap();
    assert_eq!(cfg.providers["groq"].limits.rpd, None);
    assert_eq!(cfg.providers["groq"].limits.rpm, Some(30));
}

#[test]
fn env_overrides_beat_the_file() {
    let env: BTreeMap<String, String> = [
        ("LLMQ__QUEUE__CONCURRENCY", "7"),
        ("LLMQ__REDIS__URL", "redis://10.1.2.3:6380/2"),
        ("LLMQ__PROVIDERS__GROQ__LIMITS__RPM", "3"),
        ("LLMQ__ROUTING__ORDER", "priority"),
        ("LLMQ__QUEUE__LANES", "high,low"),
        ("UNRELATED", "x"),
        ("LLMQ_ADMIN_TOKEN", "not-a-config-field"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = load_layers(
        Some(("[queue]\nconcurrency = 100\nmax_attempts = 9\n", "f.toml")),
        &env,
    )
    .unwrap();
    assert_eq!(cfg.queue.concurrency, 7);
    assert_eq!(cfg.queue.max_attempts, 9);
    assert_eq!(cfg.redis.url, "redis://10.1.2.3:6380/2");
    assert_eq!(cfg.providers["groq"].limits.rpm, Some(3));
    assert_eq!(cfg.providers["groq"].limits.tpm, Some(6000));
    assert_eq!(cfg.routing.order, RouteOrder::Priority);
    assert_eq!(cfg.queue.lanes, vec!["high".to_string(), "low".to_string()]);
}

#[test]
fn bad_env_values_name_the_variable() {
    let env: BTreeMap<String, String> = [("LLMQ__QUEUE__CONCURRENCY", "0")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let e = load_layers(None, &env).unwrap_err().to_string();
    assert!(e.contains("LLMQ__QUEUE__CONCURRENCY"), "{e}");
    assert!(e.contains("queue.concurrency"), "{e}");

    let env: BTreeMap<String, String> = [("LLMQ__QUEUE__CONCURENCY", "3")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let e = load_layers(None, &env).unwrap_err().to_string();
    assert!(e.contains("LLMQ__QUEUE__CONCURENCY"), "{e}");
    assert!(e.contains("unknown field"), "{e}");

    let env: BTreeMap<String, String> = [("LLMQ__QUEUE__RESULT_TTL", "forever")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let e = load_layers(None, &env).unwrap_err().to_string();
    assert!(e.contains("LLMQ__QUEUE__RESULT_TTL"), "{e}");
    assert!(e.contains("not a duration"), "{e}");
}

#[test]
fn unknown_field_names_file_field_and_alternatives() {
    let (file, field, expected) = err("[redis]\nurll = \"redis://x\"\n");
    assert_eq!(file, "test.toml");
    assert_eq!(field, "redis.urll");
    assert!(expected.contains("unknown field `urll`"), "{expected}");
    assert!(expected.contains("`url`"), "{expected}");
    assert!(expected.contains("line 2"), "{expected}");

    let (_, field, _) = err("[providers.groq]\nlimits = { rpm = 1, rpx = 2 }\n");
    assert_eq!(field, "providers.groq.limits.rpx");

    let (_, field, _) = err("[[providers.groq.models]]\nid = \"x\"\nvison = true\n");
    assert_eq!(field, "providers.groq.models[0].vison");

    let (_, field, _) = err("[quue]\nconcurrency = 1\n");
    assert_eq!(field, "quue");
}

#[test]
fn wrong_types_name_the_field() {
    let (file, field, expected) = err("[providers.groq]\nlimits = { rpm = \"ten\" }\n");
    assert_eq!(file, "test.toml");
    assert_eq!(field, "providers.groq.limits.rpm");
    assert!(expected.contains("invalid type"), "{expected}");
    assert!(
        expected.contains("u64") || expected.contains("integer"),
        "{expected}"
    );

    let (_, field, expected) = err("[providers.groq]\nlimits = { rpm = -5 }\n");
    assert_eq!(field, "providers.groq.limits.rpm");
    assert!(expected.contains("-5"), "{expected}");

    let (_, field, _) = err("[queue]\nlanes = \"high\"\n");
    assert_eq!(field, "queue.lanes");
}

#[test]
fn bad_durations_and_enums_say_what_was_expected() {
    let (_, field, expected) = err("[queue]\nvisibility_timeout = \"5 parsecs\"\n");
    assert_eq!(field, "queue.visibility_timeout");
    assert!(expected.contains("not a duration"), "{expected}");
    assert!(expected.contains("\"5m\""), "{expected}");

    let (_, field, _) = err("[providers.groq]\ncooldown = 60\n");
    assert_eq!(field, "providers.groq.cooldown");

    let (_, field, expected) = err("[providers.groq]\nstrategy = \"fastest\"\n");
    assert_eq!(field, "providers.groq.strategy");
    assert!(expected.contains("round-robin"), "{expected}");

    let (_, field, expected) = err("[routing]\norder = \"random\"\n");
    assert_eq!(field, "routing.order");
    assert!(
        expected.contains("cost") && expected.contains("priority"),
        "{expected}"
    );

    let (_, field, _) = err("[providers.groq]\ntier = \"gold\"\n");
    assert_eq!(field, "providers.groq.tier");
}

#[test]
fn semantic_errors_name_the_file_that_set_the_field() {
    let (file, field, expected) = err("[queue]\nconcurrency = 0\n");
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "queue.concurrency")
    );
    assert!(expected.contains("≥ 1"), "{expected}");

    let (file, field, expected) = err("[providers.groq]\nbase_url = \"\"\n");
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "providers.groq.base_url")
    );
    assert!(expected.contains("base URL"), "{expected}");

    // A new provider without base_url: the user's file defined it.
    let (file, field, _) =
        err("[providers.new]\ntier = \"free\"\n[[providers.new.models]]\nid = \"m\"\n");
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "providers.new.base_url")
    );

    let (file, field, expected) = err("[[providers.groq.models]]\ncapabilities = [\"vision\"]\n");
    assert_eq!(file, "test.toml");
    assert_eq!(field, "providers.groq.models[0].id");
    assert!(expected.contains("id"), "{expected}");

    // The model is the catalog's 3rd groq model, but the user's first entry:
    // the path is as written in the user's file.
    let (file, field, expected) = err(
        "[[providers.groq.models]]\nid = \"llama-3.1-8b-instant\"\nprice = { output = -1.0 }\n",
    );
    assert_eq!(file, "test.toml");
    assert_eq!(field, "providers.groq.models[0].price.output");
    assert!(expected.contains("≥ 0"), "{expected}");

    let (_, field, _) = err("[providers.groq]\nmax_concurrent = 0\n");
    assert_eq!(field, "providers.groq.max_concurrent");

    let (_, field, _) = err("[providers.groq]\nwindow = \"0s\"\n");
    assert_eq!(field, "providers.groq.window");

    let (_, field, _) = err("[redis]\nurl = \"http://localhost\"\n");
    assert_eq!(field, "redis.url");

    let (_, field, _) = err("[admin]\nlisten = \"localhost\"\n");
    assert_eq!(field, "admin.listen");

    let (_, field, _) = err("[queue.retry]\nfactor = 0.5\n");
    assert_eq!(field, "queue.retry.factor");

    let (_, field, _) = err("[[providers.groq.keys]]\nweight = 2\n");
    assert_eq!(field, "providers.groq.keys[0]");

    let (_, field, expected) = err(
        "[providers.x]\nbase_url = \"https://x\"\n[[providers.x.models]]\nid = \"a\"\naliases = [\"b\"]\n[[providers.x.models]]\nid = \"b\"\n",
    );
    assert_eq!(field, "providers.x.models[1].id");
    assert!(expected.contains("already names"), "{expected}");

    let (_, field, _) = err("[providers.\"bad/name\"]\nbase_url = \"https://x\"\n");
    assert_eq!(field, "providers.bad/name");

    let (_, field, _) = err("[providers.y]\nbase_url = \"https://y\"\n");
    assert_eq!(field, "providers.y.models");
}

#[test]
fn syntax_errors_give_the_line_without_echoing_it() {
    let (file, field, expected) = err("[redis]\nurl = \"redis://x\n[queue]\n");
    assert_eq!(file, "test.toml");
    assert_eq!(field, "(syntax)");
    assert!(expected.contains("line 2"), "{expected}");
    // The source text is not echoed (a secret could be on that line).
    assert!(!expected.contains("redis://x"), "{expected}");
}

#[test]
fn secrets_in_keys_never_appear_in_errors() {
    let secret = "sk-live-0123456789abcdef";
    let toml = format!("[[providers.groq.keys]]\nkey = \"{secret}\"\nweight = 0\n");
    let e = load_from_str(&toml, "k.toml").unwrap_err().to_string();
    assert!(e.contains("providers.groq.keys[0].weight"), "{e}");
    assert!(!e.contains(secret), "{e}");

    let toml = format!("[[providers.groq.keys]]\nkey = \"{secret}\"\nwieght = 1\n");
    let e = load_from_str(&toml, "k.toml").unwrap_err().to_string();
    assert!(e.contains("wieght"), "{e}");
    assert!(!e.contains(secret), "{e}");
}

#[test]
fn missing_file_is_named() {
    let e = config::load(Some(std::path::Path::new("/nonexistent/llmq.toml")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/llmq.toml"), "{e}");
}

#[test]
fn load_reads_a_file_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llmq.toml");
    std::fs::write(
        &path,
        "[queue]\nconcurrency = 3\n[providers.groq]\nenabled = false\n",
    )
    .unwrap();
    let cfg = config::load(Some(&path)).unwrap();
    assert_eq!(cfg.queue.concurrency, 3);
    assert!(!cfg.providers["groq"].enabled);

    std::fs::write(&path, "[queue]\nconcurrency = 0\n").unwrap();
    let e = config::load(Some(&path)).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("queue.concurrency"), "{e}");
}

#[test]
fn the_annotated_example_loads() {
    let text = include_str!("../../config/llmq.toml");
    let cfg = load_from_str(text, "config/llmq.toml").unwrap();
    assert_eq!(cfg.providers["groq"].limits.rpm, Some(20));
    assert_eq!(cfg.providers["groq"].limits.tpm, Some(6000));
    assert_eq!(cfg.providers["groq"].strategy, Strategy::LeastLoaded);
    let ds = &cfg.providers["deepseek"];
    assert_eq!(ds.base_url, "https://api.deepseek.com/v1");
    assert_eq!(ds.budget_usd_per_day, Some(5.0));
    assert_eq!(ds.models[0].id, "deepseek-chat");
    // Everything the example sets equals the built-in default, except the
    // provider overrides: the example documents the defaults truthfully.
    let defaults = Config::default();
    assert_eq!(cfg.redis, defaults.redis);
    assert_eq!(cfg.queue, defaults.queue);
    assert_eq!(cfg.routing, defaults.routing);
    assert_eq!(cfg.keys, defaults.keys);
    assert_eq!(cfg.plugins, defaults.plugins);
    assert_eq!(cfg.admin, defaults.admin);
}

#[test]
fn daily_reset_is_a_time_and_an_iana_zone() {
    let cfg = load_layers(None, &no_env()).unwrap();
    assert_eq!(
        cfg.providers["groq"].daily_reset.to_string(),
        "00:00 UTC",
        "the default"
    );
    let cfg = load_from_str(
        "[providers.groq]\ndaily_reset = \"00:00 America/Los_Angeles\"\n",
        "test.toml",
    )
    .unwrap();
    assert_eq!(
        cfg.providers["groq"].daily_reset.zone(),
        "America/Los_Angeles"
    );

    for (bad, says) in [
        ("25:00 UTC", "23:59"),
        ("00:00 Mars/Olympus", "unknown time zone \"Mars/Olympus\""),
    ] {
        let (file, field, expected) = err(&format!("[providers.groq]\ndaily_reset = \"{bad}\"\n"));
        assert_eq!(
            (file.as_str(), field.as_str()),
            ("test.toml", "providers.groq.daily_reset"),
            "{bad}"
        );
        assert!(expected.contains(says), "{bad}: {expected}");
    }
}

#[test]
fn the_catalog_resets_gemini_at_pacific_midnight() {
    let cfg = load_layers(None, &no_env()).unwrap();
    let gemini = &cfg.providers["gemini"].daily_reset;
    assert_eq!(gemini.to_string(), "00:00 America/Los_Angeles");
    // 2024-01-16T07:59:59Z is 23:59:59 PST on the 15th; a second on, the 16th.
    let t = 1_705_391_999_000;
    assert_eq!(gemini.next_after(t), t + 1_000);
    assert_eq!(cfg.providers["openai"].daily_reset.to_string(), "00:00 UTC");
}

#[test]
fn a_key_entry_names_its_account() {
    let cfg = load_from_str(
        "[[providers.groq.keys]]\nkey_env = \"K1\"\naccount = \"team-a\"\n",
        "test.toml",
    )
    .unwrap();
    assert_eq!(
        cfg.providers["groq"].keys[0].account.as_deref(),
        Some("team-a")
    );
    let (file, field, expected) =
        err("[[providers.groq.keys]]\nkey_env = \"K1\"\naccount = \"a:b{c}\"\n");
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "providers.groq.keys[0].account")
    );
    assert!(expected.contains("account name"), "{expected}");
}

#[test]
fn a_bad_daily_reset_in_env_names_the_variable() {
    let env: BTreeMap<String, String> =
        [("LLMQ__PROVIDERS__GEMINI__DAILY_RESET", "00:00 Mars/Olympus")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let e = load_layers(None, &env).unwrap_err().to_string();
    assert!(e.contains("LLMQ__PROVIDERS__GEMINI__DAILY_RESET"), "{e}");
    assert!(e.contains("providers.gemini.daily_reset"), "{e}");
    assert!(e.contains("Mars/Olympus"), "{e}");
    let env: BTreeMap<String, String> =
        [("LLMQ__PROVIDERS__GROQ__DAILY_RESET", "05:30 Asia/Kolkata")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let cfg = load_layers(None, &env).unwrap();
    assert_eq!(
        cfg.providers["groq"].daily_reset.to_string(),
        "05:30 Asia/Kolkata"
    );
}

#[test]
fn job_limits_load_with_defaults_and_refuse_zero_models() {
    let cfg = load_from_str("", "test.toml").unwrap();
    assert_eq!(cfg.queue.max_models, 32);
    assert_eq!(cfg.queue.dead_body_bytes, 4096);
    let limits = cfg.queue.job_limits();
    assert_eq!((limits.max_bytes, limits.max_models), (1048576, 32));

    let cfg = load_from_str(
        "[queue]\nmax_models = 64\ndead_body_bytes = 0\n",
        "test.toml",
    )
    .unwrap();
    assert_eq!(cfg.queue.max_models, 64);
    assert_eq!(cfg.queue.dead_body_bytes, 0);

    let (file, field, expected) = err("[queue]\nmax_models = 0\n");
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "queue.max_models")
    );
    assert!(expected.contains("≥ 1"), "{expected}");
}
