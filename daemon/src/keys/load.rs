//! `load_keys`: the env conventions and config keys turned into a [`KeyRing`].
//! The numbering rules are documented on the parent module.

use super::{
    ApiKey, EnvSource, KeyError, KeyId, KeyReport, KeyRing, MergedKey, Renumbered, Skipped,
};
use crate::config::{KeyConfig, Limits, ProviderConfig};
use secrecy::SecretString;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Env prefixes built in for providers of these names, so that seeds work
/// before (or without) the catalog setting `env_aliases`.
const DEFAULT_ALIASES: &[(&str, &str)] = &[("anthropic", "CLAUDE"), ("gemini", "GOOGLE")];

/// Loads the keys of every enabled provider in `providers` from `env` and
/// from the providers' `keys` lists. See the module docs for the rules.
pub fn load_keys(
    providers: &BTreeMap<String, ProviderConfig>,
    env: &EnvSource,
) -> Result<KeyRing, KeyError> {
    let mut report = KeyReport::default();
    let mut by_provider = BTreeMap::new();
    let mut known_prefixes = BTreeSet::new();
    for (name, cfg) in providers {
        let prefixes = prefixes(name, cfg)?;
        known_prefixes.extend(prefixes.iter().cloned());
        if !cfg.enabled {
            continue;
        }
        let keys = load_provider(name, cfg, &prefixes, env, &mut report)?;
        if keys.is_empty() {
            report.providers_without_keys.push(name.clone());
        } else {
            by_provider.insert(name.clone(), keys);
        }
    }
    report.unknown_prefixes = unknown_prefixes(env, &known_prefixes);
    Ok(KeyRing {
        by_provider,
        report,
    })
}

/// The env prefixes of a provider, primary first, without duplicates.
fn prefixes(name: &str, cfg: &ProviderConfig) -> Result<Vec<String>, KeyError> {
    let primary = match &cfg.keys_env {
        Some(p) if p.trim().is_empty() => {
            return Err(KeyError::Provider {
                provider: name.to_string(),
                problem: "`keys_env` is empty".into(),
            })
        }
        Some(p) => p.trim().to_string(),
        None => default_prefix(name),
    };
    let mut out = vec![primary];
    let defaults = DEFAULT_ALIASES
        .iter()
        .filter(|(p, _)| *p == name)
        .map(|(_, a)| *a);
    let aliases = cfg.env_aliases.iter().map(|a| a.trim()).chain(defaults);
    for alias in aliases {
        if !alias.is_empty() && !out.iter().any(|p| p == alias) {
            out.push(alias.to_string());
        }
    }
    Ok(out)
}

/// A provider's default env prefix: upper-cased, every character other than
/// an ASCII letter or digit turned into `_` (`my-llm` → `MY_LLM`).
fn default_prefix(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// One place a secret was found.
struct Candidate<'a> {
    secret: Option<&'a str>,
    claim: Option<u32>,
    source: String,
    config: Option<&'a KeyConfig>,
}

/// Candidates sharing one secret: they become one key.
struct Group<'a> {
    secret: Option<&'a str>,
    members: Vec<Candidate<'a>>,
}

impl Group<'_> {
    fn claims(&self) -> BTreeSet<u32> {
        self.members.iter().filter_map(|c| c.claim).collect()
    }
}

