//! Dates for the year-only and redact masks: DateStyle, calendar arithmetic, January 1st in
//! text and PostgreSQL's binary forms.

use std::borrow::Cow;

use super::values::*;

/// The output part of PostgreSQL's DateStyle setting (the MDY/DMY order does not matter for
/// January 1st).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DateStyle {
    #[default]
    Iso,
    Sql,
    German,
    Postgres,
}

impl DateStyle {
    /// From a DateStyle value as ParameterStatus reports it ("ISO, MDY", "German, DMY", ...).
    pub fn parse(value: &str) -> Self {
        let first = value.split(',').next().unwrap_or("").trim();
        match first.to_ascii_lowercase().as_str() {
            "sql" => DateStyle::Sql,
            "german" => DateStyle::German,
            "postgres" => DateStyle::Postgres,
            _ => DateStyle::Iso,
        }
    }
}


/// Fixed date for redacted dates and timestamps: valid everywhere and obviously not real.
/// 1900-01-01 as days since PostgreSQL's epoch (2000-01-01); checked against the calendar
/// arithmetic in the tests.
pub(crate) const REDACT_DAYS: i32 = -36_524;
pub(crate) const USECS_PER_DAY: i64 = 86_400_000_000;

/// Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (H. Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn year_from_days(z: i64) -> i64 {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

/// PostgreSQL's epoch for binary dates and timestamps.
pub(crate) const PG_EPOCH_DAYS: i64 = 10_957;

pub(crate) fn pg_days_jan1(year: i64) -> i64 {
    days_from_civil(year, 1, 1) - PG_EPOCH_DAYS
}

/// Text form of January 1st of `year` (astronomical: 0 = 1 BC) in ISO DateStyle.
/// Built by hand, not with `format!`: the year mask of a bulk read runs on every row.
pub(crate) fn iso_jan1(year: i64, ty: Ty) -> String {
    let (y, bc) = if year <= 0 { (1 - year, " BC") } else { (year, "") };
    let time = match ty {
        Ty::Timestamp => " 00:00:00",
        Ty::TimestampTz => " 00:00:00+00",
        _ => "",
    };
    let mut s = String::with_capacity(32);
    push_year(&mut s, y);
    s.push_str("-01-01");
    s.push_str(time);
    s.push_str(bc);
    s
}

/// Appends `y` (positive) as `{y:04}` does: at least four digits, zero-padded.
fn push_year(s: &mut String, y: i64) {
    if (0..10_000).contains(&y) {
        for d in [y / 1000, y / 100 % 10, y / 10 % 10, y % 10] {
            s.push(char::from(b'0' + d as u8));
        }
    } else {
        s.push_str(&y.to_string());
    }
}

/// Text form of January 1st of `year`, midnight, as PostgreSQL prints a date or timestamp in
/// `style` (timestamptz keeps the ISO form with +00: its other forms depend on TimeZone).
pub(crate) fn jan1_text(year: i64, ty: Ty, style: DateStyle) -> String {
    if ty == Ty::TimestampTz || style == DateStyle::Iso {
        return iso_jan1(year, ty);
    }
    let (y, bc) = if year <= 0 { (1 - year, " BC") } else { (year, "") };
    let ts = ty == Ty::Timestamp;
    match style {
        DateStyle::Sql if ts => format!("01/01/{y:04} 00:00:00{bc}"),
        DateStyle::Sql => format!("01/01/{y:04}{bc}"),
        DateStyle::German if ts => format!("01.01.{y:04} 00:00:00{bc}"),
        DateStyle::German => format!("01.01.{y:04}{bc}"),
        DateStyle::Postgres if ts => {
            // "Thu Jan 01 00:00:00 1981": the weekday of January 1st (1970-01-01 was a Thursday).
            const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
            let dow = DAYS[days_from_civil(year, 1, 1).rem_euclid(7) as usize];
            format!("{dow} Jan 01 00:00:00 {y:04}{bc}")
        }
        DateStyle::Postgres => format!("01-01-{y:04}{bc}"),
        DateStyle::Iso => iso_jan1(year, ty),
    }
}

/// The year in a date/timestamp's text form: the first run of 4+ digits is the year in every
/// DateStyle (ISO, SQL, German, Postgres); " BC" marks negative years.
pub(crate) fn text_year(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let j = b[i..].iter().position(|c| !c.is_ascii_digit()).map_or(b.len(), |k| i + k);
            if j - i >= 4 {
                let y: i64 = s[i..j].parse().ok()?;
                return Some(if s.ends_with(" BC") { 1 - y } else { y });
            }
            i = j;
        } else {
            i += 1;
        }
    }
    None
}

pub(crate) fn year_only(ty: Ty, fmt: Format, style: DateStyle, v: &[u8]) -> Result<Cow<'_, [u8]>, ()> {
    let fallback = || placeholder(ty, fmt).ok_or(());
    match fmt {
        Format::Text => {
            let s = utf8_text(v);
            if s.ends_with("infinity") {
                return Ok(Cow::Borrowed(v));
            }
            let Some(y) = text_year(&s) else { return fallback() };
            let t = jan1_text(y, ty, style);
            Ok(if t.as_bytes() == v { Cow::Borrowed(v) } else { Cow::Owned(t.into_bytes()) })
        }
        Format::Binary if ty == Ty::Date => {
            let Ok(b) = <[u8; 4]>::try_from(v) else { return fallback() };
            let d = i32::from_be_bytes(b);
            if d == i32::MAX || d == i32::MIN {
                return Ok(Cow::Borrowed(v));
            }
            let y = year_from_days(i64::from(d) + PG_EPOCH_DAYS);
            Ok(Cow::Owned((pg_days_jan1(y) as i32).to_be_bytes().to_vec()))
        }
        Format::Binary => {
            let Ok(b) = <[u8; 8]>::try_from(v) else { return fallback() };
            let t = i64::from_be_bytes(b);
            if t == i64::MAX || t == i64::MIN {
                return Ok(Cow::Borrowed(v));
            }
            let y = year_from_days(t.div_euclid(USECS_PER_DAY) + PG_EPOCH_DAYS);
            Ok(Cow::Owned((pg_days_jan1(y) * USECS_PER_DAY).to_be_bytes().to_vec()))
        }
    }
}
