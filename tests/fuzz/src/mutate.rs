//! Structure-aware mutation of corpus seeds.
//!
//! A fuzz case is a [`Case`]: which seed to start from, a few edits of its
//! JSON tree (or of the TOML turned into JSON), then a few edits of the
//! text. bolero generates cases from its random engine on stable (and from
//! libFuzzer's byte stream under `cargo bolero test`), so even a short run
//! explores inputs near real ones instead of random bytes that fail at the
//! first `{`.
//!
//! JSON strings that themselves hold JSON (an HTTP response `body`) are
//! opened up before the edits and closed again after, so the edits reach
//! inside them. Values JSON cannot hold in a `serde_json::Value` — numbers
//! past `u64`, `-0`, `1e999`, duplicate keys — are written by [`write_json`]
//! from markers.

use bolero::generator::TypeGenerator;
use serde_json::{Map, Value};

/// How a seed is turned into the target's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
    /// Line-oriented text (`.env`).
    Text,
}

/// One fuzz case.
#[derive(Debug, Clone, TypeGenerator)]
pub struct Case {
    /// Index of the seed (modulo the number of seeds).
    pub seed: u16,
    /// Edits of the parsed tree (JSON and TOML seeds).
    #[generator(Vec::produce().with().len(0usize..5))]
    pub tree: Vec<TreeEdit>,
    /// Edits of the text, after the tree edits: always for line-oriented
    /// text, for one JSON or TOML case in four (`raw & 3 == 0`), since they
    /// mostly break the syntax and the other cases should get past it.
    pub raw: u8,
    #[generator(Vec::produce().with().len(1usize..4))]
    pub text: Vec<TextEdit>,
}

/// An edit of the JSON tree. Nodes are numbered in pre-order, modulo the
/// number of nodes.
#[derive(Debug, Clone, TypeGenerator)]
pub enum TreeEdit {
    Set {
        node: u16,
        to: Leaf,
    },
    Remove {
        node: u16,
    },
    /// Replace node `to` with a copy of node `from`.
    Copy {
        from: u16,
        to: u16,
    },
    /// Append to an array, or add a key (one of [`KEYS`]) to an object.
    Add {
        node: u16,
        key: u8,
        to: Leaf,
    },
    /// Repeat the last element of an array `times % 1100` times (1,000
    /// models), as far as [`MAX_GROWTH`] allows.
    Repeat {
        node: u16,
        times: u16,
    },
    /// Nest the node in `depth % 64` arrays.
    Wrap {
        node: u16,
        depth: u8,
    },
    /// Write the object's first key twice.
    DupKey {
        node: u16,
    },
}

