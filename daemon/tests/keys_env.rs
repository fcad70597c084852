//! The key-loading contract (SPEC §4) end to end: every seed env convention,
//! overrides, config keys, merging, `.env` precedence, keyless slots, and
//! that no output ever carries a secret.

use llmq::config::{KeyConfig, Limits, ProviderConfig};
use llmq::keys::{load_keys, mask, EnvSource, KeyError, KeyId, KeyRing};
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::io::Write;

/// The seed providers, as the catalog will name them.
fn catalog() -> BTreeMap<String, ProviderConfig> {
    let mut m = BTreeMap::new();
    for name in [
        "openai",
        "anthropic",
        "gemini",
        "groq",
        "mistral",
        "nvidia",
        "zai",
        "openrouter",
    ] {
        m.insert(name.to_string(), ProviderConfig::default());
    }
    m.insert(
        "ollama".to_string(),
        ProviderConfig {
            keyless: true,
            ..ProviderConfig::default()
        },
    );
    m
}

fn id(s: &str) -> KeyId {
    s.parse().unwrap()
}

fn secret(ring: &KeyRing, key: &str) -> String {
    ring.get(&id(key))
        .unwrap_or_else(|| panic!("{key} missing; have {ring}"))
        .expose_secret()
        .unwrap()
        .to_string()
}

fn ids(ring: &KeyRing, provider: &str) -> Vec<String> {
    ring.for_provider(provider)
        .iter()
        .map(|k| k.id.to_string())
        .collect()
}

fn load(pairs: &[(&str, &str)]) -> KeyRing {
    load_keys(&catalog(), &EnvSource::from_pairs(pairs.iter().copied())).unwrap()
}

fn env_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.flush().unwrap();
    f
}

#[test]
fn bare_key_is_instance_zero() {
    let ring = load(&[("GROQ_API_KEY", "gsk_test_bare_0000000001")]);
    assert_eq!(ids(&ring, "groq"), ["groq#0"]);
    let key = &ring.for_provider("groq")[0];
    assert_eq!(key.source, "env GROQ_API_KEY");
    assert_eq!(key.weight, 1);
    assert!(key.models.is_empty());
    assert_eq!(key.limits, Limits::default());
}

#[test]
fn seed_000_default_plus_numbered() {
    let ring = load(&[
        ("OPENAI_API_KEY", "sk-test-default-000000"),
        ("OPENAI_API_KEY_1", "sk-test-first-00000000"),
        ("OPENAI_API_KEY_2", "sk-test-second-0000000"),
        ("OPENAI_API_KEY_3", "sk-test-third-00000000"),
        ("ANTHROPIC_API_KEY", "sk-ant-test-default-00"),
        ("ANTHROPIC_API_KEY_1", "sk-ant-test-first-0000"),
        ("ANTHROPIC_API_KEY_9", "sk-ant-test-ninth-0000"),
    ]);
    assert_eq!(
        ids(&ring, "openai"),
        ["openai#0", "openai#1", "openai#2", "openai#3"]
    );
    assert_eq!(secret(&ring, "openai#0"), "sk-test-default-000000");
    assert_eq!(secret(&ring, "openai#3"), "sk-test-third-00000000");
    assert_eq!(
        ids(&ring, "anthropic"),
        ["anthropic#0", "anthropic#1", "anthropic#9"]
    );
    assert!(ring.report().renumbered.is_empty());
    assert!(ring.report().merged.is_empty());
}

#[test]
fn seed_001_claude_alias_mixed_with_anthropic_numbers() {
    let ring = load(&[
        ("CLAUDE_API_KEY", "sk-ant-test-main-00000"),
        ("ANTHROPIC_API_KEY_1", "sk-ant-test-first-0000"),
        ("ANTHROPIC_API_KEY_2", "sk-ant-test-second-000"),
        ("GEMINI_API_KEY", "test-gemini-main-0000"),
        ("GEMINI_API_KEY_1", "test-gemini-first-000"),
        ("GROQ_API_KEY", "gsk-test-main-0000000"),
        ("GROQ_API_KEY_2", "gsk-test-second-00000"),
    ]);
    assert_eq!(
        ids(&ring, "anthropic"),
        ["anthropic#0", "anthropic#1", "anthropic#2"]
    );
    assert_eq!(secret(&ring, "anthropic#0"), "sk-ant-test-main-00000");
    assert_eq!(
        ring.get(&id("anthropic#0")).unwrap().source,
        "env CLAUDE_API_KEY"
    );
    assert_eq!(secret(&ring, "anthropic#2"), "sk-ant-test-second-000");
    assert_eq!(ids(&ring, "gemini"), ["gemini#0", "gemini#1"]);
    assert_eq!(ids(&ring, "groq"), ["groq#0", "groq#2"]);
}

