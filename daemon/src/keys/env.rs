//! The environment as llmq sees it: the process env overlaid on a `.env` file.

use super::KeyError;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Where a variable came from; rendered as the `source` of a key.
#[derive(Clone)]
enum Origin {
    /// The process env (or `from_pairs`, which stands in for it).
    Process,
    /// A `.env` file, with the 1-based line the variable starts on if found.
    File {
        path: Arc<Path>,
        line: Option<usize>,
    },
}

#[derive(Clone)]
struct Var {
    value: SecretString,
    origin: Origin,
}

/// A snapshot of environment variables. Every value is held as a secret; the
/// `Debug` form shows only how many variables there are.
///
/// Precedence follows dotenvy: a variable already present (the process env)
/// wins over the file, and within one file the first definition wins.
#[derive(Clone, Default)]
pub struct EnvSource {
    vars: BTreeMap<String, Var>,
}

impl EnvSource {
    /// The process environment (variables whose name or value is not UTF-8
    /// are left out).
    pub(crate) fn from_process() -> Self {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .map(|(k, v)| {
                let var = Var {
                    value: SecretString::from(v),
                    origin: Origin::Process,
                };
                (k, var)
            })
            .collect();
        EnvSource { vars }
    }

    /// The process env overlaid on an env file. With `Some(path)` the file
    /// must exist (`--env-file`); with `None`, `./.env` is read if present.
    pub fn from_process_and_file(path: Option<&Path>) -> Result<Self, KeyError> {
        let env = Self::from_process();
        match path {
            Some(p) => env.with_env_file(p),
            None => {
                let default = Path::new(".env");
                if default.is_file() {
                    env.with_env_file(default)
                } else {
                    Ok(env)
                }
            }
        }
    }

    /// Variables given directly, standing in for the process env (tests,
    /// embedding). Later pairs with the same name replace earlier ones.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars = pairs
            .into_iter()
            .map(|(k, v)| {
                let var = Var {
                    value: SecretString::from(v.into()),
                    origin: Origin::Process,
                };
                (k.into(), var)
            })
            .collect();
        EnvSource { vars }
    }

    /// Adds the variables of a dotenv file that are not already set. The
    /// file must exist. Parse errors name the file and line, never its text.
    pub fn with_env_file(mut self, path: &Path) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::EnvFile {
            path: path.to_path_buf(),
            source,
        })?);
        let body: &[u8] = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let text = String::from_utf8_lossy(body);
        let shared: Arc<Path> = Arc::from(path);
        for item in dotenvy::from_read_iter(body) {
            let (name, value) = match item {
                Ok(pair) => pair,
                Err(e) => return Err(parse_error(path, &text, e)),
            };
            let value = SecretString::from(value);
            if self.vars.contains_key(&name) {
                continue;
            }
            let line = line_of(&text, &name);
            let origin = Origin::File {
                path: shared.clone(),
                line,
            };
            self.vars.insert(name, Var { value, origin });
        }
        Ok(self)
    }

    /// The value of a variable, as a secret.
    pub fn secret(&self, name: &str) -> Option<&SecretString> {
        self.vars.get(name).map(|v| &v.value)
    }

    /// The value of a variable, trimmed; `None` when unset or blank.
    pub(crate) fn value(&self, name: &str) -> Option<&str> {
        let v = self.vars.get(name)?.value.expose_secret().trim();
        (!v.is_empty()).then_some(v)
    }

    #[cfg(test)]
    /// True when the variable is set (possibly to an empty value).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    /// All variable names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    /// Names starting with `prefix`, sorted.
    pub(crate) fn names_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.vars
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(prefix))
    }

    /// Where a variable was set, for reports: `env NAME` or
    /// `.env line 7 (NAME)`.
    pub(crate) fn describe(&self, name: &str) -> String {
        self.describe_as(name, name)
    }

    /// Like [`describe`](Self::describe) for item `i` of a list variable:
    /// `env NAME[i]` or `.env line 7 (NAME[i])`.
    pub(crate) fn describe_item(&self, name: &str, i: usize) -> String {
        self.describe_as(name, &format!("{name}[{i}]"))
    }

    fn describe_as(&self, name: &str, label: &str) -> String {
        match self.vars.get(name).map(|v| &v.origin) {
            Some(Origin::File {
                path,
                line: Some(line),
            }) => format!("{} line {line} ({label})", path.display()),
            Some(Origin::File { path, line: None }) => {
                format!("{} ({label})", path.display())
            }
            Some(Origin::Process) | None => format!("env {label}"),
        }
    }
}

impl fmt::Debug for EnvSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvSource")
            .field("vars", &self.vars.len())
            .finish_non_exhaustive()
    }
}

/// The 1-based line on which `name` is first assigned (`NAME=`, `export NAME =`).
fn line_of(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let l = line.trim_start();
            let l = l.strip_prefix("export ").map_or(l, str::trim_start);
            l.strip_prefix(name)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// A dotenvy error without the offending line's text (it may hold a secret).
fn parse_error(path: &Path, text: &str, e: dotenvy::Error) -> KeyError {
    match e {
        dotenvy::Error::LineParse(bad, _) => {
            let bad = Zeroizing::new(bad);
            let first = bad.lines().next().unwrap_or("");
            let line = text.lines().position(|l| l == first).map(|i| i + 1);
            KeyError::EnvFileParse {
                path: path.to_path_buf(),
                line,
            }
        }
        dotenvy::Error::Io(source) => KeyError::EnvFile {
            path: path.to_path_buf(),
            source,
        },
        _ => KeyError::EnvFileParse {
            path: path.to_path_buf(),
            line: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_numbers_are_found() {
        let text = "# comment\nA=1\n  export B = 2\nAB=3\n";
        assert_eq!(line_of(text, "A"), Some(2));
        assert_eq!(line_of(text, "B"), Some(3));
        assert_eq!(line_of(text, "AB"), Some(4));
        assert_eq!(line_of(text, "C"), None);
    }

    #[test]
    fn prefix_range_is_exact() {
        let env = EnvSource::from_pairs([
            ("GROQ_A", "1"),
            ("GROQZ", "2"),
            ("GRO", "3"),
            ("GROQ_B", "4"),
        ]);
        let names: Vec<_> = env.names_with_prefix("GROQ_").collect();
        assert_eq!(names, ["GROQ_A", "GROQ_B"]);
    }

    #[test]
    fn debug_shows_no_values() {
        let env = EnvSource::from_pairs([("OPENAI_API_KEY", "sk-test-DEBUGLEAKCHECK0001")]);
        let dbg = format!("{env:?}");
        assert!(!dbg.contains("DEBUGLEAKCHECK"), "{dbg}");
        assert!(!dbg.contains("OPENAI_API_KEY"), "{dbg}");
    }

    #[test]
    fn value_trims_and_hides_blank() {
        let env = EnvSource::from_pairs([("A", "  x \r"), ("B", "   ")]);
        assert_eq!(env.value("A"), Some("x"));
        assert_eq!(env.value("B"), None);
        assert!(env.contains("B"));
        assert_eq!(env.value("C"), None);
    }
}
