//! Layer 2 of PHI masking: per-statement mask plans built from RowDescription, and the mask
//! functions that rewrite DataRow and CopyData values that reach a masked identity in clear.
//!
//! Invariants, each tested below: the column count never changes, NULL stays NULL, every masked
//! value is valid for its column's type in the column's format (text or binary) — a mask that
//! cannot apply to a type falls back to that type's redact placeholder — and masking is
//! idempotent, so a value the rewrite (layer 1) already masked passes through unchanged.

use bytes::{BufMut, BytesMut};
use ring::hmac;
use std::borrow::Cow;
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;

use crate::masking::detectors::Detectors;
use crate::errors::{sqlstate, GateError};
use crate::protocol::framing::{read_cstr, read_i16, read_i32};
use crate::protocol::messages::put_message;

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
}

impl FromStr for Mask {
    type Err = String;
    /// Parses the config spelling: redact, null, partial:N, year, email_domain, pseudonym, free_text.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "redact" => Mask::Redact,
            "null" => Mask::Null,
            "year" | "year_only" => Mask::YearOnly,
            "email_domain" => Mask::EmailDomain,
            "pseudonym" => Mask::Pseudonym,
            "free_text" => Mask::FreeText,
            _ => match s.strip_prefix("partial:").map(|n| n.trim().parse::<usize>()) {
                Some(Ok(keep_last)) if keep_last <= 64 => Mask::Partial { keep_last },
                _ => return Err(format!("unknown mask {s:?} (expected redact, null, partial:N, year, email_domain, pseudonym or free_text)")),
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
    fn from_code(c: i16) -> Self {
        if c == 1 {
            Format::Binary
        } else {
            Format::Text
        }
    }
}

/// What happens to one output column's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forwarded unchanged.
    Pass,
    /// Masked; `why` says which rule made the column protected.
    Mask { mask: Mask, why: Why },
    /// Not classified, but text-like: the content detectors run over it (notes carry PHI).
    Scan,
}

/// Why a column is protected, for the audit record and for debugging a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The (table OID, attnum) is classified with this kind.
    Classified(Arc<str>),
    /// No origin (an expression, cast, aggregate, set operation) in a protected statement.
    NoOrigin,
    /// Attnum 0 (or negative with no table): a whole-row value in a protected statement.
    WholeRow,
    /// The origin is a protected view or partition whose columns the classification cannot map.
    ProtectedRelation,
}

/// One output column of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnPlan {
    pub type_oid: u32,
    pub format: Format,
    pub action: Action,
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
}

/// Pseudonyms remembered per I/O thread (names and MRNs repeat across rows and statements;
/// an HMAC costs ~200 ns, a lookup ~30 ns).
const PSEUDONYM_CACHE_ENTRIES: usize = 16_384;

thread_local! {
    static PSEUDONYMS: std::cell::RefCell<(u64, std::collections::HashMap<u64, [u8; 20]>)> =
        std::cell::RefCell::new((0, std::collections::HashMap::new()));
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
        }
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
        // Hex digits and the prefix: always ASCII.
        String::from_utf8_lossy(&token).into_owned()
    }

    fn compute_pseudonym(&self, value: &[u8]) -> [u8; 20] {
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

const PSN_PREFIX: &str = "psn_";

fn is_pseudonym(s: &str) -> bool {
    s.len() == 20 && s.starts_with(PSN_PREFIX) && s[4..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why a row could not be masked; the caller answers with an ErrorResponse (and, for malformed
/// upstream messages, ends the session), never with the clear row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskError {
    /// The message does not parse, or its column count differs from the plan's.
    Malformed(&'static str),
    /// A protected column of a type the gateway has no valid binary placeholder for.
    UnsupportedBinaryType { column: usize, type_oid: u32 },
    /// COPY data in a format the gateway cannot mask (binary COPY).
    UnsupportedCopyFormat,
}

impl std::fmt::Display for MaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaskError::Malformed(what) => write!(f, "malformed row from the server: {what}"),
            MaskError::UnsupportedBinaryType { column, type_oid } => write!(
                f,
                "column {} (type OID {type_oid}) is protected and cannot be masked in binary format",
                column + 1
            ),
            MaskError::UnsupportedCopyFormat => write!(f, "only text-format COPY can be masked"),
        }
    }
}

impl MaskError {
    /// The error the client gets instead of the row. Malformed upstream data ends the session
    /// (rows can no longer be told apart); an unmaskable binary value fails the statement.
    pub fn to_gate_error(&self) -> GateError {
        match self {
            MaskError::Malformed(_) => GateError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
            _ => GateError::error(sqlstate::FEATURE_NOT_SUPPORTED, self.to_string())
                .with_hint("Request this column in text format."),
        }
    }
}

/// Per-statement (or per-portal) mask plan: one entry per output column.
#[derive(Clone)]
pub struct MaskPlan {
    pub columns: Vec<ColumnPlan>,
    ctx: Arc<MaskContext>,
    /// The session's DateStyle when the plan was made: year masks of dates and timestamps in
    /// text keep the style the client parses every other date in.
    pub date_style: DateStyle,
}

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

/// Treatment of columns protected by their origin rather than by a classification rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginFallback {
    /// Mask them (default: redact). For statements the rewrite did not mask at the source.
    Mask(Mask),
    /// Run the detectors over text-like ones and pass the rest. For statements the rewrite
    /// (layer 1) masked at the source: their computed columns — `count(*)`, the rewrite's own
    /// `'***' || right(ssn, 4)` — derive only from masked values, and redacting them would
    /// break ordinary queries and undo the rewrite's masks.
    Scan,
}

impl Default for OriginFallback {
    fn default() -> Self {
        OriginFallback::Mask(Mask::Redact)
    }
}

/// Options for building a plan from a RowDescription.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions<'a> {
    /// The statement references a protected relation (decided by the control plane).
    pub touches_protected: bool,
    /// Views, materialized views and partitions whose columns cannot be mapped to rules: any
    /// column originating there is protected in a protected statement.
    pub protected_oids: Option<&'a HashSet<u32>>,
    /// What happens to columns protected by origin (no origin, whole row, protected view or
    /// partition) rather than by a rule.
    pub origin_fallback: OriginFallback,
    /// Run the content detectors over unclassified text-like columns.
    pub scan_text: bool,
}

impl MaskPlan {
    /// A plan from explicit columns (COPY, whose CopyOutResponse has no origins).
    pub fn from_columns(columns: Vec<ColumnPlan>, ctx: Arc<MaskContext>) -> Self {
        MaskPlan { columns, ctx, date_style: DateStyle::Iso }
    }

