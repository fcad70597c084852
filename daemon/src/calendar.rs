//! Calendar math, in one place: when a provider's day starts and ends.
//!
//! Providers reset their per-day quotas at a time of *their* clock: Gemini's
//! requests-per-day quotas reset at midnight Pacific time, others at UTC
//! midnight. A provider's `daily_reset = "00:00 America/Los_Angeles"`
//! (time of day + IANA zone; default `"00:00 UTC"`) is a [`DailyReset`]:
//! it says which provider-local day an instant belongs to
//! ([`DailyReset::day_of`], the number that keys daily counters, RPD/TPD
//! and daily budgets) and when the next reset comes
//! ([`DailyReset::next_after`], for "parked until the next daily reset").
//!
//! A provider day `d` is the calendar date `d` (days since 1970-01-01) of
//! the provider's zone, and it starts at the instant its wall clock shows
//! the reset time on that date. Days are therefore 23 or 25 hours long on
//! DST transition days. A reset time that falls in a DST gap (it does not
//! exist that day) happens when the clock jumps past it; one that falls in
//! a fold (it happens twice) happens the first time (RFC 5545 / Temporal's
//! "compatible" disambiguation).
//!
//! # Crate: `jiff`
//!
//! Real zones need the IANA time zone database and its DST rules, which we
//! do not write by hand. `jiff` (by the author of `regex`) is a
//! well-maintained date-time crate modelled on TC39 Temporal, with IANA
//! zones, DST-aware conversions and explicit disambiguation of gaps and
//! folds. It reads the system's `/usr/share/zoneinfo` (kept current by OS
//! updates), and with its `tzdb-bundle-always` feature falls back to a
//! copy of the database compiled into the binary when a minimal container
//! has none. `chrono-tz` only offers the compiled-in copy (which ages with
//! the build), `time` has no IANA zones, and `chrono` alone has no
//! database.
//!
//! Nothing else in the daemon divides Unix time by 86 400 000.

use jiff::civil::{Date, Time};
use jiff::tz::{TimeZone, TimeZoneDatabase};
use jiff::Timestamp;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// Milliseconds in a day of 24 hours.
pub const DAY_MS: u64 = 86_400_000;
const DAY_MS_I: i64 = DAY_MS as i64;

/// Why a `daily_reset` string was refused. The message says what was
/// expected; the config loader adds the provider and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; expected a time of day and an IANA time zone, e.g. \"00:00 America/Los_Angeles\" or \"00:00 UTC\"; got {given:?}")]
pub struct DailyResetError {
    given: String,
    problem: String,
}

/// When a provider's day starts: a time of day on an IANA zone's clock.
///
/// Cheap to clone (the zone is shared). `Default` is UTC midnight.
#[derive(Clone)]
pub struct DailyReset {
    /// The reset time as minutes after local midnight.
    minutes: u16,
    zone: String,
    tz: TimeZone,
    /// A zone that never changes its offset from UTC (UTC itself): day
    /// numbers are plain arithmetic, without a zone lookup.
    fixed_utc: bool,
}

impl DailyReset {
    /// Midnight UTC (the default).
    pub fn utc_midnight() -> DailyReset {
        DailyReset {
            minutes: 0,
            zone: "UTC".into(),
            tz: TimeZone::UTC,
            fixed_utc: true,
        }
    }