fn load_provider(
    name: &str,
    cfg: &ProviderConfig,
    prefixes: &[String],
    env: &EnvSource,
    report: &mut KeyReport,
) -> Result<Vec<ApiKey>, KeyError> {
    let mut candidates = collect_candidates(name, cfg, prefixes, env, report)?;
    if candidates.is_empty() && cfg.keyless {
        candidates.push(Candidate {
            secret: None,
            claim: Some(0),
            source: "keyless provider".into(),
            config: None,
        });
    }

    // Group by secret, in order of first appearance.
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for c in candidates {
        let slot = c.secret.and_then(|s| index.get(s).copied());
        match slot {
            Some(i) => groups[i].members.push(c),
            None => {
                if let Some(s) = c.secret {
                    index.insert(s, groups.len());
                }
                groups.push(Group {
                    secret: c.secret,
                    members: vec![c],
                });
            }
        }
    }

    // Place claims, then renumber the rest to the lowest free numbers.
    let mut taken = BTreeSet::new();
    let mut instance_of: Vec<Option<u32>> = vec![None; groups.len()];
    for (g, group) in groups.iter().enumerate() {
        if let Some(n) = group.claims().into_iter().find(|n| !taken.contains(n)) {
            taken.insert(n);
            instance_of[g] = Some(n);
        }
    }
    let mut next_free = 0u32;
    for slot in instance_of.iter_mut().filter(|s| s.is_none()) {
        while taken.contains(&next_free) {
            next_free += 1;
        }
        taken.insert(next_free);
        *slot = Some(next_free);
    }

    let overrides = env_overrides(prefixes, env)?;
    let provider: Arc<str> = Arc::from(name);
    let mut keys = Vec::with_capacity(groups.len());
    for (group, instance) in groups.into_iter().zip(instance_of) {
        let instance = instance.unwrap_or_default();
        let id = KeyId::new(provider.clone(), instance);
        let claims = group.claims();
        let primary = group
            .members
            .iter()
            .find(|c| c.claim == Some(instance))
            .or(group.members.first());
        let source = primary.map(|c| c.source.clone()).unwrap_or_default();
        if !claims.is_empty() && !claims.contains(&instance) {
            report.renumbered.push(Renumbered {
                id: id.clone(),
                wanted: claims.first().copied().unwrap_or_default(),
                source: source.clone(),
            });
        }
        if group.members.len() > 1 {
            report.merged.push(MergedKey {
                id: id.clone(),
                sources: group.members.iter().map(|c| c.source.clone()).collect(),
            });
        }

        let secret = group.secret.map(SecretString::from);
        let mut key = ApiKey::new(id, secret, source);
        // Config fields: first source to set one wins; model lists unite.
        let mut weight = None;
        for c in group.members.iter().filter_map(|c| c.config) {
            weight = weight.or(c.weight);
            key.max_concurrent = key.max_concurrent.or(c.max_concurrent);
            key.limits = key.limits.or(c.limits);
            if key.account.is_none() {
                key.account.clone_from(&c.account);
            }
            for m in &c.models {
                if !key.models.contains(m) {
                    key.models.push(m.clone());
                }
            }
        }
        key.weight = weight.unwrap_or(key.weight);
        if let Some(o) = overrides.get(&instance) {
            o.apply(&mut key);
        }
        keys.push(key);
    }
    keys.sort_by_key(|k| k.id.instance());

    for (instance, o) in &overrides {
        if !keys.iter().any(|k| k.id.instance() == *instance) {
            report.unused_overrides.extend(o.vars.iter().cloned());
        }
    }
    Ok(keys)
}

/// Every key source of a provider, in claim precedence order.
fn collect_candidates<'a>(
    name: &str,
    cfg: &'a ProviderConfig,
    prefixes: &[String],
    env: &'a EnvSource,
    report: &mut KeyReport,
) -> Result<Vec<Candidate<'a>>, KeyError> {
    // Config keys, resolved first so errors come before any env work.
    let mut skip = |source: String, reason: &str| {
        report.skipped.push(Skipped {
            provider: name.to_string(),
            source,
            reason: reason.to_string(),
        })
    };

    let (with_instance, without_instance) = config_candidates(name, cfg, env, &mut skip)?;
    let (numbered, listed, bare) = env_candidates(prefixes, env, &mut skip);
    let mut all = with_instance;
    all.extend(numbered);
    all.extend(listed);
    all.extend(bare);
    all.extend(without_instance);
    Ok(all)
}

