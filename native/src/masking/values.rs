//! Mask values: the masks and their config spelling, the gateway's keyed pseudonyms, the column
//! types the masks know, and the functions that mask or scan one value in text or binary format.

use ring::hmac;
use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use crate::masking::detectors::Detectors;
use super::dates::*;
use super::plan::*;


/// How a classified value is shown to an identity that does not see it in clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mask {
    /// A constant of the column's type ("***", 0, 1900-01-01, the nil uuid...).
    Redact,
    /// SQL NULL.
    Null,
    /// Letters and digits except the last N become '*'; punctuation keeps its place
    /// ("123-45-6789" → "***-**-6789"). Values of N characters or fewer are masked whole.
    Partial { keep_last: usize },
    /// Dates and timestamps become January 1st of their year, midnight.
    YearOnly,
    /// "jane@example.org" → "***@example.org".
    EmailDomain,
    /// `psn_` + 16 hex digits of HMAC-SHA256(gateway key, value): stable, so joins still work.
    Pseudonym,
    /// Identifiers found by the content detectors are replaced by tags ("[SSN]").
    FreeText,
    /// A US ZIP keeps its first three digits ("02139-4307" → "021**"); a prefix on the Safe
    /// Harbor list of small areas becomes "000**"; anything not ZIP-shaped becomes "***".
    Zip3,
}

impl FromStr for Mask {
    type Err = String;
    /// Parses the config spelling: redact, null, partial:N, year, email_domain, pseudonym,
    /// free_text, zip3.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "redact" => Mask::Redact,
            "null" => Mask::Null,
            "year" | "year_only" => Mask::YearOnly,
            "email_domain" => Mask::EmailDomain,
            "pseudonym" => Mask::Pseudonym,
            "free_text" => Mask::FreeText,
            "zip3" => Mask::Zip3,
            _ => match s.strip_prefix("partial:").map(|n| n.trim().parse::<usize>()) {
                Some(Ok(keep_last)) if keep_last <= 64 => Mask::Partial { keep_last },
                _ => return Err(format!("unknown mask {s:?} (expected redact, null, partial:N, year, email_domain, pseudonym, free_text or zip3)")),
            },
        })
    }
}

/// A classification rule as the control plane hands it over for one (table OID, attnum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRule {
    /// PHI kind from the config (ssn, mrn, name, dob...), kept for the audit.
    pub kind: Arc<str>,
    pub mask: Mask,
}

/// What the classification says of one (table OID, attnum) for the identity at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Classified with a kind the identity sees masked.
    Masked(ColumnRule),
    /// Classified with a kind the identity sees in clear: passed untouched, never scanned (the
    /// detectors would otherwise tag the very values the role may read).
    Clear,
    /// Not classified.
    No,
}

/// Result format of a column, as in RowDescription and Bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

impl Format {
    pub(crate) fn from_code(c: i16) -> Self {
        if c == 1 {
            Format::Binary
        } else {
            Format::Text
        }
    }
}


/// The gateway-held secrets and detectors the masks use; one per configuration, shared.
pub struct MaskContext {
    key: hmac::Key,
    pub detectors: Arc<Detectors>,
    /// Tells this context's cached pseudonyms from another's (a reload brings a new key).
    id: u64,
    /// Keys the pseudonym cache by a keyed hash of the value, never the value itself: the
    /// cache must not keep clear PHI in memory.
    cache_hasher: std::collections::hash_map::RandomState,
    /// 3-digit ZIP prefixes zip3 shows as "000**" (the control plane's list; none by default).
    zip3_restricted: std::collections::HashSet<[u8; 3]>,
}

/// Pseudonyms remembered per I/O thread (names and MRNs repeat across rows and statements;
/// an HMAC costs ~200 ns, a lookup ~30 ns).
pub(crate) const PSEUDONYM_CACHE_ENTRIES: usize = 16_384;