    /// Parses `"HH:MM Zone"`, e.g. `"00:00 America/Los_Angeles"`.
    pub fn parse(text: &str) -> Result<DailyReset, DailyResetError> {
        let fail = |problem: String| DailyResetError {
            given: text.to_string(),
            problem,
        };
        let mut parts = text.split_whitespace();
        let (Some(clock), Some(zone), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(fail(
                "a time of day and a time zone separated by one space".into(),
            ));
        };
        let (h, m) = clock
            .split_once(':')
            .filter(|(h, m)| {
                (1..=2).contains(&h.len())
                    && m.len() == 2
                    && h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())
            })
            .ok_or_else(|| fail(format!("{clock:?} is not a time of day HH:MM")))?;
        let (h, m): (u16, u16) = (
            h.parse().map_err(|_| fail(format!("bad hour {h:?}")))?,
            m.parse().map_err(|_| fail(format!("bad minute {m:?}")))?,
        );
        if h > 23 || m > 59 {
            return Err(fail(format!(
                "{clock} is not a time of day (00:00 to 23:59)"
            )));
        }
        let tz = lookup_zone(zone).ok_or_else(|| {
            fail(format!(
                "unknown time zone {zone:?} (not in the IANA time zone database)"
            ))
        })?;
        let fixed_utc = zone.eq_ignore_ascii_case("UTC") || zone == "Etc/UTC";
        Ok(DailyReset {
            minutes: h * 60 + m,
            zone: zone.to_string(),
            tz: if fixed_utc { TimeZone::UTC } else { tz },
            fixed_utc,
        })
    }

    /// The zone's name as configured (`America/Los_Angeles`).
    pub fn zone(&self) -> &str {
        &self.zone
    }

    fn at(&self) -> Time {
        // minutes < 24 * 60, checked at parse.
        Time::constant((self.minutes / 60) as i8, (self.minutes % 60) as i8, 0, 0)
    }

    /// Unix milliseconds at which provider day `day` starts.
    pub fn start_of(&self, day: i64) -> i64 {
        let offset = i64::from(self.minutes) * 60_000;
        if self.fixed_utc {
            return day.saturating_mul(DAY_MS_I).saturating_add(offset);
        }
        let Some(date) = date_of_day(day) else {
            // Outside jiff's range (±9999 years): plain arithmetic is as
            // good as anything there.
            return day.saturating_mul(DAY_MS_I).saturating_add(offset);
        };
        match self.tz.to_timestamp(date.to_datetime(self.at())) {
            Ok(ts) => ts.as_millisecond(),
            Err(_) => day.saturating_mul(DAY_MS_I).saturating_add(offset),
        }
    }

    /// The provider day (days since 1970-01-01 on the provider's calendar,
    /// counting from its reset time) that `unix_ms` belongs to. Keys daily
    /// counters: `day_string(day)` is that day's date in the zone.
    pub fn day_of(&self, unix_ms: u64) -> i64 {
        self.bounds(unix_ms).0
    }

    /// The next reset strictly after `unix_ms` (Unix milliseconds).
    pub fn next_after(&self, unix_ms: u64) -> u64 {
        self.bounds(unix_ms).2
    }

    /// `(day, start, end)`: the provider day holding `unix_ms`, the instant
    /// it started (≤ `unix_ms`) and the next reset (> `unix_ms`), in Unix ms.
    pub fn bounds(&self, unix_ms: u64) -> (i64, u64, u64) {
        let t = i64::try_from(unix_ms).unwrap_or(i64::MAX);
        let clamp = |ms: i64| ms.max(0) as u64;
        let offset = i64::from(self.minutes) * 60_000;
        if self.fixed_utc {
            let day = (t - offset).div_euclid(DAY_MS_I);
            let start = day * DAY_MS_I + offset;
            return (day, clamp(start), clamp(start + DAY_MS_I));
        }
        // The local date of `t`, then step back or forward: a day starts
        // at its reset instant, which may lie on either side of `t`.
        let local = Timestamp::from_millisecond(t)
            .map(|ts| days_since_epoch(self.tz.to_datetime(ts).date()))
            .unwrap_or_else(|_| t.div_euclid(DAY_MS_I));
        let mut day = local;
        while self.start_of(day) > t {
            day -= 1;
        }
        let mut next = self.start_of(day + 1);
        // A zone that skipped a whole date (Samoa, 2011-12-30) can give
        // two days the same start: the later one holds `t`.
        while next <= t {
            day += 1;
            next = self.start_of(day + 1);
        }
        (day, clamp(self.start_of(day)), clamp(next))
    }
}

/// A provider day and its bounds, remembered so that most lookups are two
/// comparisons instead of zone math. Forget it (`Default`) when the
/// [`DailyReset`] it was computed with changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CachedDay {
    day: i64,
    start_ms: u64,
    end_ms: u64,
}

impl CachedDay {
    /// [`DailyReset::day_of`] of `unix_ms`, from the cache while it holds.
    pub fn day(&mut self, reset: &DailyReset, unix_ms: u64) -> i64 {
        if unix_ms < self.start_ms || unix_ms >= self.end_ms {
            let (day, start_ms, end_ms) = reset.bounds(unix_ms);
            *self = CachedDay {
                day,
                start_ms,
                end_ms,
            };
        }
        self.day
    }
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01).
pub fn day_string(day: i64) -> String {
    match date_of_day(day) {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()),
        None => format!("day{day}"),
    }
}

/// The day number (days since 1970-01-01, before it negative) of a
/// calendar date written `YYYY-MM-DD`; `None` for anything else or a day
/// that does not exist (`2024-02-30`).
pub fn parse_day(day: &str) -> Option<i64> {
    let mut parts = day.splitn(3, '-');
    let year: i16 = parts.next()?.parse().ok()?;
    let month: i8 = parts.next()?.parse().ok()?;
    let dom: i8 = parts.next()?.parse().ok()?;
    Date::new(year, month, dom).ok().map(days_since_epoch)
}