/// A provider's `[[providers.<name>.keys]]`, as `(with an instance,
/// without)`; keys whose secret is blank or unset are skipped.
fn config_candidates<'a>(
    name: &str,
    cfg: &'a ProviderConfig,
    env: &'a EnvSource,
    skip: &mut dyn FnMut(String, &str),
) -> Result<(Vec<Candidate<'a>>, Vec<Candidate<'a>>), KeyError> {
    let mut with_instance = Vec::new();
    let mut without_instance = Vec::new();
    for (i, kc) in cfg.keys.iter().enumerate() {
        let where_ = format!("config providers.{name}.keys[{i}]");
        let secret = match (&kc.key, &kc.key_env) {
            (Some(_), Some(_)) => {
                return Err(KeyError::ConfigKey {
                    provider: name.to_string(),
                    index: i,
                    problem: "give either `key` or `key_env`, not both".into(),
                })
            }
            (None, None) => {
                return Err(KeyError::ConfigKey {
                    provider: name.to_string(),
                    index: i,
                    problem: "needs `key` or `key_env`".into(),
                })
            }
            (Some(k), None) => (!k.trim().is_empty()).then(|| (k.trim(), where_.clone())),
            (None, Some(var)) => env
                .value(var)
                .map(|v| (v, format!("{where_} via {}", env.describe(var)))),
        };
        let Some((secret, source)) = secret else {
            let reason = match &kc.key_env {
                Some(var) => format!("env {var} is unset or blank"),
                None => "blank `key`".to_string(),
            };
            skip(where_, &reason);
            continue;
        };
        let c = Candidate {
            secret: Some(secret),
            claim: kc.instance,
            source,
            config: Some(kc),
        };
        if kc.instance.is_some() {
            with_instance.push(c);
        } else {
            without_instance.push(c);
        }
    }

    Ok((with_instance, without_instance))
}

