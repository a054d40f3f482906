//! Record timestamps: RFC 3339 UTC with microseconds ("2026-12-06T15:35:34.123456Z"), formatted
//! and parsed without a date library (civil-from-days, Howard Hinnant's algorithm).

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

pub fn now_ts() -> String {
    format_us(now_us())
}

pub fn format_us(us: i64) -> String {
    let mut out = Vec::with_capacity(27);
    write_us(&mut out, us);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the timestamp of `us` (microseconds since the epoch) to `out`, without quotes: the
/// hot path of every statement and result record, so no String in between.
pub fn write_us(out: &mut Vec<u8>, us: i64) {
    use std::io::Write as _;
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let _ = write!(out, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod / 60 % 60, sod % 60);
}

/// Microseconds since the epoch of a timestamp in exactly the form `format_us` writes.
pub fn parse_us(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    if b.len() != 27 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'.' || b[26] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| ts.get(r).and_then(|s| s.parse::<i64>().ok());
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    let secs = days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?;
    Some(secs * 1_000_000 + n(20..26)?)
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(format_us(0), "1970-01-01T00:00:00.000000Z");
        // 2026-12-06T15:35:34.123456Z
        let us = 1_796_571_334_123_456;
        assert_eq!(format_us(us), "2026-12-06T15:35:34.123456Z");
        assert_eq!(parse_us("2026-12-06T15:35:34.123456Z"), Some(us));
        assert_eq!(format_us(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        for us in [0, 1, 86_399_999_999, 4_102_444_800_000_000, now_us()] {
            assert_eq!(parse_us(&format_us(us)), Some(us));
        }
        assert_eq!(parse_us("2026-12-06 15:35:34Z"), None);
    }
}