#[test]
fn seed_002_numbered_from_one_to_ten_and_google_alias() {
    let mut pairs = vec![
        ("ZAI_API_KEY_1", "xxx.test-zai-one"),
        ("ZAI_API_KEY_2", "aaa.test-zai-two"),
        ("ZAI_API_KEY_3", "ccc.test-zai-three"),
        ("NVIDIA_API_KEY_1", "nvapi-test-one-00000000"),
        ("NVIDIA_API_KEY_5", "nvapi-test-five-0000000"),
        ("MISTRAL_API_KEY_1", "test-mistral-one-000"),
        ("GOOGLE_API_KEY_1", "AIzaSy-test-google-one"),
        ("GOOGLE_API_KEY_2", "AIzaSy-test-google-two"),
        ("GROQ_API_KEY_0", "gsk_test_zero_00000000"),
        ("GROQ_API_KEY_10", "gsk_test_ten_000000000"),
    ];
    pairs.push(("GROQ_API_KEY_2", "gsk_test_two_000000000"));
    let ring = load(&pairs);
    assert_eq!(ids(&ring, "zai"), ["zai#1", "zai#2", "zai#3"]);
    assert_eq!(ids(&ring, "nvidia"), ["nvidia#1", "nvidia#5"]);
    assert_eq!(ids(&ring, "mistral"), ["mistral#1"]);
    assert_eq!(ids(&ring, "gemini"), ["gemini#1", "gemini#2"]);
    assert_eq!(
        ring.get(&id("gemini#2")).unwrap().source,
        "env GOOGLE_API_KEY_2"
    );
    assert_eq!(ids(&ring, "groq"), ["groq#0", "groq#2", "groq#10"]);
    assert_eq!(secret(&ring, "groq#10"), "gsk_test_ten_000000000");
}

#[test]
fn seed_003_openrouter_numbered() {
    let ring = load(&[
        ("OPENROUTER_API_KEY_1", "sk-or-v1-test-1111111111111111"),
        ("OPENROUTER_API_KEY_2", "sk-or-v1-test-2222222222222222"),
        ("OPENROUTER_API_KEY_3", "sk-or-v1-test-3333333333333333"),
        ("OPENROUTER_API_KEY_4", "sk-or-v1-test-4444444444444444"),
        ("PORT", "4000"),
    ]);
    assert_eq!(ring.for_provider("openrouter").len(), 4);
    assert_eq!(
        ring.get(&id("openrouter#4")).unwrap().masked,
        "sk-or-v1-…4444"
    );
    assert!(ring.report().unknown_prefixes.is_empty());
}

