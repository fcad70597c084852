//! Helpers for plugin authors: the small parsers every provider adapter needs.

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
}