    /// A plan for a text COPY whose columns' origins and types the control plane supplied
    /// (CopyOutResponse carries neither): classified columns masked, kinds seen in clear
    /// passed, other text-like columns scanned.
    pub fn for_copy(cols: impl Iterator<Item = (Classified, u32)>, ctx: Arc<MaskContext>) -> Self {
        let columns = cols
            .map(|(class, type_oid)| {
                let action = match class {
                    Classified::Masked(r) => Action::Mask { mask: r.mask, why: Why::Classified(r.kind) },
                    Classified::Clear => Action::Pass,
                    Classified::No if scannable(Ty::of(type_oid)) => Action::Scan,
                    Classified::No => Action::Pass,
                };
                ColumnPlan { type_oid, format: Format::Text, action }
            })
            .collect();
        MaskPlan { columns, ctx, date_style: DateStyle::Iso }
    }

    /// Builds the plan from a RowDescription body and the classification lookup.
    pub fn from_row_description(
        body: &[u8],
        lookup: impl Fn(u32, i16) -> Classified,
        opts: &PlanOptions<'_>,
        ctx: Arc<MaskContext>,
    ) -> Result<Self, MaskError> {
        let bad = MaskError::Malformed("RowDescription");
        let mut pos = 0;
        let n = read_i16(body, &mut pos).ok_or(bad.clone())?;
        if n < 0 {
            return Err(bad);
        }
        let mut columns = Vec::with_capacity(n as usize);
        for _ in 0..n {
            read_cstr(body, &mut pos).ok_or(bad.clone())?;
            let table = read_i32(body, &mut pos).ok_or(bad.clone())? as u32;
            let attnum = read_i16(body, &mut pos).ok_or(bad.clone())?;
            let type_oid = read_i32(body, &mut pos).ok_or(bad.clone())? as u32;
            read_i16(body, &mut pos).ok_or(bad.clone())?; // typlen
            read_i32(body, &mut pos).ok_or(bad.clone())?; // typmod
            let format = Format::from_code(read_i16(body, &mut pos).ok_or(bad.clone())?);
            let class = if table != 0 && attnum > 0 { lookup(table, attnum) } else { Classified::No };
            let by_origin = if !opts.touches_protected {
                None
            } else if table == 0 {
                Some(Why::NoOrigin)
            } else if attnum == 0 {
                Some(Why::WholeRow)
            } else if opts.protected_oids.is_some_and(|s| s.contains(&table)) {
                Some(Why::ProtectedRelation)
            } else {
                None
            };
            let scan = scannable(Ty::of(type_oid));
            let action = match (class, by_origin, opts.origin_fallback) {
                (Classified::Masked(r), _, _) => Action::Mask { mask: r.mask, why: Why::Classified(r.kind) },
                (Classified::Clear, _, _) => Action::Pass,
                (Classified::No, Some(why), OriginFallback::Mask(mask)) => Action::Mask { mask, why },
                (Classified::No, Some(_), OriginFallback::Scan) if scan => Action::Scan,
                _ if opts.scan_text && scan => Action::Scan,
                _ => Action::Pass,
            };
            columns.push(ColumnPlan { type_oid, format, action });
        }
        if pos != body.len() {
            return Err(bad);
        }
        Ok(MaskPlan { columns, ctx, date_style: DateStyle::Iso })
    }

    /// Applies Bind's result-format codes (none: all text; one: all columns; else one each).
    /// RowDescription answering Describe of a statement reports 0 for every column; the real
    /// formats are only known at Bind, and a wrong format would produce an invalid value.
    pub fn set_result_formats(&mut self, codes: &[i16]) -> Result<(), MaskError> {
        match codes.len() {
            0 => self.columns.iter_mut().for_each(|c| c.format = Format::Text),
            1 => self.columns.iter_mut().for_each(|c| c.format = Format::from_code(codes[0])),
            n if n == self.columns.len() => {
                for (c, &f) in self.columns.iter_mut().zip(codes) {
                    c.format = Format::from_code(f);
                }
            }
            _ => return Err(MaskError::Malformed("Bind result formats do not match the columns")),
        }
        Ok(())
    }

    /// True if some column is masked or scanned; otherwise rows can be forwarded untouched.
    pub fn is_active(&self) -> bool {
        self.columns.iter().any(|c| c.action != Action::Pass)
    }
}