#[test]
fn seed_004_comma_list_with_indexed_overrides() {
    let ring = load(&[
        (
            "OPENAI_API_KEYS",
            "sk-proj-test-key1, sk-proj-test-key2 ,sk-proj-test-key3",
        ),
        ("OPENAI_ORG_ID", "org-your-org"),
        ("OPENAI_MODEL_0", "gpt-4o"),
        ("OPENAI_MODEL_1", "gpt-4o"),
        ("OPENAI_MODEL_2", "gpt-4o-mini, gpt-4o"),
        ("OPENAI_MAX_TOKENS_PER_MINUTE_0", "90000"),
        ("OPENAI_MAX_TOKENS_PER_MINUTE_1", "90000"),
        ("OPENAI_MAX_TOKENS_PER_MINUTE_2", "30000"),
        ("OPENAI_MAX_TOKENS_PER_DAY_0", "2000000"),
        ("OPENAI_MAX_TOKENS_PER_DAY_2", "1000000"),
        (
            "GEMINI_API_KEYS",
            "AIza-test-key1,AIza-test-key2,AIza-test-key3",
        ),
        ("GEMINI_MODEL_1", "gemini-1.5-flash-latest"),
        ("GEMINI_MAX_TOKENS_PER_DAY_1", "1000000"),
        ("SERP_API_KEYS", "serp-key1,serp-key2"),
        ("SERP_MAX_TOKENS_PER_MINUTE_0", "100"),
    ]);
    assert_eq!(ids(&ring, "openai"), ["openai#0", "openai#1", "openai#2"]);
    assert_eq!(secret(&ring, "openai#1"), "sk-proj-test-key2");
    let k0 = ring.get(&id("openai#0")).unwrap();
    assert_eq!(k0.models, ["gpt-4o"]);
    assert_eq!(
        (k0.limits.tpm, k0.limits.tpd),
        (Some(90_000), Some(2_000_000))
    );
    assert_eq!(k0.source, "env OPENAI_API_KEYS[0]");
    let k2 = ring.get(&id("openai#2")).unwrap();
    assert_eq!(k2.models, ["gpt-4o-mini", "gpt-4o"]);
    assert!(k2.serves_model("gpt-4o-mini") && !k2.serves_model("gpt-4.1"));
    assert_eq!(
        (k2.limits.tpm, k2.limits.tpd),
        (Some(30_000), Some(1_000_000))
    );
    let g1 = ring.get(&id("gemini#1")).unwrap();
    assert_eq!(g1.models, ["gemini-1.5-flash-latest"]);
    assert_eq!(g1.limits.tpd, Some(1_000_000));
    assert_eq!(ring.get(&id("gemini#0")).unwrap().limits, Limits::default());
    // SERP is no provider: not loaded, but reported for check-config.
    assert!(ring.for_provider("serp").is_empty());
    assert_eq!(ring.report().unknown_prefixes, ["SERP"]);
}

#[test]
fn request_limits_weight_and_concurrency_overrides() {
    let ring = load(&[
        ("GROQ_API_KEY_1", "gsk_test_one_000000000"),
        ("GROQ_API_KEY_2", "gsk_test_two_000000000"),
        ("GROQ_MAX_REQUESTS_PER_MINUTE_1", "30"),
        ("GROQ_MAX_REQUESTS_PER_DAY_1", " 14400 "),
        ("GROQ_WEIGHT_1", "3"),
        ("GROQ_MAX_CONCURRENT_1", "2"),
        ("GROQ_WEIGHT_7", "5"),
    ]);
    let k = ring.get(&id("groq#1")).unwrap();
    assert_eq!(
        (k.limits.rpm, k.limits.rpd, k.limits.tpm),
        (Some(30), Some(14_400), None)
    );
    assert_eq!(k.weight, 3);
    assert_eq!(k.max_concurrent, Some(2));
    let other = ring.get(&id("groq#2")).unwrap();
    assert_eq!((other.weight, other.max_concurrent), (1, None));
    assert_eq!(ring.report().unused_overrides, ["GROQ_WEIGHT_7"]);
}

#[test]
fn primary_prefix_overrides_beat_alias_ones() {
    let ring = load(&[
        ("ANTHROPIC_API_KEY_1", "sk-ant-test-one-000000"),
        ("ANTHROPIC_MODEL_1", "claude-3-5-sonnet"),
        ("CLAUDE_MODEL_1", "claude-3-haiku"),
        ("CLAUDE_MAX_TOKENS_PER_MINUTE_1", "40000"),
    ]);
    let k = ring.get(&id("anthropic#1")).unwrap();
    assert_eq!(k.models, ["claude-3-5-sonnet"]);
    assert_eq!(k.limits.tpm, Some(40_000));
}

#[test]
fn non_numeric_limit_is_an_error_naming_the_variable() {
    let env = EnvSource::from_pairs([
        ("OPENAI_API_KEYS", "sk-test-nonnumeric-00"),
        ("OPENAI_MAX_TOKENS_PER_MINUTE_0", "90k"),
    ]);
    let err = load_keys(&catalog(), &env).unwrap_err();
    assert!(matches!(err, KeyError::InvalidNumber { .. }));
    let msg = err.to_string();
    assert!(msg.contains("OPENAI_MAX_TOKENS_PER_MINUTE_0"), "{msg}");
    assert!(msg.contains("\"90k\""), "{msg}");
    assert!(!msg.contains("nonnumeric"), "{msg}");
    for (var, bad) in [("GROQ_WEIGHT_0", "-1"), ("GROQ_MAX_CONCURRENT_0", "two")] {
        let env = EnvSource::from_pairs([(var, bad)]);
        let msg = load_keys(&catalog(), &env).unwrap_err().to_string();
        assert!(msg.contains(var), "{msg}");
    }
}