thread_local! {
    static PSEUDONYMS: std::cell::RefCell<(u64, PseudonymCache)> = std::cell::RefCell::new((0, PseudonymCache::default()));
}

/// Keyed hash of a value → its pseudonym token.
type PseudonymCache = std::collections::HashMap<u64, [u8; 20], std::hash::BuildHasherDefault<KeyIsHash>>;

/// The cache's keys are already keyed hashes of the values (uniform, and unknown to whoever
/// chose the values): the map uses them as they are instead of hashing them a second time.
#[derive(Default)]
struct KeyIsHash(u64);

impl std::hash::Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    /// Not used by u64 keys; folds anything else in rather than ignoring it.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

impl MaskContext {
    /// `pseudonym_key` is the gateway's HMAC key (at least 32 random bytes recommended).
    pub fn new(pseudonym_key: &[u8], detectors: Arc<Detectors>) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        MaskContext {
            key: hmac::Key::new(hmac::HMAC_SHA256, pseudonym_key),
            detectors,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            cache_hasher: std::collections::hash_map::RandomState::new(),
            zip3_restricted: std::collections::HashSet::new(),
        }
    }

    /// The same context with `prefixes` as the Safe Harbor list zip3 uses.
    pub fn with_zip3_restricted(mut self, prefixes: impl IntoIterator<Item = [u8; 3]>) -> Self {
        self.zip3_restricted = prefixes.into_iter().collect();
        self
    }

    /// zip3 of one text value (see `Mask::Zip3`). ASCII whitespace around it is ignored;
    /// "021**" and "000**" are already masked and stay as they are.
    pub(crate) fn zip3(&self, s: &str) -> String {
        let b = s.trim_matches(|c: char| c.is_ascii_whitespace()).as_bytes();
        let digits = |r: &[u8]| r.iter().all(u8::is_ascii_digit);
        let shaped = match b.len() {
            5 => digits(&b[..3]) && (digits(&b[3..]) || &b[3..] == b"**"),
            10 => digits(&b[..5]) && b[5] == b'-' && digits(&b[6..]),
            _ => false,
        };
        if !shaped {
            return REDACTED.to_string();
        }
        let prefix = [b[0], b[1], b[2]];
        if self.zip3_restricted.contains(&prefix) {
            return "000**".to_string();
        }
        let mut out = String::with_capacity(5);
        out.extend(prefix.iter().map(|&d| d as char));
        out.push_str("**");
        out
    }

    /// The pseudonym token of `value`: `psn_` and the first 16 hex digits of its HMAC.
    pub fn pseudonym(&self, value: &[u8]) -> String {
        use std::hash::BuildHasher;
        // A 64-bit keyed hash stands for the value. A collision (about 10^-11 for a full
        // cache) would show one value's pseudonym for another; no clear value either way.
        let h = self.cache_hasher.hash_one(value);
        let cached = PSEUDONYMS.with(|c| {
            let c = c.borrow();
            if c.0 == self.id { c.1.get(&h).copied() } else { None }
        });
        let token = cached.unwrap_or_else(|| {
            let t = self.compute_pseudonym(value);
            PSEUDONYMS.with(|c| {
                let mut c = c.borrow_mut();
                if c.0 != self.id || c.1.len() >= PSEUDONYM_CACHE_ENTRIES {
                    c.1.clear();
                    c.0 = self.id;
                }
                c.1.insert(h, t);
            });
            t
        });
        // Hex digits and the prefix: always ASCII (no lossy decoding, which walks the bytes in
        // chunks, and one allocation of the right size).
        std::str::from_utf8(&token).map_or_else(|_| unreachable!("a pseudonym is ASCII"), str::to_owned)
    }

    pub(crate) fn compute_pseudonym(&self, value: &[u8]) -> [u8; 20] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let tag = hmac::sign(&self.key, value);
        let mut t = [0u8; 20];
        t[..4].copy_from_slice(PSN_PREFIX.as_bytes());
        for (i, &b) in tag.as_ref()[..8].iter().enumerate() {
            t[4 + 2 * i] = HEX[(b >> 4) as usize];
            t[5 + 2 * i] = HEX[(b & 15) as usize];
        }
        t
    }
}