/// The `<P>_API_KEY_<n>`, `<P>_API_KEYS` and `<P>_API_KEY` variables of
/// every prefix, as `(numbered, listed, bare)`.
fn env_candidates<'a>(
    prefixes: &[String],
    env: &'a EnvSource,
    skip: &mut dyn FnMut(String, &str),
) -> (Vec<Candidate<'a>>, Vec<Candidate<'a>>, Vec<Candidate<'a>>) {
    let mut numbered = Vec::new();
    let mut listed = Vec::new();
    let mut bare = Vec::new();
    for prefix in prefixes {
        let stem = format!("{prefix}_API_KEY");
        let mut mine: Vec<(u32, &str)> = Vec::new();
        for var in env.names_with_prefix(&stem) {
            let rest = &var[stem.len()..];
            if rest.is_empty() {
                match env.value(var) {
                    Some(secret) => bare.push(Candidate {
                        secret: Some(secret),
                        claim: Some(0),
                        source: env.describe(var),
                        config: None,
                    }),
                    None => skip(env.describe(var), "blank value"),
                }
            } else if rest == "S" {
                let Some(list) = env.value(var) else {
                    skip(env.describe(var), "blank value");
                    continue;
                };
                for (i, item) in list.split(',').enumerate() {
                    let item = item.trim();
                    if item.is_empty() {
                        continue;
                    }
                    let source = env.describe_item(var, i);
                    match u32::try_from(i) {
                        Ok(n) => listed.push(Candidate {
                            secret: Some(item),
                            claim: Some(n),
                            source,
                            config: None,
                        }),
                        Err(_) => skip(source, "list position out of range"),
                    }
                }
            } else if let Some(digits) = rest.strip_prefix('_').filter(|d| is_digits(d)) {
                match digits.parse::<u32>() {
                    Ok(n) => mine.push((n, var)),
                    Err(_) => skip(env.describe(var), "instance number out of range"),
                }
            }
        }
        // Names sort as strings (`_10` before `_2`); claims go by number.
        mine.sort();
        for (n, var) in mine {
            match env.value(var) {
                Some(secret) => numbered.push(Candidate {
                    secret: Some(secret),
                    claim: Some(n),
                    source: env.describe(var),
                    config: None,
                }),
                None => skip(env.describe(var), "blank value"),
            }
        }
    }

    (numbered, listed, bare)
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Per-key overrides from `P_*_i` variables for one instance.
#[derive(Default)]
struct Overrides {
    models: Option<Vec<String>>,
    weight: Option<u32>,
    max_concurrent: Option<u32>,
    account: Option<String>,
    limits: Limits,
    /// The variables that set something, for the unused-override report.
    vars: Vec<String>,
}

impl Overrides {
    fn apply(&self, key: &mut ApiKey) {
        if let Some(models) = &self.models {
            key.models = models.clone();
        }
        if let Some(w) = self.weight {
            key.weight = w;
        }
        if let Some(m) = self.max_concurrent {
            key.max_concurrent = Some(m);
        }
        if let Some(a) = &self.account {
            key.account = Some(a.clone());
        }
        key.limits = self.limits.or(key.limits);
    }
}

/// The suffixes of per-key override variables (`P_{SUFFIX}{i}`).
#[derive(Clone, Copy)]
enum Field {
    Model,
    Weight,
    MaxConcurrent,
    Tpm,
    Tpd,
    Rpm,
    Rpd,
    Account,
}

const FIELDS: &[(&str, Field)] = &[
    ("MODEL_", Field::Model),
    ("WEIGHT_", Field::Weight),
    ("MAX_CONCURRENT_", Field::MaxConcurrent),
    ("MAX_TOKENS_PER_MINUTE_", Field::Tpm),
    ("MAX_TOKENS_PER_DAY_", Field::Tpd),
    ("MAX_REQUESTS_PER_MINUTE_", Field::Rpm),
    ("MAX_REQUESTS_PER_DAY_", Field::Rpd),
    ("ACCOUNT_", Field::Account),
];

/// Overrides by instance number; the first prefix to set a field wins.
fn env_overrides(
    prefixes: &[String],
    env: &EnvSource,
) -> Result<BTreeMap<u32, Overrides>, KeyError> {
    let mut out: BTreeMap<u32, Overrides> = BTreeMap::new();
    for prefix in prefixes {
        let head = format!("{prefix}_");
        for var in env.names_with_prefix(&head) {
            let rest = &var[head.len()..];
            let Some((field, digits)) = FIELDS.iter().find_map(|(suffix, field)| {
                rest.strip_prefix(suffix)
                    .filter(|d| is_digits(d))
                    .map(|d| (*field, d))
            }) else {
                continue;
            };
            let Some(value) = env.value(var) else {
                continue;
            };
            let Ok(instance) = digits.parse::<u32>() else {
                return Err(invalid(
                    var,
                    digits,
                    "an instance number below 2^32 in the name",
                ));
            };
            let o = out.entry(instance).or_default();
            let set = match field {
                Field::Model => set_once(&mut o.models, || {
                    Ok(value
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                        .collect())
                })?,
                Field::Weight => set_once(&mut o.weight, || number(var, value))?,
                Field::MaxConcurrent => set_once(&mut o.max_concurrent, || number(var, value))?,
                Field::Tpm => set_once(&mut o.limits.tpm, || number(var, value))?,
                Field::Tpd => set_once(&mut o.limits.tpd, || number(var, value))?,
                Field::Rpm => set_once(&mut o.limits.rpm, || number(var, value))?,
                Field::Rpd => set_once(&mut o.limits.rpd, || number(var, value))?,
                Field::Account => set_once(&mut o.account, || account(var, value))?,
            };
            if set {
                o.vars.push(var.to_string());
            }
        }
    }
    Ok(out)
}

/// Sets `slot` from `make` unless already set; true if it set it. The
/// value is parsed either way so a bad alias value is still an error.
fn set_once<T>(
    slot: &mut Option<T>,
    make: impl FnOnce() -> Result<T, KeyError>,
) -> Result<bool, KeyError> {
    let v = make()?;
    if slot.is_some() {
        return Ok(false);
    }
    *slot = Some(v);
    Ok(true)
}

fn number<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, KeyError> {
    value
        .parse()
        .map_err(|_| invalid(var, value, "a whole number"))
}

fn account(var: &str, value: &str) -> Result<String, KeyError> {
    if crate::config::valid_account(value) {
        Ok(value.to_string())
    } else {
        Err(invalid(var, value, crate::config::ACCOUNT_EXPECTED))
    }
}

fn invalid(var: &str, value: &str, expected: &'static str) -> KeyError {
    // Limits are not secrets, but a long value might be a key pasted in the
    // wrong place: show only its length then.
    let shown = if value.chars().count() <= 20 {
        format!("{value:?}")
    } else {
        format!("(a {}-character value)", value.chars().count())
    };
    KeyError::InvalidNumber {
        var: var.to_string(),
        value: shown,
        expected,
    }
}

/// Prefixes of `P_API_KEY`, `P_API_KEY_N`, `P_API_KEYS` variables (with a
/// value) that are not in `known`.
fn unknown_prefixes(env: &EnvSource, known: &BTreeSet<String>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for name in env.names() {
        let Some(prefix) = key_var_prefix(name) else {
            continue;
        };
        if !prefix.is_empty() && !known.contains(prefix) && env.value(name).is_some() {
            out.insert(prefix.to_string());
        }
    }
    out.into_iter().collect()
}

/// `P` if `name` is `P_API_KEY`, `P_API_KEYS` or `P_API_KEY_N`.
fn key_var_prefix(name: &str) -> Option<&str> {
    if let Some(p) = name.strip_suffix("_API_KEY") {
        return Some(p);
    }
    if let Some(p) = name.strip_suffix("_API_KEYS") {
        return Some(p);
    }
    let (head, digits) = name.rsplit_once('_')?;
    if is_digits(digits) {
        head.strip_suffix("_API_KEY")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> ProviderConfig {
        ProviderConfig::default()
    }

    fn one(name: &str, cfg: ProviderConfig) -> BTreeMap<String, ProviderConfig> {
        BTreeMap::from([(name.to_string(), cfg)])
    }

    fn ids(ring: &KeyRing) -> Vec<String> {
        ring.iter().map(|k| k.id.to_string()).collect()
    }

    fn secret_of(ring: &KeyRing, id: &str) -> String {
        let id: KeyId = id.parse().unwrap();
        ring.get(&id).unwrap().expose_secret().unwrap().to_string()
    }

    #[test]
    fn prefixes_default_and_aliases() {
        assert_eq!(prefixes("z-ai", &provider()).unwrap(), ["Z_AI"]);
        assert_eq!(prefixes("my.llm", &provider()).unwrap(), ["MY_LLM"]);
        assert_eq!(
            prefixes("anthropic", &provider()).unwrap(),
            ["ANTHROPIC", "CLAUDE"]
        );
        let cfg = ProviderConfig {
            keys_env: Some("GOOG".into()),
            env_aliases: vec!["GOOGLE".into(), "GOOG".into(), " ".into()],
            ..provider()
        };
        assert_eq!(prefixes("gemini", &cfg).unwrap(), ["GOOG", "GOOGLE"]);
        let empty = ProviderConfig {
            keys_env: Some(" ".into()),
            ..provider()
        };
        assert!(matches!(
            prefixes("x", &empty),
            Err(KeyError::Provider { .. })
        ));
    }

    #[test]
    fn key_var_prefixes() {
        assert_eq!(key_var_prefix("SERP_API_KEYS"), Some("SERP"));
        assert_eq!(key_var_prefix("FOO_BAR_API_KEY"), Some("FOO_BAR"));
        assert_eq!(key_var_prefix("FOO_API_KEY_12"), Some("FOO"));
        assert_eq!(key_var_prefix("FOO_API_KEY_X"), None);
        assert_eq!(key_var_prefix("FOO_MODEL_1"), None);
    }

    #[test]
    fn numbered_keys_sort_numerically() {
        let env = EnvSource::from_pairs([
            ("GROQ_API_KEY_10", "gsk_ten_0000000000"),
            ("GROQ_API_KEY_2", "gsk_two_0000000000"),
            ("GROQ_API_KEY_0", "gsk_zero_000000000"),
        ]);
        let ring = load_keys(&one("groq", provider()), &env).unwrap();
        assert_eq!(ids(&ring), ["groq#0", "groq#2", "groq#10"]);
        assert_eq!(secret_of(&ring, "groq#10"), "gsk_ten_0000000000");
    }

    #[test]
    fn bare_key_yields_to_list_item_zero() {
        let env = EnvSource::from_pairs([
            ("OPENAI_API_KEY", "sk-test-bare-000000"),
            (
                "OPENAI_API_KEYS",
                "sk-test-list0-00000, sk-test-list1-00000",
            ),
        ]);
        let ring = load_keys(&one("openai", provider()), &env).unwrap();
        assert_eq!(secret_of(&ring, "openai#0"), "sk-test-list0-00000");
        assert_eq!(secret_of(&ring, "openai#1"), "sk-test-list1-00000");
        assert_eq!(secret_of(&ring, "openai#2"), "sk-test-bare-000000");
        let r = &ring.report().renumbered;
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].id.to_string(), r[0].wanted), ("openai#2".into(), 0));
        assert_eq!(r[0].source, "env OPENAI_API_KEY");
    }

    #[test]
    fn merged_secret_takes_its_lowest_free_claim() {
        // The same secret as bare and _1: one key at #0, reported merged.
        let env = EnvSource::from_pairs([
            ("OPENAI_API_KEY", "sk-test-same-000000"),
            ("OPENAI_API_KEY_1", "sk-test-same-000000"),
            ("OPENAI_API_KEY_2", "sk-test-other-00000"),
        ]);
        let ring = load_keys(&one("openai", provider()), &env).unwrap();
        assert_eq!(ids(&ring), ["openai#0", "openai#2"]);
        let m = &ring.report().merged;
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].id.to_string(), "openai#0");
        assert_eq!(m[0].sources, ["env OPENAI_API_KEY_1", "env OPENAI_API_KEY"]);
        assert_eq!(
            ring.get(&"openai#0".parse().unwrap()).unwrap().source,
            "env OPENAI_API_KEY"
        );
        assert!(ring.report().renumbered.is_empty());
    }

    #[test]
    fn list_positions_survive_blank_items() {
        let env = EnvSource::from_pairs([(
            "GEMINI_API_KEYS",
            " AIza-a-0000000000 ,, ,AIza-b-0000000000,",
        )]);
        let ring = load_keys(&one("gemini", provider()), &env).unwrap();
        assert_eq!(ids(&ring), ["gemini#0", "gemini#3"]);
    }

    #[test]
    fn config_key_errors_name_the_entry() {
        let both = ProviderConfig {
            keys: vec![KeyConfig {
                key: Some("sk-test-secret-in-config".into()),
                key_env: Some("X".into()),
                ..KeyConfig::default()
            }],
            ..provider()
        };
        let err = load_keys(&one("openai", both), &EnvSource::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("providers.openai.keys[0]"), "{msg}");
        assert!(!msg.contains("secret-in-config"), "{msg}");
        let neither = ProviderConfig {
            keys: vec![KeyConfig::default()],
            ..provider()
        };
        assert!(load_keys(&one("openai", neither), &EnvSource::default()).is_err());
    }

    #[test]
    fn long_bad_limit_values_are_not_echoed() {
        let env = EnvSource::from_pairs([
            ("GROQ_API_KEY", "gsk_aaaaaaaaaaaaaaaa"),
            (
                "GROQ_MAX_TOKENS_PER_DAY_0",
                "gsk_pasted_here_by_mistake_0000",
            ),
        ]);
        let msg = load_keys(&one("groq", provider()), &env)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("GROQ_MAX_TOKENS_PER_DAY_0"), "{msg}");
        assert!(!msg.contains("pasted"), "{msg}");
        assert!(msg.contains("31-character"), "{msg}");
    }

    #[test]
    fn disabled_providers_load_nothing_but_their_prefix_is_known() {
        let cfg = ProviderConfig {
            enabled: false,
            ..provider()
        };
        let env = EnvSource::from_pairs([("GROQ_API_KEY", "gsk_aaaaaaaaaaaaaaaa")]);
        let ring = load_keys(&one("groq", cfg), &env).unwrap();
        assert!(ring.is_empty());
        assert!(ring.report().unknown_prefixes.is_empty());
        assert!(ring.report().providers_without_keys.is_empty());
    }
}