#[test]
fn config_keys_literal_and_from_env() {
    let mut providers = catalog();
    let mistral = providers.get_mut("mistral").unwrap();
    mistral.keys = vec![
        KeyConfig {
            key: Some("test-mistral-literal-0000".into()),
            instance: Some(4),
            weight: Some(2),
            models: vec!["pixtral-12b".into()],
            limits: Limits {
                rpm: Some(1),
                ..Limits::default()
            },
            max_concurrent: Some(1),
            ..KeyConfig::default()
        },
        KeyConfig {
            key_env: Some("MY_MISTRAL_SECRET".into()),
            ..KeyConfig::default()
        },
        KeyConfig {
            key_env: Some("UNSET_MISTRAL_VAR".into()),
            ..KeyConfig::default()
        },
    ];
    let env = EnvSource::from_pairs([
        ("MY_MISTRAL_SECRET", "test-mistral-from-env-00"),
        ("MISTRAL_API_KEY", "test-mistral-bare-00000"),
        ("MISTRAL_MAX_REQUESTS_PER_MINUTE_4", "7"),
    ]);
    let ring = load_keys(&providers, &env).unwrap();
    // bare claims 0; the key_env entry has no instance and gets the next free.
    assert_eq!(
        ids(&ring, "mistral"),
        ["mistral#0", "mistral#1", "mistral#4"]
    );
    let k4 = ring.get(&id("mistral#4")).unwrap();
    assert_eq!(k4.source, "config providers.mistral.keys[0]");
    assert_eq!((k4.weight, k4.max_concurrent), (2, Some(1)));
    assert_eq!(k4.models, ["pixtral-12b"]);
    assert_eq!(k4.limits.rpm, Some(7), "env override wins over config");
    let k1 = ring.get(&id("mistral#1")).unwrap();
    assert_eq!(secret(&ring, "mistral#1"), "test-mistral-from-env-00");
    assert_eq!(
        k1.source,
        "config providers.mistral.keys[1] via env MY_MISTRAL_SECRET"
    );
    let skipped = &ring.report().skipped;
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].source, "config providers.mistral.keys[2]");
    assert!(skipped[0].reason.contains("UNSET_MISTRAL_VAR"));
}

#[test]
fn same_secret_across_conventions_aliases_and_config_is_one_key() {
    let mut providers = catalog();
    providers.get_mut("anthropic").unwrap().keys = vec![KeyConfig {
        key: Some("sk-ant-test-shared-0000".into()),
        weight: Some(5),
        models: vec!["claude-3-haiku".into()],
        ..KeyConfig::default()
    }];
    let env = EnvSource::from_pairs([
        ("CLAUDE_API_KEY", "sk-ant-test-shared-0000"),
        ("ANTHROPIC_API_KEY_3", "sk-ant-test-shared-0000"),
        (
            "ANTHROPIC_API_KEYS",
            "sk-ant-test-other-00000,sk-ant-test-shared-0000",
        ),
        ("ANTHROPIC_MODEL_1", "claude-3-5-sonnet"),
    ]);
    let ring = load_keys(&providers, &env).unwrap();
    // The shared secret appears first (via `_3`, numbered keys come first)
    // and claims 3, 1 and 0: it takes its lowest claim, 0.
    assert_eq!(ids(&ring, "anthropic"), ["anthropic#0", "anthropic#1"]);
    assert_eq!(secret(&ring, "anthropic#0"), "sk-ant-test-shared-0000");
    assert_eq!(secret(&ring, "anthropic#1"), "sk-ant-test-other-00000");
    let shared = ring.get(&id("anthropic#0")).unwrap();
    assert_eq!(shared.weight, 5, "config fields merge into the one key");
    assert_eq!(shared.models, ["claude-3-haiku"]);
    assert_eq!(shared.source, "env CLAUDE_API_KEY");
    // The other secret lost #0 and was renumbered to the lowest free number;
    // ANTHROPIC_MODEL_1 applies to whatever ends up as #1.
    let other = ring.get(&id("anthropic#1")).unwrap();
    assert_eq!(other.models, ["claude-3-5-sonnet"]);
    let report = ring.report();
    assert_eq!(report.merged.len(), 1);
    assert_eq!(report.merged[0].id, id("anthropic#0"));
    assert_eq!(
        report.merged[0].sources,
        [
            "env ANTHROPIC_API_KEY_3",
            "env ANTHROPIC_API_KEYS[1]",
            "env CLAUDE_API_KEY",
            "config providers.anthropic.keys[0]"
        ]
    );
    assert_eq!(report.renumbered.len(), 1);
    assert_eq!(
        (report.renumbered[0].id.clone(), report.renumbered[0].wanted),
        (id("anthropic#1"), 0)
    );
    let shown = format!("{report:?}");
    assert!(
        !shown.contains("test-shared") && !shown.contains("test-other"),
        "{shown}"
    );
}