pub(crate) const PSN_PREFIX: &str = "psn_";

pub(crate) fn is_pseudonym(s: &str) -> bool {
    s.len() == 20 && s.starts_with(PSN_PREFIX) && s[4..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The column types the masks know. Everything else is `Other`: redacted as "***" in text
/// format, refused in binary format (no placeholder we could vouch for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Text,
    Char,
    Json,
    Jsonb,
    Bytea,
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Money,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Uuid,
    Inet,
    Cidr,
    Macaddr,
    /// An array type with its element type OID.
    Array(u32),
    Other,
}

impl Ty {
    pub(crate) fn of(oid: u32) -> Ty {
        match oid {
            25 | 1043 | 1042 | 19 | 705 | 142 => Ty::Text, // text, varchar, bpchar, name, unknown, xml
            18 => Ty::Char,
            114 => Ty::Json,
            3802 => Ty::Jsonb,
            17 => Ty::Bytea,
            16 => Ty::Bool,
            21 => Ty::Int2,
            23 | 26 => Ty::Int4, // int4, oid
            20 => Ty::Int8,
            700 => Ty::Float4,
            701 => Ty::Float8,
            1700 => Ty::Numeric,
            790 => Ty::Money,
            1082 => Ty::Date,
            1083 => Ty::Time,
            1266 => Ty::TimeTz,
            1114 => Ty::Timestamp,
            1184 => Ty::TimestampTz,
            1186 => Ty::Interval,
            2950 => Ty::Uuid,
            869 => Ty::Inet,
            650 => Ty::Cidr,
            829 => Ty::Macaddr,
            1009 => Ty::Array(25),
            1015 => Ty::Array(1043),
            1014 => Ty::Array(1042),
            1003 => Ty::Array(19),
            143 => Ty::Array(142),
            199 => Ty::Array(114),
            3807 => Ty::Array(3802),
            1001 => Ty::Array(17),
            1000 => Ty::Array(16),
            1005 => Ty::Array(21),
            1007 => Ty::Array(23),
            1016 => Ty::Array(20),
            1021 => Ty::Array(700),
            1022 => Ty::Array(701),
            1231 => Ty::Array(1700),
            1182 => Ty::Array(1082),
            1115 => Ty::Array(1114),
            1185 => Ty::Array(1184),
            2951 => Ty::Array(2950),
            1028 => Ty::Array(26),
            _ => Ty::Other,
        }
    }

    pub(crate) fn is_texty(self) -> bool {
        matches!(self, Ty::Text | Ty::Char | Ty::Json | Ty::Jsonb)
    }
}

/// Columns worth a detector pass when unclassified: anything that can hold free text.
pub(crate) fn scannable(ty: Ty) -> bool {
    ty.is_texty() || matches!(ty, Ty::Array(_) | Ty::Other)
}

pub(crate) const REDACTED: &str = "***";

/// The redact placeholder of a type in a format, or None when there is none we can vouch for.
pub(crate) fn placeholder(ty: Ty, fmt: Format) -> Option<Cow<'static, [u8]>> {
    use Format::{Binary as B, Text as T};
    let s: &'static [u8] = match (ty, fmt) {
        (Ty::Text, _) => REDACTED.as_bytes(),
        (Ty::Char, _) => b"*",
        (Ty::Json, _) | (Ty::Jsonb, T) => b"\"***\"",
        (Ty::Jsonb, B) => b"\x01\"***\"",
        (Ty::Bytea, T) => b"\\x",
        (Ty::Bytea, B) => b"",
        (Ty::Bool, T) => b"f",
        (Ty::Bool, B) => b"\0",
        (Ty::Int2 | Ty::Int4 | Ty::Int8 | Ty::Float4 | Ty::Float8 | Ty::Numeric, T) => b"0",
        (Ty::Money, T) => b"0.00",
        (Ty::Int2, B) => &[0; 2],
        (Ty::Int4 | Ty::Float4, B) => &[0; 4],
        (Ty::Int8 | Ty::Float8 | Ty::Money | Ty::Time, B) => &[0; 8],
        // numeric: ndigits 0, weight 0, sign positive, dscale 0.
        (Ty::Numeric, B) => &[0; 8],
        (Ty::Date, T) => b"1900-01-01",
        (Ty::Timestamp, T) => b"1900-01-01 00:00:00",
        (Ty::TimestampTz, T) => b"1900-01-01 00:00:00+00",
        (Ty::Date, B) => const { &REDACT_DAYS.to_be_bytes() },
        (Ty::Timestamp | Ty::TimestampTz, B) => const { &(REDACT_DAYS as i64 * USECS_PER_DAY).to_be_bytes() },
        (Ty::Time | Ty::Interval, T) => b"00:00:00",
        (Ty::TimeTz, T) => b"00:00:00+00",
        (Ty::TimeTz, B) => &[0; 12],
        (Ty::Interval, B) => &[0; 16],
        (Ty::Uuid, T) => b"00000000-0000-0000-0000-000000000000",
        (Ty::Uuid, B) => &[0; 16],
        (Ty::Inet, T) => b"0.0.0.0",
        (Ty::Cidr, T) => b"0.0.0.0/0",
        // family AF_INET (PGSQL_AF_INET = 2), bits, is_cidr, address length 4, address.
        (Ty::Inet, B) => &[2, 32, 0, 4, 0, 0, 0, 0],
        (Ty::Cidr, B) => &[2, 0, 1, 4, 0, 0, 0, 0],
        (Ty::Macaddr, T) => b"00:00:00:00:00:00",
        (Ty::Macaddr, B) => &[0; 6],
        (Ty::Array(_), T) => b"{}",
        (Ty::Array(elem), B) => {
            // Zero dimensions, no nulls, element type.
            let mut v = vec![0u8; 8];
            v.extend_from_slice(&elem.to_be_bytes());
            return Some(Cow::Owned(v));
        }
        (Ty::Other, T) => REDACTED.as_bytes(),
        (Ty::Other, B) => return None,
    };
    Some(Cow::Borrowed(s))
}

