//! Small formatters: Go-style durations (OpenAI reset headers), RFC 3339
//! timestamps (Anthropic reset headers) and masked key labels.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds to milliseconds, rounded up so a client never retries early.
pub(crate) fn ns_to_ms_ceil(ns: u64) -> u64 {
    ns.div_ceil(1_000_000)
}

/// Milliseconds to whole seconds, rounded up.
pub(crate) fn ms_to_secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1_000)
}

/// A duration in the style of Go's `time.Duration.String()` at millisecond
/// precision, as OpenAI sends in `x-ratelimit-reset-*`: `0s`, `20ms`,
/// `1.234s`, `6m0s`, `1h2m3.5s`.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = (ms / 60_000) % 60;
    let secs = (ms / 1_000) % 60;
    let frac = ms % 1_000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&secs.to_string());
    if frac > 0 {
        let digits = format!("{frac:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// Current wall-clock time in Unix milliseconds.
pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A UTC RFC 3339 timestamp with millisecond precision,
/// e.g. `2024-05-01T12:00:30.250Z`.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let days = (unix_ms / 86_400_000) as i64;
    let rem = unix_ms % 86_400_000;
    let (y, m, d) = civil_from_days(days);
    let h = rem / 3_600_000;
    let min = (rem / 60_000) % 60;
    let s = (rem / 1_000) % 60;
    let ms = rem % 1_000;
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{ms:03}Z")
}

/// Civil date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The stats label of a key without a configured label: the first four and
/// last four characters (`sk-a…9f2a`) for keys of 12+ characters; shorter
/// keys would be mostly revealed that way, so they get `key-` and a hash.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() >= 12 {
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}…{tail}")
    } else {
        // FNV-1a: stable across runs and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("key-{:08x}", h as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmq_sdk::wire::{parse_duration_ms, parse_rfc3339_ms};

    #[test]
    fn go_durations_round_trip_through_the_sdk_parser() {
        for (ms, text) in [
            (0, "0s"),
            (20, "20ms"),
            (1_000, "1s"),
            (1_234, "1.234s"),
            (1_500, "1.5s"),
            (360_000, "6m0s"),
            (61_500, "1m1.5s"),
            (3_723_500, "1h2m3.5s"),
            (3_600_000, "1h0m0s"),
        ] {
            assert_eq!(go_duration(ms), text);
            assert_eq!(parse_duration_ms(text), Some(ms), "{text}");
        }
    }

    #[test]
    fn rfc3339_round_trips_through_the_sdk_parser() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_250), "2000-02-29T00:00:00.250Z");
        for ms in [1_714_564_830_250u64, 4_102_444_800_000, 1_709_251_199_999] {
            assert_eq!(parse_rfc3339_ms(&rfc3339_ms(ms)), Some(ms));
        }
    }

    #[test]
    fn masks_never_contain_the_key() {
        assert_eq!(mask_key("sk-abcdefgh12345678"), "sk-a…5678");
        let short = mask_key("k1");
        assert!(short.starts_with("key-") && !short.contains("k1"));
        assert_eq!(short, mask_key("k1"));
        assert_ne!(mask_key("k1"), mask_key("k2"));
        assert_eq!(ns_to_ms_ceil(1), 1);
        assert_eq!(ms_to_secs_ceil(1_001), 2);
    }
}