#[test]
fn same_secret_in_two_providers_is_two_keys() {
    let ring = load(&[
        ("OPENAI_API_KEY", "sk-test-everywhere-0000"),
        ("OPENROUTER_API_KEY", "sk-test-everywhere-0000"),
    ]);
    assert_eq!(ring.len(), 3, "openai#0, openrouter#0 and ollama#0");
    assert!(ring.report().merged.is_empty());
}

#[test]
fn empty_values_are_skipped() {
    let ring = load(&[
        ("GROQ_API_KEY", ""),
        ("GROQ_API_KEY_1", "   "),
        ("GROQ_API_KEYS", ",, ,"),
        ("GROQ_MODEL_0", ""),
        ("GROQ_API_KEY_2", "gsk_test_two_000000000"),
    ]);
    assert_eq!(ids(&ring, "groq"), ["groq#2"]);
    let skipped: Vec<&str> = ring
        .report()
        .skipped
        .iter()
        .filter(|s| s.provider == "groq")
        .map(|s| s.source.as_str())
        .collect();
    assert_eq!(skipped, ["env GROQ_API_KEY", "env GROQ_API_KEY_1"]);
    assert!(ring.report().unused_overrides.is_empty());
}

#[test]
fn keyless_provider_gets_one_anonymous_slot() {
    let ring = load(&[("OLLAMA_MAX_CONCURRENT_0", "4")]);
    assert_eq!(ids(&ring, "ollama"), ["ollama#0"]);
    let slot = ring.get(&id("ollama#0")).unwrap();
    assert!(slot.is_keyless());
    assert_eq!(slot.expose_secret(), None);
    assert_eq!(slot.max_concurrent, Some(4));
    assert_eq!(ring.len(), 1);
    let mut without: Vec<&str> = ring
        .report()
        .providers_without_keys
        .iter()
        .map(String::as_str)
        .collect();
    without.sort();
    assert_eq!(
        without,
        [
            "anthropic",
            "gemini",
            "groq",
            "mistral",
            "nvidia",
            "openai",
            "openrouter",
            "zai"
        ]
    );
}

#[test]
fn custom_keys_env_and_aliases_from_config() {
    let mut providers = BTreeMap::new();
    providers.insert(
        "groq-eu".to_string(),
        ProviderConfig {
            keys_env: Some("GROQEU".into()),
            env_aliases: vec!["GROQ_EUROPE".into()],
            ..ProviderConfig::default()
        },
    );
    providers.insert("my-proxy".to_string(), ProviderConfig::default());
    let env = EnvSource::from_pairs([
        ("GROQEU_API_KEY", "gsk_test_eu_0000000000"),
        ("GROQ_EUROPE_API_KEY_1", "gsk_test_eu_1111111111"),
        ("MY_PROXY_API_KEYS", "proxy-test-a-00000,proxy-test-b-00000"),
        ("GROQ_API_KEY", "gsk_test_plain_00000000"),
    ]);
    let ring = load_keys(&providers, &env).unwrap();
    assert_eq!(ids(&ring, "groq-eu"), ["groq-eu#0", "groq-eu#1"]);
    assert_eq!(ids(&ring, "my-proxy"), ["my-proxy#0", "my-proxy#1"]);
    assert_eq!(ring.report().unknown_prefixes, ["GROQ"]);
}