/// RFC 3339 (UTC) of a Unix-ms instant, for messages and timestamps:
/// `2024-05-01T10:00:00Z`, with a fraction only when there is one.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{unix_ms} ms"), |t| t.to_string())
}

/// The current UTC time in RFC 3339 (to the nanosecond the system clock
/// gives).
pub fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

/// The UTC day of a Unix-milliseconds time (for reports kept in UTC days,
/// such as `llmq usage`).
pub fn utc_day(unix_ms: u64) -> i64 {
    (unix_ms / DAY_MS) as i64
}

const EPOCH: Date = Date::constant(1970, 1, 1);

fn days_since_epoch(date: Date) -> i64 {
    // A `Date` is at most ±9999 years from the epoch: the span fits.
    EPOCH
        .until((jiff::Unit::Day, date))
        .map(|span| i64::from(span.get_days()))
        .unwrap_or(0)
}

fn date_of_day(day: i64) -> Option<Date> {
    EPOCH
        .checked_add(jiff::Span::new().try_days(day).ok()?)
        .ok()
}

/// A zone by IANA name: the system database first, then the copy compiled
/// into the binary (a minimal container may ship no or a partial
/// `/usr/share/zoneinfo`).
fn lookup_zone(name: &str) -> Option<TimeZone> {
    if name.eq_ignore_ascii_case("UTC") {
        return Some(TimeZone::UTC);
    }
    if let Ok(tz) = jiff::tz::db().get(name) {
        return Some(tz);
    }
    static BUNDLED: OnceLock<TimeZoneDatabase> = OnceLock::new();
    BUNDLED
        .get_or_init(TimeZoneDatabase::bundled)
        .get(name)
        .ok()
}

impl Default for DailyReset {
    fn default() -> Self {
        DailyReset::utc_midnight()
    }
}

impl PartialEq for DailyReset {
    fn eq(&self, other: &Self) -> bool {
        self.minutes == other.minutes && self.zone == other.zone
    }
}

impl Eq for DailyReset {}

impl fmt::Display for DailyReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02} {}",
            self.minutes / 60,
            self.minutes % 60,
            self.zone
        )
    }
}

impl fmt::Debug for DailyReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DailyReset({self})")
    }
}

impl FromStr for DailyReset {
    type Err = DailyResetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DailyReset::parse(s)
    }
}