/// Masks one non-NULL value. `Ok(None)` is NULL; `Err(())` means no valid value exists.
pub(crate) fn mask_value<'v>(
    ctx: &MaskContext,
    style: DateStyle,
    action: &Action,
    ty: Ty,
    fmt: Format,
    v: &'v [u8],
    scratch: &mut Vec<u8>,
) -> Result<Option<Cow<'v, [u8]>>, ()> {
    let mask = match action {
        Action::Pass => return Ok(Some(Cow::Borrowed(v))),
        Action::Scan => return scan_value(ctx, ty, fmt, v),
        Action::Mask { mask, .. } => *mask,
    };
    scratch.clear();
    let redact = || placeholder(ty, fmt).map(Some).ok_or(());
    match mask {
        Mask::Null => Ok(None),
        Mask::Redact => redact(),
        Mask::YearOnly if matches!(ty, Ty::Date | Ty::Timestamp | Ty::TimestampTz) => year_only(ty, fmt, style, v).map(Some),
        Mask::Partial { .. } | Mask::YearOnly | Mask::EmailDomain | Mask::Pseudonym | Mask::FreeText | Mask::Zip3
            if ty.is_texty() =>
        {
            let Some(payload) = text_payload(ty, fmt, v) else { return redact() };
            let s = utf8_text(payload);
            let masked: Cow<str> = if matches!(ty, Ty::Json | Ty::Jsonb) {
                match json_mask(ctx, mask, &s) {
                    Some(m) => m,
                    None => return redact(),
                }
            } else {
                text_mask(ctx, mask, &s)
            };
            if *masked == *s && s.as_bytes() == payload {
                return Ok(Some(Cow::Borrowed(v)));
            }
            Ok(Some(Cow::Owned(wrap_text(ty, fmt, masked))))
        }
        // Masks with no meaning for the type (a pseudonym of an integer, partial of a date):
        // the redact placeholder, which is constant and so idempotent.
        _ => redact(),
    }
}