#[test]
fn dotenv_file_is_read_and_process_env_wins() {
    let file = env_file(
        "# keys\n\
         GROQ_API_KEY=gsk_test_from_file_0000\n\
         export GROQ_API_KEY_3=\"gsk_test_quoted_000000\"\n\
         OPENAI_API_KEY=sk-test-file-loses-00000\n\
         GROQ_API_KEY_3=gsk_test_second_def_0000\n",
    );
    let env = EnvSource::from_pairs([("OPENAI_API_KEY", "sk-test-process-wins-000")])
        .with_env_file(file.path())
        .unwrap();
    let ring = load_keys(&catalog(), &env).unwrap();
    assert_eq!(secret(&ring, "openai#0"), "sk-test-process-wins-000");
    assert_eq!(
        ring.get(&id("openai#0")).unwrap().source,
        "env OPENAI_API_KEY"
    );
    assert_eq!(secret(&ring, "groq#0"), "gsk_test_from_file_0000");
    assert_eq!(
        secret(&ring, "groq#3"),
        "gsk_test_quoted_000000",
        "first definition wins"
    );
    let path = file.path().display();
    assert_eq!(
        ring.get(&id("groq#0")).unwrap().source,
        format!("{path} line 2 (GROQ_API_KEY)")
    );
    assert_eq!(
        ring.get(&id("groq#3")).unwrap().source,
        format!("{path} line 3 (GROQ_API_KEY_3)")
    );
}

#[test]
fn real_process_env_wins_over_file() {
    // PATH is set in every test process; the file must not replace it.
    let Ok(path) = std::env::var("PATH") else {
        return;
    };
    let file = env_file("PATH=/definitely/not/the/path\nLLMQ_KEYS_TEST_ONLY_IN_FILE=yes\n");
    let env = EnvSource::from_process_and_file(Some(file.path())).unwrap();
    assert_eq!(env.secret("PATH").unwrap().expose_secret(), path);
    assert_eq!(
        env.secret("LLMQ_KEYS_TEST_ONLY_IN_FILE")
            .unwrap()
            .expose_secret(),
        "yes"
    );
}

#[test]
fn env_file_errors_never_show_file_text() {
    let missing = std::path::Path::new("/nonexistent/llmq/keys.env");
    let err = EnvSource::from_process_and_file(Some(missing)).unwrap_err();
    assert!(matches!(err, KeyError::EnvFile { .. }));
    assert!(err.to_string().contains("/nonexistent/llmq/keys.env"));

    let file = env_file("GOOD=1\nBAD LINE sk-test-leaky-secret-0000 = \"x\n");
    let err = EnvSource::default().with_env_file(file.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, KeyError::EnvFileParse { .. }), "{msg}");
    assert!(!msg.contains("leaky"), "{msg}");
}

#[test]
fn no_output_contains_a_secret() {
    let secrets = [
        "gsk_FAKEaaaaSECRETbbbbx9f2",
        "sk-ant-test-FAKESECRETcccc9f2a",
        "AIzaFAKESECRETdddddddddd",
        "tinySECRET",
    ];
    let ring = load(&[
        ("GROQ_API_KEY", secrets[0]),
        ("CLAUDE_API_KEYS", &format!("{},{}", secrets[1], secrets[1])),
        ("GOOGLE_API_KEY_10", secrets[2]),
        ("MISTRAL_API_KEY", secrets[3]),
    ]);
    let mut outputs = vec![format!("{ring}"), format!("{ring:?}"), format!("{ring:#?}")];
    outputs.push(serde_json::to_string(ring.report()).unwrap());
    for key in &ring {
        outputs.push(format!("{key}"));
        outputs.push(format!("{key:?}"));
        outputs.push(key.masked.clone());
        outputs.push(key.source.clone());
    }
    for out in &outputs {
        assert!(!out.contains("SECRET"), "leaked: {out}");
    }
    assert_eq!(ring.get(&id("groq#0")).unwrap().masked, "gsk_…x9f2");
    assert_eq!(ring.get(&id("anthropic#0")).unwrap().masked, "sk-ant-…9f2a");
    assert_eq!(ring.get(&id("mistral#0")).unwrap().masked, "…ET");
    assert!(format!("{ring}").contains("groq#0 gsk_…x9f2 (env GROQ_API_KEY)"));
}

#[test]
fn masking_examples() {
    assert_eq!(mask("gsk_0123456789abcdefghijx9f2"), "gsk_…x9f2");
    assert_eq!(mask("sk-0123456789abcdefghij9f2a"), "sk-…9f2a");
    assert_eq!(
        mask("sk-ant-api03-0123456789abcdefghij1234"),
        "sk-ant-…1234"
    );
    assert_eq!(mask("AIzaSy0123456789abcdefghijABCD"), "AIza…ABCD");
    assert_eq!(mask("nvapi-0123456789abcdefghijWXYZ"), "nvapi-…WXYZ");
    assert_eq!(mask("a1b2c3d4e5f6g7h8"), "a1b2…g7h8");
    assert_eq!(mask("short-key"), "…ey");
}

