//! Masked forms of secrets (`gsk_…x9f2`): the only way a key is ever shown.

/// Vendor prefixes that identify a key's kind and carry no secret material.
/// Longest first, so `sk-ant-` wins over `sk-`.
const VENDOR_PREFIXES: &[&str] = &[
    "sk-svcacct-",
    "sk-or-v1-",
    "sk-proj-",
    "sk-ant-",
    "nvapi-",
    "gsk_",
    "xai-",
    "AIza",
    "sk-",
];

/// Characters of the secret's end that are shown.
const TAIL: usize = 4;
/// Below this length only `…` and at most the last 2 characters are shown.
const SHORT: usize = 12;
/// A vendor prefix longer than 4 characters is shown only if at least this
/// many characters stay hidden.
const MIN_HIDDEN: usize = 8;

/// The masked form of a secret: the head (a vendor prefix such as `gsk_`,
/// `sk-`, `sk-ant-`, `AIza`, `nvapi-`, or else up to 4 leading characters cut
/// after the first `_`/`-`), `…`, and the last 4 characters.
/// Secrets shorter than 12 characters show only `…` and at most their last 2.
///
/// ```
/// use llmq::keys::mask;
/// assert_eq!(mask("gsk_abcdefghijklmnopqrstuvx9f2"), "gsk_…x9f2");
/// assert_eq!(mask("sk-abcdefghijklmnop9f2a"), "sk-…9f2a");
/// assert_eq!(mask("tiny-key"), "…ey");
/// ```
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len();
    if n < SHORT {
        // Show at most a quarter of a short secret, and never more than 2.
        let shown = (n / 4).min(2);
        let tail: String = chars[n - shown..].iter().collect();
        return format!("…{tail}");
    }
    let head_len = head_len(secret, &chars);
    let head: String = chars[..head_len].iter().collect();
    let tail: String = chars[n - TAIL..].iter().collect();
    format!("{head}…{tail}")
}

/// How many leading characters of a secret of 12+ characters are shown.
fn head_len(secret: &str, chars: &[char]) -> usize {
    let n = chars.len();
    if let Some(prefix) = VENDOR_PREFIXES.iter().find(|p| secret.starts_with(**p)) {
        // Prefixes are ASCII, so bytes == chars.
        let len = prefix.len();
        if len <= 4 || n >= len + TAIL + MIN_HIDDEN {
            return len;
        }
    }
    let first4 = &chars[..4.min(n)];
    match first4.iter().position(|c| *c == '_' || *c == '-') {
        Some(i) => i + 1,
        None => first4.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::mask;

    #[test]
    fn vendor_prefixes_are_kept() {
        assert_eq!(mask("gsk_abcdefghijklmnopqrstuvx9f2"), "gsk_…x9f2");
        assert_eq!(mask("sk-abcdefghijklmnop9f2a"), "sk-…9f2a");
        assert_eq!(
            mask("sk-ant-api03-test-fake-fake-fake-fake-1234"),
            "sk-ant-…1234"
        );
        assert_eq!(
            mask("sk-proj-test-fake-fake-fake-fakeQWER"),
            "sk-proj-…QWER"
        );
        assert_eq!(
            mask("sk-or-v1-0123456789abcdef0123456789abcdefBEEF"),
            "sk-or-v1-…BEEF"
        );
        assert_eq!(mask("AIza-test-fake-fake-fake-fake-fakerstu"), "AIza…rstu");
        assert_eq!(mask("nvapi-0123456789abcdefghijklmnopq"), "nvapi-…nopq");
    }

    #[test]
    fn unknown_shapes_show_at_most_four_leading_chars() {
        assert_eq!(mask("0123456789abcdefghij"), "0123…ghij");
        assert_eq!(mask("ab-cdefghijklmnop"), "ab-…mnop");
        assert_eq!(mask("abcd.efghijklmnopqrs"), "abcd…pqrs");
    }

    #[test]
    fn long_vendor_prefix_on_a_short_secret_falls_back() {
        // 15 chars: "sk-ant-" + 4 tail would leave only 4 hidden.
        assert_eq!(mask("sk-ant-abcdWXYZ"), "sk-…WXYZ");
    }

    #[test]
    fn short_secrets_show_at_most_two_chars() {
        assert_eq!(mask(""), "…");
        assert_eq!(mask("abc"), "…");
        assert_eq!(mask("abcd"), "…d");
        assert_eq!(mask("abcdefgh"), "…gh");
        assert_eq!(mask("abcdefghijk"), "…jk");
    }

    #[test]
    fn multibyte_secrets_do_not_panic() {
        assert_eq!(mask("ключ-секретный-ключ"), "ключ…ключ");
        assert_eq!(mask("ééé"), "…");
    }
}