/// A value to put into the tree.
#[derive(Debug, Clone, TypeGenerator)]
pub enum Leaf {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    /// One of [`EXTREMES`], written verbatim.
    Extreme(u8),
    /// One of [`WORDS`].
    Word(u8),
    Text(#[generator(String::produce().with().len(0usize..24))] String),
    /// `len % 4097` copies of a character.
    Long {
        ch: u8,
        len: u16,
    },
    EmptyArray,
    EmptyObject,
}

/// An edit of the text.
#[derive(Debug, Clone, TypeGenerator)]
pub enum TextEdit {
    /// Insert one of [`WORDS`] at a byte offset.
    Insert {
        at: u32,
        word: u8,
    },
    Delete {
        at: u32,
        len: u8,
    },
    Byte {
        at: u32,
        byte: u8,
    },
    Truncate {
        at: u32,
    },
    DupLine {
        line: u16,
    },
    DeleteLine {
        line: u16,
    },
    SwapLines {
        a: u16,
        b: u16,
    },
}

/// Numbers and tokens at the edges of what parsers and arithmetic handle.
pub const EXTREMES: &[&str] = &[
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967295",
    "4294967296",
    "2592001",
    "9007199254740993",
    "65536",
    "-1",
    "0",
    "-0",
    "0.0",
    "-0.0",
    "1e308",
    "1e999",
    "-1e999",
    "5e-324",
    "1.7976931348623157e308",
    "2.0000001",
    "NaN",
    "1e2",
    "1.5",
    "true",
    "null",
    "\"\"",
    "[]",
    "{}",
];

/// Words of the formats under test: roles, kinds, header names, error codes,
/// duration syntax, TOML and `.env` syntax.
pub const WORDS: &[&str] = &[
    "",
    " ",
    "\n",
    "\\",
    "\"",
    "'",
    "=",
    ",",
    "#",
    "\u{0}",
    "\u{feff}",
    "é",
    "🦀",
    "user",
    "system",
    "assistant",
    "tool",
    "developer",
    "text",
    "image_url",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:image/png;base64,",
    "data:,",
    "https://",
    "http://127.0.0.1:1",
    "ftp://x",
    "groq",
    "groq#2",
    "openai",
    "anthropic",
    "gemini",
    "ollama",
    "vision",
    "json",
    "tools",
    "free",
    "trial",
    "paid",
    "round-robin",
    "least-loaded",
    "weighted",
    "priority",
    "1s",
    "0s",
    "6m0s",
    "1.5s",
    "-5s",
    "99999999999s",
    "18446744073709551615s",
    "2024-05-01T12:00:01Z",
    "9999-12-31T23:59:59Z",
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-tokens-reset",
    "RESOURCE_EXHAUSTED",
    "INVALID_ARGUMENT",
    "type.googleapis.com/google.rpc.RetryInfo",
    "type.googleapis.com/google.rpc.QuotaFailure",
    "rate_limit_exceeded",
    "insufficient_quota",
    "context_length_exceeded",
    "overloaded_error",
    "max_tokens",
    "stop",
    "length",
    "content_filter",
    "SAFETY",
    "end_turn",
    "refusal",
    "error",
    "retryDelay",
    "deadline_s",
    "models",
    "[providers.x]\n",
    "[routing]\n",
    "[queue]\n",
    "[[providers.groq.keys]]\n",
    "plugin = \"openai\"\n",
    "rpm = 0\n",
    "tpm = 18446744073709551615\n",
    "concurrency = 0\n",
    "timeout = \"0s\"\n",
    "keys_env = \"\"\n",
    "GROQ_API_KEY=",
    "GROQ_API_KEYS=a,,b",
    "GROQ_API_KEY_4294967295=",
    "GROQ_API_KEY_18446744073709551616=",
    "GROQ_MAX_REQUESTS_PER_MINUTE_0=0",
    "GROQ_MAX_TOKENS_PER_DAY_0=18446744073709551615",
    "GROQ_WEIGHT_0=0",
    "GROQ_MAX_CONCURRENT_0=4294967296",
    "GROQ_MODEL_0=,",
    "OPENAI_API_KEY=sk-FUZZSECRETopenai00000000000",
    "FOO_API_KEY=x",
    "export ",
    "${GROQ_API_KEY}",
    "$",
];

/// Field names of the formats under test, for [`TreeEdit::Add`].
pub const KEYS: &[&str] = &[
    // job
    "id",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "image_url",
    "url",
    "detail",
    "model",
    "models",
    "require",
    "max_tokens",
    "temperature",
    "route",
    "provider",
    "key",
    "instance",
    "max_tier",
    "max_cost_usd",
    "strategy",
    "deadline_s",
    "metadata",
    // plugin input and responses
    "request",
    "api_key",
    "base_url",
    "options",
    "json",
    "status",
    "headers",
    "body",
    "received_at_unix_ms",
    "error",
    "code",
    "message",
    "details",
    "@type",
    "retryDelay",
    "violations",
    "quotaId",
    "quotaValue",
    "reason",
    "choices",
    "finish_reason",
    "usage",
    "candidates",
    "finishReason",
    "promptFeedback",
    "blockReason",
    "stop_reason",
    "usageMetadata",
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "anthropic_version",
    "thinking_budget",
    // config
    "queue",
    "routing",
    "providers",
    "keys",
    "limits",
    "rpm",
    "rpd",
    "tpm",
    "tpd",
    "concurrency",
    "max_concurrent",
    "weight",
    "window",
    "cooldown",
    "default_deadline",
    "wait_for_cheaper",
    "visibility_timeout",
    "max_job_bytes",
    "budget_usd_per_day",
    "keys_env",
    "env_aliases",
    "keyless",
    "enabled",
    "tier",
    "price",
    "context",
    "priority",
];

/// Makes the input of one case from its seeds.
pub fn materialize(format: Format, seeds: &[Vec<u8>], case: &Case) -> Vec<u8> {
    if seeds.is_empty() {
        return Vec::new();
    }
    let seed = &seeds[case.seed as usize % seeds.len()];
    let mut out = if case.tree.is_empty() {
        seed.clone()
    } else {
        match format {
            Format::Json => match serde_json::from_slice::<Value>(seed) {
                Ok(mut v) => {
                    open(&mut v);
                    apply_tree(&mut v, &case.tree);
                    write_json(&close(v)).into_bytes()
                }
                Err(_) => seed.clone(),
            },
            Format::Toml => toml_edit(seed, &case.tree).unwrap_or_else(|| seed.clone()),
            Format::Text => seed.clone(),
        }
    };
    if format == Format::Text || case.raw & 3 == 0 {
        for edit in &case.text {
            apply_text(&mut out, edit);
        }
    }
    out
}

/// The numbers of [`EXTREMES`] that the TOML and `.env` sweeps use (those
/// inputs are slower to load: the catalog is read again for each).
pub const SWEEP_EXTREMES: &[&str] = &[
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967296",
    "-1",
    "0",
    "1e999",
    "-0.0",
    "5e-324",
    "NaN",
];

/// Text that numbers, durations and timestamps are parsed from (header
/// values such as `6m0s`, `retry-after`, RFC 3339 resets, `retryDelay`).
pub const STRING_EXTREMES: &[&str] = &[
    "",
    "-1",
    "0",
    "18446744073709551616",
    "1e999",
    "NaN",
    "-0.5s",
    "99999999999999999999h",
    "9223372036854775807ms",
    "1.7976931348623157e308s",
    "5e-324s",
    "6m0s0m",
    "1h2m3.4s5",
    "9999-12-31T23:59:59Z",
    "0000-01-01T00:00:00Z",
    "2024-02-30T25:61:61+99:99",
    "2024-05-01T12:00:01.99999999999999999999Z",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "é1s",
];

/// The deterministic sweep run before the random cases. JSON: every number
/// field of the seeds set to each of [`EXTREMES`], and every object with its
/// first key written twice; a field is named by its last two keys (array
/// indexes left out); and every string with a digit in it (a header value
/// is named by its header) set to each of [`STRING_EXTREMES`]. TOML: every number field set to each of
/// [`SWEEP_EXTREMES`], a field named by its last key. Each name is swept
/// once, in the first seed that has it, so the sweep stays small. `.env`
/// text: every numeric value and every numeric name suffix (`_3`) set to
/// each of [`SWEEP_EXTREMES`], once per variable kind (`MAX_CONCURRENT_`).
pub fn extremes(format: Format, seeds: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for seed in seeds {
        let tree = match format {
            Format::Json => serde_json::from_slice::<Value>(seed).ok().map(|mut v| {
                open(&mut v);
                v
            }),
            Format::Toml => std::str::from_utf8(seed)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| serde_json::to_value(t).ok()),
            Format::Text => {
                text_extremes(seed, &mut seen, &mut out);
                continue;
            }
        };
        let Some(tree) = tree else { continue };
        for path in paths(&tree) {
            let names: Vec<&str> = path
                .iter()
                .filter_map(|s| match s {
                    Seg::Key(k) if k != OPENED => Some(k.as_str()),
                    _ => None,
                })
                .collect();
            let (keep, extremes) = match format {
                Format::Toml => (1, SWEEP_EXTREMES),
                _ => (2, EXTREMES),
            };
            let name = names[names.len().saturating_sub(keep)..].join(".");
            let mut t = tree.clone();
            // A header value (`["retry-after", "30"]`) is named by its header.
            let header = match path.split_last() {
                Some((Seg::Index(1), parent)) => match at(&mut t, parent) {
                    Some(Value::Array(pair)) if pair.len() == 2 => {
                        pair[0].as_str().map(str::to_ascii_lowercase)
                    }
                    _ => None,
                },
                _ => None,
            };
            match at(&mut t, &path) {
                Some(Value::Number(_)) if seen.insert(format!("n:{name}")) => {
                    for x in extremes {
                        let mut t = tree.clone();
                        if let Some(n) = at(&mut t, &path) {
                            *n = Value::String(format!("{RAW}{x}"));
                        }
                        out.push(tree_bytes(format, t));
                    }
                }
                Some(Value::String(v))
                    if format == Format::Json
                        && v.len() < 64
                        && v.bytes().any(|b| b.is_ascii_digit())
                        && seen.insert(format!("s:{}", header.as_deref().unwrap_or(&name))) =>
                {
                    for x in STRING_EXTREMES {
                        let mut t = tree.clone();
                        if let Some(n) = at(&mut t, &path) {
                            *n = Value::String(x.to_string());
                        }
                        out.push(tree_bytes(format, t));
                    }
                }
                // TOML has no duplicate keys to write.
                Some(Value::Object(m))
                    if format == Format::Json
                        && !m.is_empty()
                        && seen.insert(format!("o:{name}")) =>
                {
                    m.insert(DUP.into(), Value::Bool(true));
                    out.push(tree_bytes(format, t));
                }
                _ => {}
            }
        }
    }
    out
}