#[test]
fn shipped_example_file_loads_cleanly() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/keys.env.example");
    let env = EnvSource::default().with_env_file(&path).unwrap();
    let ring = load_keys(&catalog(), &env).unwrap();
    assert_eq!(
        ids(&ring, "anthropic"),
        ["anthropic#0", "anthropic#1", "anthropic#2"]
    );
    assert_eq!(ids(&ring, "groq"), ["groq#1", "groq#2", "groq#10"]);
    assert_eq!(ids(&ring, "ollama"), ["ollama#0"]);
    assert_eq!(ring.len(), 18);
    let gemini1 = ring.get(&id("gemini#1")).unwrap();
    assert_eq!(gemini1.models, ["gemini-1.5-flash-latest"]);
    assert!(
        gemini1.source.ends_with("(GEMINI_API_KEYS[1])"),
        "{}",
        gemini1.source
    );
    assert_eq!(ring.get(&id("groq#10")).unwrap().weight, 2);
    for k in ["gemini#0", "gemini#1"] {
        assert_eq!(
            ring.get(&id(k)).unwrap().account.as_deref(),
            Some("my-project")
        );
    }
    let report = ring.report();
    assert!(report.merged.is_empty() && report.renumbered.is_empty() && report.skipped.is_empty());
    assert!(report.unknown_prefixes.is_empty() && report.unused_overrides.is_empty());
    assert!(report.providers_without_keys.is_empty());
}

#[test]
fn account_from_env_and_config_applies_to_its_instance() {
    let mut providers = catalog();
    providers.get_mut("mistral").unwrap().keys = vec![
        KeyConfig {
            key: Some("test-mistral-acct-a-0000".into()),
            instance: Some(3),
            account: Some("team-a".into()),
            ..KeyConfig::default()
        },
        KeyConfig {
            key: Some("test-mistral-acct-b-0000".into()),
            instance: Some(4),
            account: Some("team-a".into()),
            ..KeyConfig::default()
        },
    ];
    let env = EnvSource::from_pairs([
        ("GEMINI_API_KEY_1", "AIza-test-project-one-00"),
        ("GEMINI_API_KEY_2", "AIza-test-project-one-01"),
        ("GEMINI_API_KEY_3", "AIza-test-project-two-00"),
        ("GEMINI_ACCOUNT_1", "proj-1"),
        ("GOOGLE_ACCOUNT_2", "proj-1"),
        ("GEMINI_ACCOUNT_9", "nobody"),
        ("MISTRAL_ACCOUNT_4", "team-b"),
    ]);
    let ring = load_keys(&providers, &env).unwrap();
    let account = |k: &str| ring.get(&id(k)).unwrap().account.clone();
    assert_eq!(account("gemini#1").as_deref(), Some("proj-1"));
    assert_eq!(
        account("gemini#2").as_deref(),
        Some("proj-1"),
        "alias prefix"
    );
    assert_eq!(account("gemini#3"), None, "no account: limits of its own");
    assert_eq!(account("mistral#3").as_deref(), Some("team-a"));
    assert_eq!(
        account("mistral#4").as_deref(),
        Some("team-b"),
        "env overrides win over config"
    );
    assert_eq!(ring.report().unused_overrides, ["GEMINI_ACCOUNT_9"]);
    // The account is shown; secrets are not.
    let shown = format!("{:?}", ring.get(&id("gemini#1")).unwrap());
    assert!(shown.contains("proj-1"), "{shown}");
    assert!(!shown.contains("project-one"), "{shown}");
}

#[test]
fn a_bad_account_name_is_an_error_naming_the_variable() {
    let env = EnvSource::from_pairs([
        ("GROQ_API_KEY_0", "gsk_test_acct_00000000"),
        ("GROQ_ACCOUNT_0", "a{b}"),
    ]);
    let msg = load_keys(&catalog(), &env).unwrap_err().to_string();
    assert!(msg.contains("GROQ_ACCOUNT_0"), "{msg}");
    assert!(msg.contains("account name"), "{msg}");
    assert!(!msg.contains("acct_0000"), "{msg}");
}
