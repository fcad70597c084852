//! Helpers for reading a response: the small parsers every provider adapter
//! needs.
//!
//! - Rate-limit headers: [`parse_duration_ms`] (`6m0s`), [`parse_retry_after_ms`],
//!   [`parse_rfc3339_ms`], [`parse_u64`], and [`retry_after_headers_ms`] for
//!   the usual `retry-after-ms` / `retry-after` pair.
//! - Hints in prose: [`duration_after`] reads "Please retry in 20.5s." style
//!   waits out of an upstream message.
//! - Upstream messages end up in results, logs and stats, so a plugin passes
//!   them on through [`mask_keys`] (an upstream may echo the key) and
//!   [`truncate_message`] (keep them small).

use crate::types::HttpResponse;

/// Parses a Go-style duration as OpenAI and Groq send in
/// `x-ratelimit-reset-*`: `6m0s`, `1.5s`, `20ms`, `2h3m`, `0.5s`, `59.9s`.
/// A bare number is read as seconds. Returns milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_ms(secs);
    }
    let mut total = 0f64;
    let mut rest = s;
    let mut any = false;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor = match unit {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        total += value * factor;
        any = true;
    }
    if any && total.is_finite() && total >= 0.0 {
        Some(total.ceil() as u64)
    } else {
        None
    }
}

fn secs_to_ms(secs: f64) -> Option<u64> {
    if secs.is_finite() && secs >= 0.0 {
        Some((secs * 1000.0).ceil() as u64)
    } else {
        None
    }
}

/// Parses a `retry-after` header given in seconds (`"20"`, `"1.5"`).
/// HTTP-date forms are not used by the LLM providers and yield `None`.
pub fn parse_retry_after_ms(s: &str) -> Option<u64> {
    s.trim().parse::<f64>().ok().and_then(secs_to_ms)
}

/// Parses an RFC 3339 UTC timestamp (`2024-05-01T12:00:30Z`, fractional
/// seconds and `+00:00` allowed) into Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (clock, offset_ms) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0i64)
    } else if let Some(idx) = time.rfind(['+', '-']) {
        let (c, off) = time.split_at(idx);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        let off_ms = (oh.parse::<i64>().ok()? * 60 + om.parse::<i64>().ok()?) * 60_000;
        (c, sign * off_ms)
    } else {
        return None;
    };
    let mut t = clock.split(':');
    let hour: i64 = t.next()?.parse().ok()?;
    let minute: i64 = t.next()?.parse().ok()?;
    let sec_f: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let ms = days * 86_400_000 + hour * 3_600_000 + minute * 60_000 + (sec_f * 1000.0) as i64
        - offset_ms;
    u64::try_from(ms).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses a header value as an unsigned integer.
pub fn parse_u64(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// How long the response's standard headers say to wait, in ms:
/// `retry-after-ms` (milliseconds, fractions rounded up; OpenAI and Anthropic
/// send it), else `retry-after` (seconds). `None` when neither is usable.
pub fn retry_after_headers_ms(resp: &HttpResponse) -> Option<u64> {
    if let Some(ms) = resp
        .header("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(ms.ceil() as u64);
    }
    resp.header("retry-after").and_then(parse_retry_after_ms)
}

/// The duration written right after `phrase` in a message, in ms:
/// `duration_after("Please retry in 20.5s.", "retry in ")` is `Some(20_500)`.
/// `phrase` is found case-insensitively (ASCII); the duration is the word
/// after it, up to white space or a comma, without a trailing `.`, `,` or
/// `;`, read by [`parse_duration_ms`].
pub fn duration_after(message: &str, phrase: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find(&phrase.to_ascii_lowercase())?;
    let word = lower[at + phrase.len()..]
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()?;
    parse_duration_ms(word.trim_end_matches(['.', ',', ';']))
}

/// Masks every key that starts with one of `prefixes` (e.g. `sk-ant-`,
/// `AIza`) to the prefix, `…` and the key's last four characters
/// (`sk-ant-…1234`; no tail for a key of 8 characters or fewer). A key runs
/// over ASCII letters, digits, `-` and `_`. Upstreams echo keys in their
/// error messages, and those messages reach results and logs.
pub fn mask_keys(text: &str, prefixes: &[&str]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((at, prefix)) = first_prefix(rest, prefixes) {
        out.push_str(&rest[..at]);
        let tail = &rest[at + prefix.len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(tail.len());
        let secret = &tail[..len];
        out.push_str(prefix);
        out.push('…');
        if secret.len() > 8 {
            // ASCII only, so the last four bytes are four characters.
            out.push_str(&secret[secret.len() - 4..]);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// The earliest of `prefixes` in `s` (the longest on a tie), with its offset.
fn first_prefix<'p>(s: &str, prefixes: &[&'p str]) -> Option<(usize, &'p str)> {
    prefixes
        .iter()
        .filter(|p| !p.is_empty())
        .filter_map(|p| s.find(*p).map(|at| (at, *p)))
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())))
}