fn tree_bytes(format: Format, v: Value) -> Vec<u8> {
    match format {
        Format::Toml => match to_toml(v) {
            Some(toml::Value::Table(t)) => toml::to_string(&t).unwrap_or_default().into_bytes(),
            _ => Vec::new(),
        },
        _ => write_json(&close(v)).into_bytes(),
    }
}

fn text_extremes(
    seed: &[u8],
    seen: &mut std::collections::BTreeSet<String>,
    out: &mut Vec<Vec<u8>>,
) {
    let text = String::from_utf8_lossy(seed);
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
        let numbered = stem.len() < name.len() && stem.ends_with('_');
        let numeric = value.trim().parse::<f64>().is_ok();
        // The kind of variable: the stem without its provider prefix.
        let kind = stem.split_once('_').map_or(stem, |(_, k)| k);
        if !(numbered || numeric) || !seen.insert(format!("e:{kind}:{numeric}")) {
            continue;
        }
        for x in SWEEP_EXTREMES {
            let mut edited = lines.clone();
            let replaced = if numeric {
                format!("{name}={x}")
            } else {
                format!("{stem}{x}={value}")
            };
            edited[i] = &replaced;
            out.push(edited.join("\n").into_bytes());
        }
    }
}

/// The most bytes one [`TreeEdit::Repeat`] adds, so that a case stays quick.
pub const MAX_GROWTH: usize = 256 * 1024;