/// Appends to `out` the DataRow (B) message — tag, length and body — for the DataRow `body`
/// with every protected value masked. On error nothing usable is in `out` past its old length.
pub fn mask_data_row(plan: &MaskPlan, body: &[u8], out: &mut BytesMut) -> Result<(), MaskError> {
    let bad = MaskError::Malformed("DataRow");
    let mut pos = 0;
    let n = read_i16(body, &mut pos).ok_or(bad.clone())?;
    if n < 0 || n as usize != plan.columns.len() {
        return Err(MaskError::Malformed("DataRow column count differs from RowDescription"));
    }
    let start = out.len();
    out.reserve(body.len() + 5 + 16 * plan.columns.len());
    out.put_u8(b'D');
    out.put_u32(0);
    out.put_i16(n);
    let mut scratch = Vec::new();
    for (i, col) in plan.columns.iter().enumerate() {
        let len = match read_i32(body, &mut pos) {
            Some(l) => l,
            None => {
                out.truncate(start);
                return Err(bad);
            }
        };
        let value = if len < 0 {
            None
        } else {
            match body.get(pos..pos + len as usize) {
                Some(v) => {
                    pos += len as usize;
                    Some(v)
                }
                None => {
                    out.truncate(start);
                    return Err(bad);
                }
            }
        };
        let masked = match (&col.action, value) {
            (Action::Pass, v) | (_, v @ None) => Ok(v.map(Cow::Borrowed)),
            (action, Some(v)) => mask_value(&plan.ctx, plan.date_style, action, Ty::of(col.type_oid), col.format, v, &mut scratch)
                .map_err(|()| MaskError::UnsupportedBinaryType { column: i, type_oid: col.type_oid }),
        };
        match masked {
            Ok(None) => out.put_i32(-1),
            Ok(Some(v)) => {
                out.put_i32(v.len() as i32);
                out.put_slice(&v);
            }
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
    if pos != body.len() {
        out.truncate(start);
        return Err(bad);
    }
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Appends the CopyData (B) message — tag, length, payload — for a text-format COPY payload
/// (one or more lines, fields split by `delimiter`, `\N` for NULL, backslash escapes) with the
/// plan applied by column position. Values are masked as text whatever the plan's formats.
pub fn mask_copy_data(plan: &MaskPlan, data: &[u8], delimiter: u8, out: &mut BytesMut) -> Result<(), MaskError> {
    if delimiter == b'\\' || delimiter == b'\n' || delimiter == b'\r' {
        return Err(MaskError::UnsupportedCopyFormat);
    }
    let start = out.len();
    let mut res = Ok(());
    put_message(out, b'd', |o| res = copy_lines(plan, data, delimiter, o));
    if res.is_err() {
        out.truncate(start);
    }
    res
}

/// Column count of a CopyOutResponse (B) body whose data can be masked: text format only (the
/// overall format byte 0). Binary COPY is refused; CSV cannot be told from text here, so the
/// caller must know from the statement that it is not CSV (the rewrite emits text format).
pub fn copy_out_columns(body: &[u8]) -> Result<usize, MaskError> {
    let mut pos = 1;
    match body.first() {
        Some(0) => {}
        Some(_) => return Err(MaskError::UnsupportedCopyFormat),
        None => return Err(MaskError::Malformed("CopyOutResponse")),
    }
    let n = read_i16(body, &mut pos).filter(|n| *n >= 0).ok_or(MaskError::Malformed("CopyOutResponse"))?;
    if body.len() != pos + 2 * n as usize {
        return Err(MaskError::Malformed("CopyOutResponse"));
    }
    Ok(n as usize)
}

fn copy_lines(plan: &MaskPlan, data: &[u8], delim: u8, out: &mut BytesMut) -> Result<(), MaskError> {
    let mut scratch = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (line, had_nl) = match memchr::memchr(b'\n', rest) {
            Some(i) => {
                let l = &rest[..i];
                rest = &rest[i + 1..];
                (l, true)
            }
            None => {
                let l = rest;
                rest = &[];
                (l, false)
            }
        };
        // "\." alone ends the data in old clients' streams; keep it as it is.
        if line == b"\\." {
            out.put_slice(line);
        } else {
            let fields = split_copy_fields(line, delim);
            if fields.len() != plan.columns.len() {
                return Err(MaskError::Malformed("COPY row column count differs from the plan"));
            }
            for (i, (field, col)) in fields.iter().zip(&plan.columns).enumerate() {
                if i > 0 {
                    out.put_u8(delim);
                }
                // A field to scan with nothing identifier-shaped in it stays as it is, still
                // escaped: COPY's escapes (a backslash and one of b f n r t v, the delimiter or
                // a backslash) add no digit, '@' or keyword, so the raw bytes decide safely.
                let unchanged = match col.action {
                    Action::Pass => true,
                    Action::Scan => !plan.ctx.detectors.may_hit(field),
                    Action::Mask { .. } => false,
                };
                if unchanged || *field == b"\\N" {
                    out.put_slice(field);
                    continue;
                }
                let clear = copy_unescape(field);
                match mask_value(&plan.ctx, plan.date_style, &col.action, Ty::of(col.type_oid), Format::Text, &clear, &mut scratch) {
                    Ok(None) => out.put_slice(b"\\N"),
                    Ok(Some(v)) => copy_escape(&v, delim, out),
                    Err(()) => return Err(MaskError::UnsupportedBinaryType { column: i, type_oid: col.type_oid }),
                }
            }
        }
        if had_nl {
            out.put_u8(b'\n');
        }
    }
    Ok(())
}

/// Splits on unescaped delimiters (COPY writes a delimiter inside a value as backslash + it).
fn split_copy_fields(line: &[u8], delim: u8) -> Vec<&[u8]> {
    let mut fields = Vec::with_capacity(16);
    let (mut i, mut from) = (0, 0);
    // Jump between delimiters and backslashes (SIMD search): a 1 KB note is one or two jumps.
    while let Some(k) = memchr::memchr2(delim, b'\\', &line[i..]) {
        let at = i + k;
        if line[at] == b'\\' {
            i = (at + 2).min(line.len());
            continue;
        }
        fields.push(&line[from..at]);
        from = at + 1;
        i = at + 1;
    }
    fields.push(&line[from.min(line.len())..]);
    fields
}

fn copy_unescape(f: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        let b = f[i];
        if b != b'\\' || i + 1 >= f.len() {
            v.push(b);
            i += 1;
            continue;
        }
        let c = f[i + 1];
        i += 2;
        match c {
            b'b' => v.push(8),
            b'f' => v.push(12),
            b'n' => v.push(b'\n'),
            b'r' => v.push(b'\r'),
            b't' => v.push(b'\t'),
            b'v' => v.push(11),
            b'0'..=b'7' => {
                let mut n = (c - b'0') as u32;
                let mut k = 0;
                while k < 2 && i < f.len() && (b'0'..=b'7').contains(&f[i]) {
                    n = n * 8 + (f[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                v.push(n as u8);
            }
            b'x' if i < f.len() && f[i].is_ascii_hexdigit() => {
                let mut n = 0u32;
                let mut k = 0;
                while k < 2 && i < f.len() && f[i].is_ascii_hexdigit() {
                    n = n * 16 + (f[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                v.push(n as u8);
            }
            other => v.push(other),
        }
    }
    v
}

fn copy_escape(v: &[u8], delim: u8, out: &mut BytesMut) {
    for &b in v {
        match b {
            b'\\' => out.put_slice(b"\\\\"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            b'\t' if delim == b'\t' => out.put_slice(b"\\t"),
            8 => out.put_slice(b"\\b"),
            12 => out.put_slice(b"\\f"),
            11 => out.put_slice(b"\\v"),
            d if d == delim => {
                out.put_u8(b'\\');
                out.put_u8(d);
            }
            _ => out.put_u8(b),
        }
    }
}

/// The column types the masks know. Everything else is `Other`: redacted as "***" in text
/// format, refused in binary format (no placeholder we could vouch for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
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
    fn of(oid: u32) -> Ty {
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

    fn is_texty(self) -> bool {
        matches!(self, Ty::Text | Ty::Char | Ty::Json | Ty::Jsonb)
    }
}

/// Columns worth a detector pass when unclassified: anything that can hold free text.
fn scannable(ty: Ty) -> bool {
    ty.is_texty() || matches!(ty, Ty::Array(_) | Ty::Other)
}

const REDACTED: &str = "***";
/// Fixed date for redacted dates and timestamps: valid everywhere and obviously not real.
/// 1900-01-01 as days since PostgreSQL's epoch (2000-01-01); checked against the calendar
/// arithmetic in the tests.
const REDACT_DAYS: i32 = -36_524;
const USECS_PER_DAY: i64 = 86_400_000_000;

/// Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn year_from_days(z: i64) -> i64 {
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
const PG_EPOCH_DAYS: i64 = 10_957;

fn pg_days_jan1(year: i64) -> i64 {
    days_from_civil(year, 1, 1) - PG_EPOCH_DAYS
}

/// Text form of January 1st of `year` (astronomical: 0 = 1 BC) in ISO DateStyle.
fn iso_jan1(year: i64, ty: Ty) -> String {
    let (y, bc) = if year <= 0 { (1 - year, " BC") } else { (year, "") };
    match ty {
        Ty::Timestamp => format!("{y:04}-01-01 00:00:00{bc}"),
        Ty::TimestampTz => format!("{y:04}-01-01 00:00:00+00{bc}"),
        _ => format!("{y:04}-01-01{bc}"),
    }
}

/// Text form of January 1st of `year`, midnight, as PostgreSQL prints a date or timestamp in
/// `style` (timestamptz keeps the ISO form with +00: its other forms depend on TimeZone).
fn jan1_text(year: i64, ty: Ty, style: DateStyle) -> String {
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
fn text_year(s: &str) -> Option<i64> {
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

/// The redact placeholder of a type in a format, or None when there is none we can vouch for.
fn placeholder(ty: Ty, fmt: Format) -> Option<Cow<'static, [u8]>> {
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
fn mask_value<'v>(
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
        Mask::Partial { .. } | Mask::YearOnly | Mask::EmailDomain | Mask::Pseudonym | Mask::FreeText if ty.is_texty() => {
            let Some(payload) = text_payload(ty, fmt, v) else { return redact() };
            let s = String::from_utf8_lossy(payload);
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
            Ok(Some(Cow::Owned(wrap_text(ty, fmt, masked.as_bytes()))))
        }
        // Masks with no meaning for the type (a pseudonym of an integer, partial of a date):
        // the redact placeholder, which is constant and so idempotent.
        _ => redact(),
    }
}

/// The text inside a text-like value: jsonb's binary form has a version byte before the text.
fn text_payload(ty: Ty, fmt: Format, v: &[u8]) -> Option<&[u8]> {
    match (ty, fmt) {
        (Ty::Jsonb, Format::Binary) => match v.split_first() {
            Some((1, rest)) => Some(rest),
            _ => None,
        },
        _ => Some(v),
    }
}

fn wrap_text(ty: Ty, fmt: Format, s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 1);
    if ty == Ty::Jsonb && fmt == Format::Binary {
        out.push(1);
    }
    if ty == Ty::Char {
        // "char" is one byte.
        out.push(s.first().copied().unwrap_or(b'*'));
    } else {
        out.extend_from_slice(s);
    }
    out
}

fn text_mask<'a>(ctx: &MaskContext, mask: Mask, s: &'a str) -> Cow<'a, str> {
    match mask {
        Mask::Partial { keep_last } => {
            let n = s.chars().count();
            let keep = if n > keep_last { keep_last } else { 0 };
            let cut = n - keep;
            let out: String =
                s.chars().enumerate().map(|(i, c)| if i < cut && c.is_alphanumeric() { '*' } else { c }).collect();
            if out == s {
                Cow::Borrowed(s)
            } else {
                Cow::Owned(out)
            }
        }
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
        Mask::Redact | Mask::Null => Cow::Borrowed(REDACTED),
    }
}

/// Masks a JSON document: a JSON string is masked as text and re-encoded; other documents get
/// a pseudonym of their text, a detector pass (kept only if still valid JSON), or None (redact).
fn json_mask<'a>(ctx: &MaskContext, mask: Mask, s: &'a str) -> Option<Cow<'a, str>> {
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

fn year_only(ty: Ty, fmt: Format, style: DateStyle, v: &[u8]) -> Result<Cow<'_, [u8]>, ()> {
    let fallback = || placeholder(ty, fmt).ok_or(());
    match fmt {
        Format::Text => {
            let s = String::from_utf8_lossy(v);
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

/// Detector pass over an unclassified value: unchanged when nothing is found; text-like types
/// get their hits tagged (JSON only while it stays valid); other types with a hit are redacted.
/// Binary values of unknown types are not scanned: their bytes are not text, and a chance
/// match would refuse the whole row for nothing.
fn scan_value<'v>(ctx: &MaskContext, ty: Ty, fmt: Format, v: &'v [u8]) -> Result<Option<Cow<'v, [u8]>>, ()> {
    if ty == Ty::Other && fmt == Format::Binary {
        return Ok(Some(Cow::Borrowed(v)));
    }
    let Some(payload) = text_payload(ty, fmt, v) else { return Ok(Some(Cow::Borrowed(v))) };
    // The common case -- nothing identifier-shaped -- is decided on the raw bytes.
    if !ctx.detectors.may_hit(payload) {
        return Ok(Some(Cow::Borrowed(v)));
    }
    let s = String::from_utf8_lossy(payload);
    let hits = ctx.detectors.hits(&s);
    if hits.is_empty() {
        return Ok(Some(Cow::Borrowed(v)));
    }
    let scrubbed = ctx.detectors.scrub(&s);
    let ok = match ty {
        Ty::Text => true,
        Ty::Json | Ty::Jsonb => serde_json::from_str::<serde::de::IgnoredAny>(&scrubbed).is_ok(),
        _ => false,
    };
    if ok {
        return Ok(Some(Cow::Owned(wrap_text(ty, fmt, scrubbed.as_bytes()))));
    }
    placeholder(ty, fmt).map(Some).ok_or(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn ctx() -> Arc<MaskContext> {
        static C: OnceLock<Arc<MaskContext>> = OnceLock::new();
        C.get_or_init(|| Arc::new(MaskContext::new(b"test key 0123456789abcdef0123456", Arc::new(Detectors::standard()))))
            .clone()
    }

    /// RowDescription body from (name, table oid, attnum, type oid, format).
    fn row_description(cols: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(cols.len() as i16);
        for (name, t, a, ty, f) in cols {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
            b.put_u32(*t);
            b.put_i16(*a);
            b.put_u32(*ty);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(*f);
        }
        b.to_vec()
    }

    fn data_row(vals: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(vals.len() as i16);
        for v in vals {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
            }
        }
        b.to_vec()
    }

    /// Parses a whole DataRow message back into values, checking the framing.
    fn parse_row(msg: &[u8]) -> Vec<Option<Vec<u8>>> {
        assert_eq!(msg[0], b'D');
        let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        assert_eq!(len + 1, msg.len());
        let body = &msg[5..];
        let mut pos = 0;
        let n = read_i16(body, &mut pos).unwrap();
        let mut out = vec![];
        for _ in 0..n {
            let l = read_i32(body, &mut pos).unwrap();
            if l < 0 {
                out.push(None);
            } else {
                out.push(Some(body[pos..pos + l as usize].to_vec()));
                pos += l as usize;
            }
        }
        assert_eq!(pos, body.len());
        out
    }

    fn plan_of(cols: &[(u32, Format, Mask)]) -> MaskPlan {
        MaskPlan::from_columns(
            cols.iter()
                .map(|&(type_oid, format, mask)| ColumnPlan { type_oid, format, action: Action::Mask { mask, why: Why::NoOrigin } })
                .collect(),
            ctx(),
        )
    }

    fn mask1(type_oid: u32, format: Format, mask: Mask, v: &[u8]) -> Option<Vec<u8>> {
        let plan = plan_of(&[(type_oid, format, mask)]);
        let mut out = BytesMut::new();
        mask_data_row(&plan, &data_row(&[Some(v)]), &mut out).unwrap();
        parse_row(&out).remove(0)
    }

    fn rule(kind: &str, mask: Mask) -> Option<ColumnRule> {
        Some(ColumnRule { kind: kind.into(), mask })
    }

    #[test]
    fn parses_config_spellings() {
        assert_eq!("redact".parse(), Ok(Mask::Redact));
        assert_eq!("partial:4".parse(), Ok(Mask::Partial { keep_last: 4 }));
        assert_eq!(" YEAR ".parse(), Ok(Mask::YearOnly));
        assert_eq!("email_domain".parse(), Ok(Mask::EmailDomain));
        assert_eq!("pseudonym".parse(), Ok(Mask::Pseudonym));
        assert_eq!("free_text".parse(), Ok(Mask::FreeText));
        assert_eq!("null".parse(), Ok(Mask::Null));
        assert!("partial:x".parse::<Mask>().is_err());
        assert!("partial:-1".parse::<Mask>().is_err());
        assert!("hash".parse::<Mask>().is_err());
    }

    #[test]
    fn plan_from_row_description() {
        let protected: HashSet<u32> = [9000].into_iter().collect();
        let rd = row_description(&[
            ("id", 5000, 1, 23, 0),
            ("ssn", 5000, 2, 25, 0),
            ("expr", 0, 0, 25, 1),
            ("p", 5000, 0, 2249, 0),
            ("v_col", 9000, 3, 25, 0),
            ("note", 6000, 1, 25, 0),
            ("n", 6000, 2, 23, 0),
            ("clear_name", 6000, 3, 25, 0),
        ]);
        let lookup = |t: u32, a: i16| match (t, a) {
            (5000, 2) => rule("ssn", Mask::Partial { keep_last: 4 }).map_or(Classified::No, Classified::Masked),
            (6000, 3) => Classified::Clear,
            _ => Classified::No,
        };
        let opts = PlanOptions { touches_protected: true, protected_oids: Some(&protected), scan_text: true, ..Default::default() };
        let plan = MaskPlan::from_row_description(&rd, lookup, &opts, ctx()).unwrap();
        let acts: Vec<&Action> = plan.columns.iter().map(|c| &c.action).collect();
        assert_eq!(acts[0], &Action::Pass);
        assert_eq!(acts[1], &Action::Mask { mask: Mask::Partial { keep_last: 4 }, why: Why::Classified("ssn".into()) });
        assert_eq!(acts[2], &Action::Mask { mask: Mask::Redact, why: Why::NoOrigin });
        assert_eq!(plan.columns[2].format, Format::Binary);
        assert_eq!(acts[3], &Action::Mask { mask: Mask::Redact, why: Why::WholeRow });
        assert_eq!(acts[4], &Action::Mask { mask: Mask::Redact, why: Why::ProtectedRelation });
        assert_eq!(acts[5], &Action::Scan);
        assert_eq!(acts[6], &Action::Pass);
        assert_eq!(acts[7], &Action::Pass, "a kind seen in clear is neither masked nor scanned");
        assert!(plan.is_active());

        // A rewritten statement: computed columns are scanned (text) or passed (count(*)).
        let rd2 = row_description(&[("count", 0, 0, 20, 0), ("ssn", 0, 0, 25, 0), ("p", 5000, 0, 2249, 0), ("ssn", 5000, 2, 25, 0)]);
        let opts = PlanOptions { touches_protected: true, origin_fallback: OriginFallback::Scan, ..Default::default() };
        let plan = MaskPlan::from_row_description(&rd2, lookup, &opts, ctx()).unwrap();
        let acts: Vec<&Action> = plan.columns.iter().map(|c| &c.action).collect();
        assert_eq!(acts[..3], [&Action::Pass, &Action::Scan, &Action::Scan]);
        assert!(matches!(acts[3], Action::Mask { .. }));
        let opts = PlanOptions { touches_protected: true, origin_fallback: OriginFallback::Mask(Mask::Null), ..Default::default() };
        let plan = MaskPlan::from_row_description(&rd2, lookup, &opts, ctx()).unwrap();
        assert_eq!(plan.columns[0].action, Action::Mask { mask: Mask::Null, why: Why::NoOrigin });

        // A statement that touches nothing protected keeps expressions in clear (still scanned).
        let opts = PlanOptions { touches_protected: false, protected_oids: Some(&protected), ..Default::default() };
        let plan = MaskPlan::from_row_description(&rd, lookup, &opts, ctx()).unwrap();
        assert_eq!(plan.columns[2].action, Action::Pass);
        assert_eq!(plan.columns[4].action, Action::Pass);

        assert!(MaskPlan::from_row_description(&rd[..rd.len() - 1], lookup, &opts, ctx()).is_err());
        let mut trailing = rd.clone();
        trailing.push(0);
        assert!(MaskPlan::from_row_description(&trailing, lookup, &opts, ctx()).is_err());
    }

    #[test]
    fn year_masks_keep_the_session_datestyle() {
        assert_eq!(DateStyle::parse("German, DMY"), DateStyle::German);
        assert_eq!(DateStyle::parse(" sql , mdy"), DateStyle::Sql);
        assert_eq!(DateStyle::parse("ISO, MDY"), DateStyle::Iso);
        assert_eq!(DateStyle::parse("nonsense"), DateStyle::Iso);
        let (d, ts) = (Ty::Date, Ty::Timestamp);
        assert_eq!(jan1_text(1981, d, DateStyle::Sql), "01/01/1981");
        assert_eq!(jan1_text(1981, ts, DateStyle::German), "01.01.1981 00:00:00");
        assert_eq!(jan1_text(1981, d, DateStyle::Postgres), "01-01-1981");
        assert_eq!(jan1_text(1981, ts, DateStyle::Postgres), "Thu Jan 01 00:00:00 1981");
        assert_eq!(jan1_text(2000, ts, DateStyle::Postgres), "Sat Jan 01 00:00:00 2000");
        assert_eq!(jan1_text(-43, d, DateStyle::German), "01.01.0044 BC");
        // Idempotent in every style: the masked text parses back to the same year.
        for style in [DateStyle::Iso, DateStyle::Sql, DateStyle::German, DateStyle::Postgres] {
            for ty in [d, ts] {
                let once = jan1_text(1962, ty, style);
                let again = year_only(ty, Format::Text, style, once.as_bytes()).unwrap();
                assert_eq!(again.as_ref(), once.as_bytes(), "{style:?} {ty:?}");
            }
        }
    }

    #[test]
    fn bind_formats_apply() {
        let mut plan = plan_of(&[(25, Format::Text, Mask::Redact), (23, Format::Text, Mask::Redact)]);
        plan.set_result_formats(&[1]).unwrap();
        assert!(plan.columns.iter().all(|c| c.format == Format::Binary));
        plan.set_result_formats(&[0, 1]).unwrap();
        assert_eq!(plan.columns[0].format, Format::Text);
        assert_eq!(plan.columns[1].format, Format::Binary);
        assert!(plan.set_result_formats(&[0, 1, 1]).is_err());
    }

    #[test]
    fn redact_is_type_valid() {
        use Format::{Binary as B, Text as T};
        let r = Mask::Redact;
        assert_eq!(mask1(25, T, r, b"Jane Doe").unwrap(), b"***");
        assert_eq!(mask1(1043, B, r, b"Jane Doe").unwrap(), b"***");
        assert_eq!(mask1(23, T, r, b"42").unwrap(), b"0");
        assert_eq!(mask1(23, B, r, &42i32.to_be_bytes()).unwrap(), [0; 4]);
        assert_eq!(mask1(20, B, r, &42i64.to_be_bytes()).unwrap(), [0; 8]);
        assert_eq!(mask1(1700, T, r, b"12.50").unwrap(), b"0");
        assert_eq!(mask1(1700, B, r, &[0, 1, 0, 0, 0, 0, 0, 0, 0, 12]).unwrap(), [0; 8]);
        assert_eq!(mask1(16, B, r, &[1]).unwrap(), [0]);
        assert_eq!(mask1(1082, T, r, b"1984-08-17").unwrap(), b"1900-01-01");
        assert_eq!(mask1(1082, B, r, &0i32.to_be_bytes()).unwrap(), (-36524i32).to_be_bytes());
        assert_eq!(pg_days_jan1(1900), i64::from(REDACT_DAYS));
        assert_eq!(mask1(1114, T, r, b"1984-08-17 10:00:00").unwrap(), iso_jan1(1900, Ty::Timestamp).as_bytes());
        assert_eq!(mask1(1114, B, r, &[1; 8]).unwrap(), (pg_days_jan1(1900) * USECS_PER_DAY).to_be_bytes());
        assert_eq!(mask1(1184, T, r, b"1984-08-17 10:00:00+02").unwrap(), b"1900-01-01 00:00:00+00");
        assert_eq!(mask1(2950, T, r, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap(), b"00000000-0000-0000-0000-000000000000");
        assert_eq!(mask1(2950, B, r, &[7; 16]).unwrap(), [0; 16]);
        assert_eq!(mask1(114, T, r, br#"{"ssn":"123"}"#).unwrap(), br#""***""#);
        assert_eq!(mask1(3802, B, r, b"\x01{\"a\":1}").unwrap(), b"\x01\"***\"");
        assert_eq!(mask1(17, T, r, b"\\x0102").unwrap(), b"\\x");
        assert_eq!(mask1(17, B, r, &[1, 2]).unwrap(), b"");
        assert_eq!(mask1(1009, T, r, b"{a,b}").unwrap(), b"{}");
        let arr = mask1(1009, B, r, &[0, 0, 0, 1]).unwrap();
        assert_eq!(arr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25]);
        assert_eq!(mask1(2249, T, r, b"(1,123-45-6789)").unwrap(), b"***");
        assert_eq!(mask1(701, B, r, &1.5f64.to_be_bytes()).unwrap(), 0f64.to_be_bytes());
    }

    #[test]
    fn unknown_binary_type_is_refused() {
        let plan = plan_of(&[(23, Format::Text, Mask::Redact), (2249, Format::Binary, Mask::Redact)]);
        let mut out = BytesMut::from(&b"prefix"[..]);
        let err = mask_data_row(&plan, &data_row(&[Some(b"1"), Some(b"xx")]), &mut out).unwrap_err();
        assert_eq!(err, MaskError::UnsupportedBinaryType { column: 1, type_oid: 2249 });
        let g = err.to_gate_error();
        assert!(!g.is_fatal() && g.message.contains("column 2"));
        assert!(MaskError::Malformed("x").to_gate_error().is_fatal());
        assert_eq!(&out[..], b"prefix");
        // NULL needs no placeholder.
        mask_data_row(&plan, &data_row(&[Some(b"1"), None]), &mut out).unwrap();
    }

    #[test]
    fn nulls_and_counts() {
        let plan = plan_of(&[(25, Format::Text, Mask::Pseudonym), (25, Format::Text, Mask::Null)]);
        let mut out = BytesMut::new();
        mask_data_row(&plan, &data_row(&[None, Some(b"x")]), &mut out).unwrap();
        assert_eq!(parse_row(&out), vec![None, None]);
        for bad in [data_row(&[None]), data_row(&[None, None, None]), vec![0, 2, 0, 0, 0, 5, b'a'], vec![0]] {
            let mut out = BytesMut::new();
            assert!(matches!(mask_data_row(&plan, &bad, &mut out), Err(MaskError::Malformed(_))));
            assert!(out.is_empty());
        }
        let mut trailing = data_row(&[None, None]);
        trailing.push(9);
        assert!(mask_data_row(&plan, &trailing, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn partial_email_year() {
        use Format::{Binary as B, Text as T};
        let p4 = Mask::Partial { keep_last: 4 };
        assert_eq!(mask1(25, T, p4, b"123-45-6789").unwrap(), b"***-**-6789");
        assert_eq!(mask1(25, T, p4, b"abc").unwrap(), b"***");
        assert_eq!(mask1(25, T, p4, "Zoë Ødegård".as_bytes()).unwrap(), "*** ***gård".as_bytes());
        assert_eq!(mask1(25, T, Mask::EmailDomain, b"jane@example.org").unwrap(), b"***@example.org");
        assert_eq!(mask1(25, T, Mask::EmailDomain, b"no mail").unwrap(), b"***");
        assert_eq!(mask1(1082, T, Mask::YearOnly, b"1984-08-17").unwrap(), b"1984-01-01");
        assert_eq!(mask1(1082, T, Mask::YearOnly, b"17.08.1984").unwrap(), b"1984-01-01");
        assert_eq!(mask1(1082, T, Mask::YearOnly, b"0044-03-15 BC").unwrap(), b"0044-01-01 BC");
        assert_eq!(mask1(1082, T, Mask::YearOnly, b"infinity").unwrap(), b"infinity");
        assert_eq!(mask1(1114, T, Mask::YearOnly, b"1984-08-17 13:14:15.5").unwrap(), b"1984-01-01 00:00:00");
        let d = (days_from_civil(1984, 8, 17) - PG_EPOCH_DAYS) as i32;
        let jan1 = (days_from_civil(1984, 1, 1) - PG_EPOCH_DAYS) as i32;
        assert_eq!(mask1(1082, B, Mask::YearOnly, &d.to_be_bytes()).unwrap(), jan1.to_be_bytes());
        let ts = i64::from(d) * USECS_PER_DAY + 3_600_000_000;
        assert_eq!(mask1(1184, B, Mask::YearOnly, &ts.to_be_bytes()).unwrap(), (i64::from(jan1) * USECS_PER_DAY).to_be_bytes());
        // Before 2000 and before year 0 round-trip through the calendar arithmetic.
        for y in [-500, 1, 1899, 1900, 1999, 2000, 2024, 9999] {
            assert_eq!(year_from_days(days_from_civil(y, 7, 4)), y);
            assert_eq!(year_from_days(days_from_civil(y, 1, 1)), y);
            assert_eq!(year_from_days(days_from_civil(y, 12, 31)), y);
        }
        // Masks that do not apply to a type give its placeholder.
        assert_eq!(mask1(23, T, Mask::YearOnly, b"1984").unwrap(), b"0");
        assert_eq!(mask1(1082, T, p4, b"1984-08-17").unwrap(), b"1900-01-01");
    }

    #[test]
    fn cached_pseudonyms_are_the_computed_ones() {
        let a = MaskContext::new(b"key one, at least 32 bytes long...", Arc::new(Detectors::standard()));
        let b = MaskContext::new(b"key two, at least 32 bytes long...", Arc::new(Detectors::standard()));
        for v in [&b"Jane"[..], b"John", b"Jane"] {
            assert_eq!(a.pseudonym(v).as_bytes(), a.compute_pseudonym(v));
            // Another context (a reload's new key) never gets the first one's cached tokens.
            assert_eq!(b.pseudonym(v).as_bytes(), b.compute_pseudonym(v));
            assert_ne!(a.pseudonym(v), b.pseudonym(v));
        }
    }

    #[test]
    fn pseudonyms_are_stable_and_keyed() {
        let a = mask1(25, Format::Text, Mask::Pseudonym, b"Jane Doe").unwrap();
        let b = mask1(1043, Format::Binary, Mask::Pseudonym, b"Jane Doe").unwrap();
        assert_eq!(a, b);
        assert!(is_pseudonym(std::str::from_utf8(&a).unwrap()));
        assert_ne!(a, mask1(25, Format::Text, Mask::Pseudonym, b"Jane Doe ").unwrap());
        let other = MaskContext::new(b"another key", Arc::new(Detectors::standard()));
        assert_ne!(other.pseudonym(b"Jane Doe").into_bytes(), a);
        // Non-text types: the type's placeholder.
        assert_eq!(mask1(23, Format::Binary, Mask::Pseudonym, &7i32.to_be_bytes()).unwrap(), [0; 4]);
        let j = mask1(3802, Format::Binary, Mask::Pseudonym, b"\x01\"Jane Doe\"").unwrap();
        assert_eq!(j, [&[1u8][..], b"\"", &a, b"\""].concat());
        let obj = mask1(114, Format::Text, Mask::Pseudonym, br#"{"name":"Jane"}"#).unwrap();
        assert!(obj.starts_with(b"\"psn_"));
    }

    #[test]
    fn free_text_and_scan() {
        let note = b"Pt SSN 123-45-6789, call 555-123-4567.";
        assert_eq!(mask1(25, Format::Text, Mask::FreeText, note).unwrap(), b"Pt SSN [SSN], call [PHONE].");
        // JSON stays valid or becomes the placeholder.
        let j = mask1(114, Format::Text, Mask::FreeText, br#"{"ssn":"123-45-6789"}"#).unwrap();
        assert_eq!(j, br#"{"ssn":"[SSN]"}"#);
        let j = mask1(114, Format::Text, Mask::FreeText, br#"{"phone":5551234567, "x": 555-123-4567}"#).unwrap();
        assert_eq!(j, br#""***""#);

        let plan = MaskPlan::from_columns(
            vec![
                ColumnPlan { type_oid: 25, format: Format::Text, action: Action::Scan },
                ColumnPlan { type_oid: 1009, format: Format::Text, action: Action::Scan },
                ColumnPlan { type_oid: 23, format: Format::Text, action: Action::Pass },
            ],
            ctx(),
        );
        let mut out = BytesMut::new();
        mask_data_row(&plan, &data_row(&[Some(note), Some(b"{jane@example.org}"), Some(b"7")]), &mut out).unwrap();
        let row = parse_row(&out);
        assert_eq!(row[0].as_deref(), Some(&b"Pt SSN [SSN], call [PHONE]."[..]));
        assert_eq!(row[1].as_deref(), Some(&b"{}"[..]));
        assert_eq!(row[2].as_deref(), Some(&b"7"[..]));
        // No hit: the same bytes.
        let mut out2 = BytesMut::new();
        let clean = data_row(&[Some(b"fine"), Some(b"{a}"), Some(b"7")]);
        mask_data_row(&plan, &clean, &mut out2).unwrap();
        assert_eq!(&out2[5..], &clean[..]);
    }

    #[test]
    fn copy_text_rows() {
        let plan = MaskPlan::from_columns(
            vec![
                ColumnPlan { type_oid: 23, format: Format::Binary, action: Action::Pass },
                ColumnPlan { type_oid: 25, format: Format::Text, action: Action::Mask { mask: Mask::Partial { keep_last: 4 }, why: Why::NoOrigin } },
                ColumnPlan { type_oid: 25, format: Format::Text, action: Action::Scan },
                ColumnPlan { type_oid: 1082, format: Format::Binary, action: Action::Mask { mask: Mask::YearOnly, why: Why::NoOrigin } },
            ],
            ctx(),
        );
        let data = b"1\t123-45-6789\tline\\none\\tSSN 123-45-6789 a\\\\b\t1984-08-17\n2\t\\N\t\\N\t\\N\n";
        let mut out = BytesMut::new();
        mask_copy_data(&plan, data, b'\t', &mut out).unwrap();
        assert_eq!(out[0], b'd');
        assert_eq!(u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize + 1, out.len());
        assert_eq!(
            &out[5..],
            &b"1\t***-**-6789\tline\\none\\tSSN [SSN] a\\\\b\t1984-01-01\n2\t\\N\t\\N\t\\N\n"[..]
        );
        // Masking the masked output changes nothing.
        let mut again = BytesMut::new();
        mask_copy_data(&plan, &out[5..], b'\t', &mut again).unwrap();
        assert_eq!(again, out);
        // Wrong column count, escaped delimiters counted right.
        assert!(mask_copy_data(&plan, b"1\t2\n", b'\t', &mut BytesMut::new()).is_err());
        let plan2 = plan_of(&[(25, Format::Text, Mask::Redact), (25, Format::Text, Mask::Pseudonym)]);
        let mut o = BytesMut::new();
        mask_copy_data(&plan2, b"a,b\\,c|x\\tz", b'|', &mut o).unwrap();
        let expect = format!("***|{}", ctx().pseudonym(b"x\tz"));
        assert_eq!(&o[5..], expect.as_bytes());
        assert_eq!(copy_unescape(b"\\101\\x41\\q\\"), b"AAq\\");
    }

    #[test]
    fn rewrite_outputs_pass_unchanged() {
        // What layer 1's mask expressions produce must survive layer 2 byte for byte.
        use Format::Text as T;
        let cases: [(u32, Mask, &[u8]); 8] = [
            (25, Mask::Partial { keep_last: 4 }, b"***6789"),
            (25, Mask::Partial { keep_last: 4 }, b"***ab"),
            (25, Mask::EmailDomain, b"***@example.org"),
            (25, Mask::Pseudonym, b"psn_0123456789abcdef"),
            (1082, Mask::YearOnly, b"1984-01-01"),
            (25, Mask::FreeText, b"seen [DATE], [SSN], call [PHONE], [MRN], [EMAIL]"),
            (25, Mask::Redact, b"***"),
            (1009, Mask::Redact, b"{}"),
        ];
        for (oid, m, v) in cases {
            assert_eq!(mask1(oid, T, m, v).unwrap(), v, "{m:?} {}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn copy_out_response() {
        assert_eq!(copy_out_columns(&[0, 0, 2, 0, 0, 0, 0]), Ok(2));
        assert_eq!(copy_out_columns(&[1, 0, 1, 0, 1]), Err(MaskError::UnsupportedCopyFormat));
        assert!(copy_out_columns(&[0, 0, 2, 0, 0]).is_err());
        assert!(copy_out_columns(&[]).is_err());
    }

    fn types() -> impl Strategy<Value = (u32, Format)> {
        let oids = prop::sample::select(vec![25u32, 1043, 1042, 19, 18, 114, 3802, 17, 16, 21, 23, 20, 700, 701, 1700, 1082, 1114, 1184, 2950, 1009, 1186]);
        (oids, prop::bool::ANY.prop_map(|b| if b { Format::Binary } else { Format::Text }))
    }

    fn masks() -> impl Strategy<Value = Mask> {
        prop_oneof![
            Just(Mask::Redact),
            Just(Mask::Null),
            (0usize..6).prop_map(|keep_last| Mask::Partial { keep_last }),
            Just(Mask::YearOnly),
            Just(Mask::EmailDomain),
            Just(Mask::Pseudonym),
            Just(Mask::FreeText),
        ]
    }

    /// A plausible clear value of the type in the format.
    fn value_for(oid: u32, fmt: Format, seed: &[u8]) -> Vec<u8> {
        let s = String::from_utf8_lossy(seed).into_owned();
        match (oid, fmt) {
            (114, _) | (3802, Format::Text) => serde_json::to_string(&s).unwrap().into_bytes(),
            (3802, Format::Binary) => [&[1u8][..], serde_json::to_string(&s).unwrap().as_bytes()].concat(),
            (1082, Format::Binary) => (seed.len() as i32 * 997 - 20_000).to_be_bytes().to_vec(),
            (1114 | 1184, Format::Binary) => (seed.len() as i64 * 86_399_999_999 - 1_000_000_000_000).to_be_bytes().to_vec(),
            (1082, Format::Text) => format!("{:04}-0{}-1{}", 1000 + seed.len() * 37, 1 + seed.len() % 9, seed.len() % 9).into_bytes(),
            (18, _) => seed.iter().take(1).copied().collect(),
            _ if fmt == Format::Binary && ![25, 1043, 1042, 19].contains(&oid) => seed.to_vec(),
            _ => s.into_bytes(),
        }
    }

    proptest! {
        #[test]
        fn masking_is_idempotent_and_keeps_shape(
            cols in prop::collection::vec((types(), masks(), prop::option::of(prop::collection::vec(any::<u8>(), 0..40))), 1..12),
        ) {
            let plan = plan_of(&cols.iter().map(|((t, f), m, _)| (*t, *f, *m)).collect::<Vec<_>>());
            let values: Vec<Option<Vec<u8>>> = cols.iter().map(|((t, f), _, v)| v.as_ref().map(|v| value_for(*t, *f, v))).collect();
            let row = data_row(&values.iter().map(|v| v.as_deref()).collect::<Vec<_>>());
            let mut once = BytesMut::new();
            mask_data_row(&plan, &row, &mut once).unwrap();
            let parsed = parse_row(&once);
            prop_assert_eq!(parsed.len(), cols.len());
            for (p, v) in parsed.iter().zip(&values) {
                if v.is_none() { prop_assert!(p.is_none()); }
            }
            let mut twice = BytesMut::new();
            mask_data_row(&plan, &once[5..], &mut twice).unwrap();
            prop_assert_eq!(&twice[..], &once[..]);
        }

        #[test]
        fn texty_masks_are_valid_utf8_and_hide_ssns(ssn in "[0-9]{3}-[0-9]{2}-[0-9]{4}", pre in "[a-z ]{0,10}", m in masks()) {
            let v = format!("{pre}{ssn}");
            if let Some(out) = mask1(25, Format::Text, m, v.as_bytes()) {
                let s = String::from_utf8(out).unwrap();
                prop_assert!(!s.contains(&ssn));
            }
            for oid in [114u32, 3802] {
                let j = serde_json::to_string(&v).unwrap();
                if let Some(out) = mask1(oid, Format::Text, m, j.as_bytes()) {
                    prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok());
                    prop_assert!(!String::from_utf8_lossy(&out).contains(&ssn));
                }
            }
        }

        #[test]
        fn copy_escape_round_trips(v in prop::collection::vec(any::<u8>(), 0..60)) {
            let mut out = BytesMut::new();
            copy_escape(&v, b'\t', &mut out);
            prop_assert_eq!(split_copy_fields(&out, b'\t').len(), 1);
            prop_assert_eq!(copy_unescape(&out), v);
        }
    }
}