/// `s` cut to `max_chars` characters (not bytes), with `…` appended when
/// anything was cut.
pub fn truncate_message(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((idx, _)) => format!("{}…", &s[..idx]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration_ms("6m0s"), Some(360_000));
        assert_eq!(parse_duration_ms("1.5s"), Some(1_500));
        assert_eq!(parse_duration_ms("20ms"), Some(20));
        assert_eq!(parse_duration_ms("2h3m"), Some(7_380_000));
        assert_eq!(parse_duration_ms("7.66s"), Some(7_660));
        assert_eq!(parse_duration_ms("12"), Some(12_000));
        assert_eq!(parse_duration_ms(""), None);
        assert_eq!(parse_duration_ms("soon"), None);
        assert_eq!(parse_duration_ms("5x"), None);
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after_ms("20"), Some(20_000));
        assert_eq!(parse_retry_after_ms("0.25"), Some(250));
        assert_eq!(parse_retry_after_ms("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T12:00:30Z"),
            Some(1_714_564_830_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T12:00:30.5Z"),
            Some(1_714_564_830_500)
        );
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T14:00:30+02:00"),
            Some(1_714_564_830_000)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    fn resp(headers: &[(&str, &str)]) -> HttpResponse {
        HttpResponse {
            status: 429,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: String::new(),
            received_at_unix_ms: 0,
        }
    }

    #[test]
    fn retry_after_ms_header_wins_over_seconds() {
        let both = resp(&[("retry-after", "9"), ("retry-after-ms", "1500.2")]);
        assert_eq!(retry_after_headers_ms(&both), Some(1_501));
        assert_eq!(
            retry_after_headers_ms(&resp(&[("Retry-After", "20")])),
            Some(20_000)
        );
        // An unusable retry-after-ms falls back to retry-after.
        let bad_ms = resp(&[("retry-after-ms", "-5"), ("retry-after", "2")]);
        assert_eq!(retry_after_headers_ms(&bad_ms), Some(2_000));
        assert_eq!(retry_after_headers_ms(&resp(&[])), None);
    }

    #[test]
    fn durations_after_a_phrase() {
        let retry_in = |m: &str| duration_after(m, "retry in ");
        assert_eq!(retry_in("Please retry in 20.04466179s."), Some(20_045));
        assert_eq!(retry_in("please retry in 616.645018ms."), Some(617));
        assert_eq!(retry_in("Please RETRY IN 2s; later"), Some(2_000));
        assert_eq!(retry_in("please retry later"), None);
        let again = |m: &str| duration_after(m, "try again in ");
        assert_eq!(
            again("Please try again in 9m38.016s. Need more tokens?"),
            Some(578_016)
        );
        assert_eq!(again("try again in 20ms, then"), Some(20));
        assert_eq!(again("try again in a bit"), None);
    }

    #[test]
    fn keys_are_masked_to_prefix_and_last_four() {
        let ant = ["sk-ant-"];
        assert_eq!(
            mask_keys("bad key sk-ant-api03-test-fake-fake-1234, try again", &ant),
            "bad key sk-ant-…1234, try again"
        );
        assert_eq!(mask_keys("sk-ant-short", &ant), "sk-ant-…");
        assert_eq!(mask_keys("no key here", &ant), "no key here");
        assert_eq!(
            mask_keys(
                "Consumer 'api_key:AIzaSyA1b2C3d4E5f6G7h8' suspended",
                &["AIza"]
            ),
            "Consumer 'api_key:AIza…G7h8' suspended"
        );
        // Several prefixes: each key by its own; the longer prefix on a tie.
        assert_eq!(
            mask_keys(
                "a sk-aaaaaaaa1111 b sk-ant-bbbbbbbb2222",
                &["sk-", "sk-ant-"]
            ),
            "a sk-…1111 b sk-ant-…2222"
        );
        assert_eq!(mask_keys("x sk-ant-zz", &["", "sk-ant-"]), "x sk-ant-…");
    }

    #[test]
    fn messages_are_cut_on_a_char_boundary() {
        assert_eq!(truncate_message("abc", 3), "abc");
        assert_eq!(truncate_message("abcd", 3), "abc…");
        let cut = truncate_message(&"é".repeat(10), 4);
        assert_eq!(cut, "éééé…");
        assert_eq!(truncate_message("", 0), "");
    }
}