/// The text inside a text-like value: jsonb's binary form has a version byte before the text.
pub(crate) fn text_payload(ty: Ty, fmt: Format, v: &[u8]) -> Option<&[u8]> {
    match (ty, fmt) {
        (Ty::Jsonb, Format::Binary) => match v.split_first() {
            Some((1, rest)) => Some(rest),
            _ => None,
        },
        _ => Some(v),
    }
}

/// The value of masked text `s` for the column: most types take the text as it is (a masked
/// String becomes the value without a copy).
pub(crate) fn wrap_text(ty: Ty, fmt: Format, s: Cow<'_, str>) -> Vec<u8> {
    if ty == Ty::Char {
        // "char" is one byte.
        return vec![s.as_bytes().first().copied().unwrap_or(b'*')];
    }
    if ty == Ty::Jsonb && fmt == Format::Binary {
        let mut out = Vec::with_capacity(s.len() + 1);
        out.push(1);
        out.extend_from_slice(s.as_bytes());
        return out;
    }
    s.into_owned().into_bytes()
}

pub(crate) fn text_mask<'a>(ctx: &MaskContext, mask: Mask, s: &'a str) -> Cow<'a, str> {
    match mask {
        Mask::Partial { keep_last } if s.is_ascii() => partial_ascii(s, keep_last),
        Mask::Partial { keep_last } => partial_chars(s, keep_last),
        Mask::EmailDomain => match s.rfind('@') {
            Some(at) if &s[..at] == REDACTED => Cow::Borrowed(s),
            Some(at) => Cow::Owned(format!("{REDACTED}{}", &s[at..])),
            None if s == REDACTED => Cow::Borrowed(s),
            None => Cow::Borrowed(REDACTED),
        },
        Mask::YearOnly => match text_year(s) {
            Some(y) => {
                let t = iso_jan1(y, Ty::Date);
                if t == s {
                    Cow::Borrowed(s)
                } else {
                    Cow::Owned(t)
                }
            }
            None if s == REDACTED => Cow::Borrowed(s),
            None => Cow::Borrowed(REDACTED),
        },
        Mask::Pseudonym if is_pseudonym(s) => Cow::Borrowed(s),
        Mask::Pseudonym => Cow::Owned(ctx.pseudonym(s.as_bytes())),
        Mask::FreeText => ctx.detectors.scrub(s),
        Mask::Zip3 => {
            let z = ctx.zip3(s);
            if z == s {
                Cow::Borrowed(s)
            } else {
                Cow::Owned(z)
            }
        }
        Mask::Redact | Mask::Null => Cow::Borrowed(REDACTED),
    }
}

/// `Mask::Partial`: letters and digits before the last `keep_last` chars become '*' (all of
/// them when the text is that short); borrowed when that changes nothing.
pub(crate) fn partial_chars(s: &str, keep_last: usize) -> Cow<'_, str> {
    let n = s.chars().count();
    let keep = if n > keep_last { keep_last } else { 0 };
    let cut = n - keep;
    let out: String = s.chars().enumerate().map(|(i, c)| if i < cut && c.is_alphanumeric() { '*' } else { c }).collect();
    if out == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(out)
    }
}