/// The key of an opened-up JSON string.
const OPENED: &str = "\u{1}json";
/// The key that marks an object whose first key is written twice.
const DUP: &str = "\u{1}dup";
/// The prefix of a string written verbatim.
const RAW: &str = "\u{1}raw:";

/// Replaces strings holding a JSON object or array by `{OPENED: value}`.
fn open(v: &mut Value) {
    match v {
        Value::String(s) => {
            let t = s.trim_start();
            if t.starts_with('{') || t.starts_with('[') {
                if let Ok(mut inner) = serde_json::from_str::<Value>(s) {
                    open(&mut inner);
                    let mut m = Map::new();
                    m.insert(OPENED.into(), inner);
                    *v = Value::Object(m);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(open),
        Value::Object(m) => m.values_mut().for_each(open),
        _ => {}
    }
}

/// Undoes [`open`]: the opened values become strings again.
fn close(v: Value) -> Value {
    match v {
        Value::Object(m) if m.len() == 1 && m.contains_key(OPENED) => {
            let inner = m.into_iter().next().map(|(_, v)| v).unwrap_or(Value::Null);
            Value::String(write_json(&close(inner)))
        }
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, close(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(close).collect()),
        other => other,
    }
}

/// JSON text of a tree, with [`RAW`] strings verbatim and [`DUP`] objects
/// writing their first key twice.
pub fn write_json(v: &Value) -> String {
    let mut out = String::new();
    write_into(v, &mut out);
    out
}

fn write_into(v: &Value, out: &mut String) {
    match v {
        Value::String(s) if s.starts_with(RAW) => out.push_str(&s[RAW.len()..]),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_into(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            let dup = m.contains_key(DUP);
            let mut first = true;
            let mut entries: Vec<(&String, &Value)> = m.iter().filter(|(k, _)| *k != DUP).collect();
            if dup {
                if let Some(&e) = entries.first() {
                    entries.push(e);
                }
            }
            for (k, x) in entries {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_into(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Every node's path, pre-order.
fn paths(v: &Value) -> Vec<Vec<Seg>> {
    fn walk(v: &Value, here: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
        out.push(here.clone());
        match v {
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    here.push(Seg::Index(i));
                    walk(x, here, out);
                    here.pop();
                }
            }
            Value::Object(m) => {
                for (k, x) in m {
                    here.push(Seg::Key(k.clone()));
                    walk(x, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn at<'a>(v: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut cur = v;
    for seg in path {
        cur = match (seg, cur) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn pick(v: &Value, node: u16) -> Vec<Seg> {
    let all = paths(v);
    all[node as usize % all.len()].clone()
}

fn apply_tree(root: &mut Value, edits: &[TreeEdit]) {
    for edit in edits {
        match edit {
            TreeEdit::Set { node, to } => {
                let p = pick(root, *node);
                if let Some(n) = at(root, &p) {
                    *n = leaf(to);
                }
            }
            TreeEdit::Remove { node } => {
                let p = pick(root, *node);
                if let Some((last, parent)) = p.split_last() {
                    match (last, at(root, parent)) {
                        (Seg::Key(k), Some(Value::Object(m))) => {
                            m.remove(k);
                        }
                        (Seg::Index(i), Some(Value::Array(a))) if *i < a.len() => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            TreeEdit::Copy { from, to } => {
                let from = pick(root, *from);
                let copy = at(root, &from).map(|v| v.clone());
                let to = pick(root, *to);
                if let (Some(copy), Some(n)) = (copy, at(root, &to)) {
                    *n = copy;
                }
            }
            TreeEdit::Add { node, key, to } => {
                let p = pick(root, *node);
                match at(root, &p) {
                    Some(Value::Array(a)) => a.push(leaf(to)),
                    Some(Value::Object(m)) => {
                        let k = KEYS[*key as usize % KEYS.len()];
                        m.insert(k.to_string(), leaf(to));
                    }
                    _ => {}
                }
            }
            TreeEdit::Repeat { node, times } => {
                let p = pick(root, *node);
                if let Some(Value::Array(a)) = at(root, &p) {
                    if let Some(last) = a.last().cloned() {
                        let size = last.to_string().len().max(1);
                        let times = (*times as usize % 1100).min(MAX_GROWTH / size);
                        for _ in 0..times {
                            a.push(last.clone());
                        }
                    }
                }
            }
            TreeEdit::Wrap { node, depth } => {
                let p = pick(root, *node);
                if let Some(n) = at(root, &p) {
                    for _ in 0..(*depth % 64) {
                        *n = Value::Array(vec![n.take()]);
                    }
                }
            }
            TreeEdit::DupKey { node } => {
                let p = pick(root, *node);
                if let Some(Value::Object(m)) = at(root, &p) {
                    m.insert(DUP.into(), Value::Bool(true));
                }
            }
        }
    }
}

fn leaf(l: &Leaf) -> Value {
    match l {
        Leaf::Null => Value::Null,
        Leaf::Bool(b) => Value::Bool(*b),
        Leaf::Int(i) => Value::from(*i),
        Leaf::Uint(u) => Value::from(*u),
        Leaf::Float(f) => Value::from(*f),
        Leaf::Extreme(i) => {
            Value::String(format!("{RAW}{}", EXTREMES[*i as usize % EXTREMES.len()]))
        }
        Leaf::Word(i) => Value::String(WORDS[*i as usize % WORDS.len()].to_string()),
        Leaf::Text(s) => Value::String(s.clone()),
        Leaf::Long { ch, len } => {
            let c = char::from(b' ' + ch % 95);
            Value::String(std::iter::repeat_n(c, *len as usize % 4097).collect())
        }
        Leaf::EmptyArray => Value::Array(Vec::new()),
        Leaf::EmptyObject => Value::Object(Map::new()),
    }
}

/// TOML seed → JSON tree → edits → TOML text. `None` when the seed is not
/// TOML or the edited tree has no TOML form (a null, a bare value at the top).
fn toml_edit(seed: &[u8], edits: &[TreeEdit]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(seed).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let mut v = serde_json::to_value(&table).ok()?;
    apply_tree(&mut v, edits);
    let v = to_toml(v)?;
    let toml::Value::Table(t) = v else {
        return None;
    };
    toml::to_string(&t).ok().map(String::into_bytes)
}

fn to_toml(v: Value) -> Option<toml::Value> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Value::String(s) => match s.strip_prefix(RAW) {
            // The extremes that are TOML numbers stay numbers.
            Some(raw) => match raw.parse::<i64>() {
                Ok(i) => toml::Value::Integer(i),
                Err(_) => match raw.parse::<f64>() {
                    Ok(f) => toml::Value::Float(f),
                    Err(_) => toml::Value::String(raw.to_string()),
                },
            },
            // toml_write 0.1 counts a run of quotes in a `u8`: 256 in a row
            // overflow it (a panic in debug builds). Such a tree is not
            // written; the daemon never writes TOML.
            None if longest_quote_run(&s) > 200 => return None,
            None => toml::Value::String(s),
        },
        Value::Array(a) => toml::Value::Array(a.into_iter().filter_map(to_toml).collect()),
        Value::Object(m) => toml::Value::Table(
            m.into_iter()
                .filter(|(k, _)| k != DUP)
                .filter_map(|(k, v)| Some((k, to_toml(v)?)))
                .collect(),
        ),
    })
}

fn longest_quote_run(s: &str) -> usize {
    let (mut best, mut run, mut last) = (0, 0, '\0');
    for c in s.chars() {
        run = if (c == '\'' || c == '"') && c == last {
            run + 1
        } else {
            1
        };
        last = c;
        if c == '\'' || c == '"' {
            best = best.max(run);
        }
    }
    best
}

fn apply_text(out: &mut Vec<u8>, edit: &TextEdit) {
    let n = out.len();
    let pos = |at: u32| if n == 0 { 0 } else { at as usize % (n + 1) };
    match edit {
        TextEdit::Insert { at, word } => {
            let p = pos(*at);
            let w = WORDS[*word as usize % WORDS.len()].as_bytes();
            out.splice(p..p, w.iter().copied());
        }
        TextEdit::Delete { at, len } => {
            let p = pos(*at);
            let end = (p + *len as usize).min(n);
            out.drain(p..end);
        }
        TextEdit::Byte { at, byte } => {
            if n > 0 {
                out[*at as usize % n] = *byte;
            }
        }
        TextEdit::Truncate { at } => out.truncate(pos(*at)),
        TextEdit::DupLine { line } => edit_lines(out, |lines| {
            let i = *line as usize % lines.len();
            let l = lines[i].clone();
            lines.insert(i, l);
        }),
        TextEdit::DeleteLine { line } => edit_lines(out, |lines| {
            let i = *line as usize % lines.len();
            lines.remove(i);
        }),
        TextEdit::SwapLines { a, b } => edit_lines(out, |lines| {
            let (a, b) = (*a as usize % lines.len(), *b as usize % lines.len());
            lines.swap(a, b);
        }),
    }
}

fn edit_lines(out: &mut Vec<u8>, f: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let mut lines: Vec<Vec<u8>> = out.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    if lines.is_empty() {
        return;
    }
    f(&mut lines);
    *out = lines.join(&b'\n');
}

/// Checks that the mutator does what it says. The lib has no test binary of
/// its own (`test = false`), so tests/fuzz.rs calls this.
pub fn self_check() {
    // Opened bodies survive a round trip unchanged when nothing is edited.
    let seed = br#"{"status":429,"body":"{\"error\":{\"code\":429}}"}"#.to_vec();
    let case = Case {
        seed: 0,
        tree: vec![TreeEdit::Set {
            node: 0,
            to: Leaf::Extreme(0),
        }],
        raw: 1,
        text: vec![TextEdit::Truncate { at: 0 }],
    };
    assert_eq!(
        materialize(Format::Json, std::slice::from_ref(&seed), &case),
        b"18446744073709551615"
    );
    let mut v: Value = serde_json::from_slice(&seed).unwrap();
    open(&mut v);
    // The root, status, body, the opened body, error, code.
    assert_eq!(paths(&v).len(), 6);
    assert_eq!(
        serde_json::from_str::<Value>(&write_json(&close(v))).unwrap(),
        serde_json::from_slice::<Value>(&seed).unwrap()
    );
    // Edits reach inside the body, and duplicate keys are written.
    let case = Case {
        seed: 0,
        tree: vec![
            TreeEdit::Set {
                node: 4,
                to: Leaf::Extreme(1),
            },
            TreeEdit::DupKey { node: 0 },
        ],
        raw: 1,
        text: vec![],
    };
    let out = String::from_utf8(materialize(Format::Json, &[seed], &case)).unwrap();
    // The number past u64 is in the body, and one key is written twice
    // (which one depends on the map's order).
    assert!(out.contains("18446744073709551616}"), "{out}");
    assert_eq!(
        out.matches(r#""body":"#).count() + out.matches(r#""status":"#).count(),
        3,
        "{out}"
    );
    // TOML round trip with an edit.
    let toml_seed = b"[queue]\nconcurrency = 4\n".to_vec();
    let case = Case {
        seed: 0,
        tree: vec![TreeEdit::Set {
            node: 2,
            to: Leaf::Extreme(9),
        }],
        raw: 1,
        text: vec![],
    };
    let out = String::from_utf8(materialize(Format::Toml, &[toml_seed], &case)).unwrap();
    assert!(out.contains("concurrency = -1"), "{out}");
    // Text edits.
    let case = Case {
        seed: 0,
        tree: vec![],
        raw: 1,
        text: vec![TextEdit::DupLine { line: 1 }, TextEdit::Truncate { at: 7 }],
    };
    assert_eq!(
        materialize(Format::Text, &[b"A=1\nB=2\n".to_vec()], &case),
        b"A=1\nB=2"
    );
}