impl serde::Serialize for DailyReset {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DailyReset {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DailyReset::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_and_day_parsing() {
        use super::*;
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_714_557_600_000), "2024-05-01T10:00:00Z");
        assert_eq!(rfc3339_ms(1_714_557_600_250), "2024-05-01T10:00:00.25Z");
        assert_eq!(rfc3339_ms(u64::MAX), format!("{} ms", u64::MAX));
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && now.len() >= 20, "{now}");
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2024-05-01"), Some(utc_day(1_714_557_600_000)));
        assert_eq!(parse_day("1969-12-31"), Some(-1));
        assert_eq!(parse_day("2024-02-30"), None);
        assert_eq!(parse_day("2024-13-01"), None);
        assert_eq!(parse_day("yesterday"), None);
        for day in [0, 19_844, 47_481] {
            assert_eq!(parse_day(&day_string(day)), Some(day));
        }
    }

    use super::*;

    /// Unix ms of an RFC 3339 instant.
    fn ms(s: &str) -> u64 {
        s.parse::<Timestamp>().unwrap().as_millisecond() as u64
    }

    fn la() -> DailyReset {
        DailyReset::parse("00:00 America/Los_Angeles").unwrap()
    }

    #[test]
    fn utc_midnight_is_the_default_and_plain_arithmetic() {
        let d = DailyReset::default();
        assert_eq!(d.to_string(), "00:00 UTC");
        assert_eq!(d, DailyReset::parse("00:00 UTC").unwrap());
        let t = ms("2024-05-01T13:00:00Z");
        assert_eq!(d.day_of(t), (t / DAY_MS) as i64);
        assert_eq!(day_string(d.day_of(t)), "2024-05-01");
        assert_eq!(d.next_after(t), ms("2024-05-02T00:00:00Z"));
        // Exactly at the reset: the new day has begun; the next is a day on.
        let mid = ms("2024-05-02T00:00:00Z");
        assert_eq!(day_string(d.day_of(mid)), "2024-05-02");
        assert_eq!(d.next_after(mid), ms("2024-05-03T00:00:00Z"));
        assert_eq!(d.day_of(mid - 1), d.day_of(t));
    }

    #[test]
    fn pacific_midnight_is_eight_hours_after_utc_midnight_in_winter() {
        let d = la();
        let before = ms("2024-01-15T07:59:59.999Z");
        let at = ms("2024-01-15T08:00:00Z");
        assert_eq!(day_string(d.day_of(before)), "2024-01-14");
        assert_eq!(day_string(d.day_of(at)), "2024-01-15");
        assert_eq!(d.next_after(before), at);
        assert_eq!(d.next_after(at), ms("2024-01-16T08:00:00Z"));
        // UTC midnight is not a reset in Los Angeles.
        let utc_mid = ms("2024-01-16T00:00:00Z");
        assert_eq!(d.day_of(utc_mid - 1), d.day_of(utc_mid));
    }

    #[test]
    fn dst_days_are_23_and_25_hours_long() {
        let d = la();
        // 2024-03-10: clocks jump 02:00 → 03:00 PST→PDT.
        let (day, start, end) = d.bounds(ms("2024-03-10T12:00:00Z"));
        assert_eq!(day_string(day), "2024-03-10");
        assert_eq!(start, ms("2024-03-10T08:00:00Z"));
        assert_eq!(end, ms("2024-03-11T07:00:00Z"));
        assert_eq!(end - start, 23 * 3_600_000);
        // 2024-11-03: clocks fall back 02:00 → 01:00 PDT→PST.
        let (day, start, end) = d.bounds(ms("2024-11-03T12:00:00Z"));
        assert_eq!(day_string(day), "2024-11-03");
        assert_eq!(start, ms("2024-11-03T07:00:00Z"));
        assert_eq!(end, ms("2024-11-04T08:00:00Z"));
        assert_eq!(end - start, 25 * 3_600_000);
        // Consecutive days have consecutive numbers across the change.
        assert_eq!(d.day_of(end), day + 1);
    }

    #[test]
    fn a_reset_in_a_dst_gap_happens_when_the_clock_jumps_past_it() {
        // 02:30 does not exist in New York on 2024-03-10.
        let d = DailyReset::parse("02:30 America/New_York").unwrap();
        assert_eq!(
            d.next_after(ms("2024-03-10T06:00:00Z")),
            ms("2024-03-10T07:30:00Z"),
            "03:30 EDT"
        );
        // 01:30 happens twice on 2024-11-03: the first one counts.
        let d = DailyReset::parse("01:30 America/New_York").unwrap();
        assert_eq!(
            d.next_after(ms("2024-11-03T04:00:00Z")),
            ms("2024-11-03T05:30:00Z"),
            "01:30 EDT"
        );
    }

    #[test]
    fn next_after_is_always_later_and_day_of_is_monotonic() {
        let d = la();
        let mut t = ms("2024-03-08T00:00:00Z");
        let mut last_day = d.day_of(t);
        while t < ms("2024-03-14T00:00:00Z") {
            let (day, start, end) = d.bounds(t);
            assert!(start <= t && t < end, "{t}");
            assert!(day == last_day || day == last_day + 1);
            last_day = day;
            t += 1_800_000;
        }
    }

    #[test]
    fn bad_strings_say_what_is_wrong() {
        for (bad, says) in [
            ("25:00 UTC", "00:00 to 23:59"),
            ("00:60 UTC", "00:00 to 23:59"),
            ("00:00 Mars/Olympus", "unknown time zone \"Mars/Olympus\""),
            ("midnight UTC", "not a time of day"),
            ("00:00", "separated by one space"),
            ("", "separated by one space"),
            ("0:00 UTC extra", "separated by one space"),
        ] {
            let err = DailyReset::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(err.contains("America/Los_Angeles"), "{bad}: {err}");
        }
        assert_eq!(
            DailyReset::parse("7:05 Europe/Berlin").unwrap().to_string(),
            "07:05 Europe/Berlin"
        );
    }

    #[test]
    fn the_bundled_database_knows_the_zones_we_ship() {
        // What a container without /usr/share/zoneinfo would use.
        let db = TimeZoneDatabase::bundled();
        assert!(db.get("America/Los_Angeles").is_ok());
    }

    #[test]
    fn day_strings_are_calendar_dates() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(utc_day(1_714_521_600_000)), "2024-05-01");
        assert_eq!(day_string(utc_day(951_782_400_000)), "2000-02-29");
        assert_eq!(day_string(utc_day(4_102_444_799_000)), "2099-12-31");
        assert_eq!(day_string(-1), "1969-12-31");
    }

    #[test]
    fn serde_round_trips_through_the_string() {
        let d: DailyReset = serde_json::from_str("\"00:00 America/Los_Angeles\"").unwrap();
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            "\"00:00 America/Los_Angeles\""
        );
        assert!(serde_json::from_str::<DailyReset>("\"24:00 UTC\"").is_err());
    }
}