/// `Mask::Partial` of ASCII text, byte by byte (a char is a byte): borrowed when no letter or
/// digit is before the kept tail (already masked).
pub(crate) fn partial_ascii(s: &str, keep_last: usize) -> Cow<'_, str> {
    let n = s.len();
    let cut = if n > keep_last { n - keep_last } else { n };
    if !s.as_bytes()[..cut].iter().any(u8::is_ascii_alphanumeric) {
        return Cow::Borrowed(s);
    }
    let masked = s.bytes().enumerate().map(|(i, c)| if i < cut && c.is_ascii_alphanumeric() { '*' } else { char::from(c) });
    Cow::Owned(masked.collect())
}

/// Masks a JSON document: a JSON string is masked as text and re-encoded; other documents get
/// a pseudonym of their text, a detector pass (kept only if still valid JSON), or None (redact).
pub(crate) fn json_mask<'a>(ctx: &MaskContext, mask: Mask, s: &'a str) -> Option<Cow<'a, str>> {
    if mask == Mask::FreeText {
        let scrubbed = ctx.detectors.scrub(s);
        return match scrubbed {
            Cow::Borrowed(_) => Some(scrubbed),
            Cow::Owned(t) => serde_json::from_str::<serde::de::IgnoredAny>(&t).is_ok().then_some(Cow::Owned(t)),
        };
    }
    if let Ok(serde_json::Value::String(inner)) = serde_json::from_str::<serde_json::Value>(s) {
        let m = text_mask(ctx, mask, &inner);
        if *m == *inner {
            return Some(Cow::Borrowed(s));
        }
        return serde_json::to_string(&*m).ok().map(Cow::Owned);
    }
    match mask {
        Mask::Pseudonym => serde_json::to_string(&ctx.pseudonym(s.as_bytes())).ok().map(Cow::Owned),
        _ => None,
    }
}


/// Detector pass over an unclassified value: unchanged when nothing is found; text-like types
/// get their hits tagged (JSON only while it stays valid); other types with a hit are redacted.
/// Binary values of unknown types are not scanned: their bytes are not text, and a chance
/// match would refuse the whole row for nothing.
/// `b` as text: borrowed when it is valid UTF-8 (PostgreSQL sends UTF-8; std's validation has
/// an ASCII word-at-a-time fast path `String::from_utf8_lossy`'s chunk iterator lacks), else with
/// U+FFFD for invalid sequences.
pub(crate) fn utf8_text(b: &[u8]) -> Cow<'_, str> {
    if b.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8. Notes are mostly ASCII, and this check reads
        // 1 KB in a third of the instructions of the full validation.
        return Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(b) });
    }
    match std::str::from_utf8(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

pub(crate) fn scan_value<'v>(ctx: &MaskContext, ty: Ty, fmt: Format, v: &'v [u8]) -> Result<Option<Cow<'v, [u8]>>, ()> {
    if ty == Ty::Other && fmt == Format::Binary {
        return Ok(Some(Cow::Borrowed(v)));
    }
    let Some(payload) = text_payload(ty, fmt, v) else { return Ok(Some(Cow::Borrowed(v))) };
    // The common case -- nothing identifier-shaped -- is decided on the raw bytes.
    if !ctx.detectors.may_hit(payload) {
        return Ok(Some(Cow::Borrowed(v)));
    }
    let s = utf8_text(payload);
    let hits = ctx.detectors.hits(&s);
    if hits.is_empty() {
        return Ok(Some(Cow::Borrowed(v)));
    }
    let scrubbed = Detectors::replace(&s, &hits);
    let ok = match ty {
        Ty::Text => true,
        Ty::Json | Ty::Jsonb => serde_json::from_str::<serde::de::IgnoredAny>(&scrubbed).is_ok(),
        _ => false,
    };
    if ok {
        return Ok(Some(Cow::Owned(wrap_text(ty, fmt, scrubbed))));
    }
    placeholder(ty, fmt).map(Some).ok_or(())
}
