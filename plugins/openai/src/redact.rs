//! Masks API-key-looking tokens in upstream messages before they leave the
//! plugin. OpenAI masks keys itself ("Incorrect API key provided:
//! sk-test-****1111"), but not every OpenAI-compatible server does, and an
//! upstream message ends up in results, logs and stats.

/// Prefixes of the provider key formats llmq deals with.
const KEY_PREFIXES: &[&str] = &["sk-", "gsk_", "nvapi-", "xai-", "csk-", "pplx-", "Bearer "];

/// A token this long after a prefix is treated as a secret.
const MIN_SECRET_LEN: usize = 16;

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Returns `s` with every key-looking token replaced by `prefix****last4`.
pub fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    'outer: while !rest.is_empty() {
        for prefix in KEY_PREFIXES {
            if let Some(after) = rest.strip_prefix(prefix) {
                // Only at a token boundary: "task-…" must not match "sk-".
                let at_boundary = out.chars().last().is_none_or(|c| !is_key_char(c));
                let end = after.find(|c| !is_key_char(c)).unwrap_or(after.len());
                // A sentence's full stop is not part of the key.
                let len = after[..end].trim_end_matches('.').len();
                if at_boundary && len >= MIN_SECRET_LEN {
                    let secret = &after[..len];
                    let tail: String = secret
                        .chars()
                        .rev()
                        .take(4)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    out.push_str(prefix);
                    out.push_str("****");
                    out.push_str(&tail);
                    rest = &after[len..];
                    continue 'outer;
                }
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_unmasked_keys_and_bearer_tokens() {
        assert_eq!(
            redact("Incorrect API key provided: sk-test-aaaa1111bbbb2222cccc."),
            "Incorrect API key provided: sk-****cccc."
        );
        assert_eq!(
            redact("bad header Bearer abcdefghijklmnopqrstuvwxyz0123"),
            "bad header Bearer ****0123"
        );
        assert_eq!(
            redact("key gsk_ABCDEFGHIJKLMNOPQRSTUVWX is revoked"),
            "key gsk_****UVWX is revoked"
        );
    }

    #[test]
    fn leaves_masked_keys_short_tokens_and_words_alone() {
        let already = "Incorrect API key provided: sk-test-********1111. You can find your API key at https://platform.openai.com/account/api-keys.";
        assert_eq!(redact(already), already);
        assert_eq!(
            redact("ask-me-anything-please-now"),
            "ask-me-anything-please-now"
        );
        assert_eq!(
            redact("余额不足或无可用资源包,请充值。"),
            "余额不足或无可用资源包,请充值。"
        );
        assert_eq!(redact(""), "");
    }
}
