//! Audit record bodies the data plane writes, and what they are made of: timestamps, session
//! UUIDs, keyed hashes. The per-statement records (statement, result) are on the hot path, so
//! they are formatted straight into bytes without a serde_json::Value tree — in canonical form
//! (keys sorted by code point, no whitespace, serde_json's string escaping, no floats), which
//! the trail's writer takes as it is.

use std::io::Write;
use std::sync::Arc;

use crate::cache::Decision;
use crate::disclosures::Disclosures;

/// Hex digits of the HMAC in a keyed hash: 128 bits, plenty to correlate and too many to collide.
const HASH_HEX: usize = 32;

/// The audit HMAC key (`[audit] hmac_key`): keyed hashes of text that may hold PHI (literals,
/// parameters, client-typed names, withheld error details), so the trail can say "the same
/// value as in that other statement" — and an investigator holding the key can test a value
/// (`phigate audit hash VALUE`) — but nobody without the key can recover a low-entropy value
/// (an SSN, a date of birth) by hashing candidates, as a plain SHA-256 would allow.
pub struct HashKey(ring::hmac::Key);

impl HashKey {
    pub fn new(key: &[u8]) -> Self {
        HashKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
    }

    /// A key drawn now, for a data plane without an [audit] section (unit tests): hashes then
    /// correlate within this run only.
    pub fn random() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self::new(&bytes)
    }

    /// `h:` and the first 32 hex digits of HMAC-SHA256(key, data).
    pub fn hash(&self, data: &[u8]) -> String {
        let mut out = String::with_capacity(2 + HASH_HEX);
        out.push_str("h:");
        let tag = ring::hmac::sign(&self.0, data);
        for b in &tag.as_ref()[..HASH_HEX / 2] {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
        out
    }

    /// The hash as a JSON string, appended to `out` (no escaping needed: hex only).
    fn push_json(&self, out: &mut Vec<u8>, data: &[u8]) {
        let tag = ring::hmac::sign(&self.0, data);
        out.extend_from_slice(b"\"h:");
        for b in &tag.as_ref()[..HASH_HEX / 2] {
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        }
        out.push(b'"');
    }

    /// Client-chosen text (a startup user name, an application_name) as a record may hold it:
    /// "" stays "" (nothing was sent, nothing to hide), anything else is a keyed hash.
    pub fn client_label(&self, s: &str) -> String {
        if s.is_empty() {
            String::new()
        } else {
            self.hash(s.as_bytes())
        }
    }

    /// A startup parameter the gateway did not forward, as a record may name it: the well-known
    /// names drivers send as they are, any other name (a client may send any) as a keyed hash.
    pub fn parameter_label(&self, name: &str) -> String {
        const KNOWN: &[&str] = &[
            "application_name", "client_encoding", "datestyle", "timezone", "intervalstyle", "options",
            "extra_float_digits", "search_path", "statement_timeout", "lock_timeout", "role",
            "session_authorization", "idle_in_transaction_session_timeout", "default_transaction_read_only",
            "default_transaction_isolation", "standard_conforming_strings", "geqo", "work_mem",
            "target_session_attrs", "client_min_messages", "bytea_output",
        ];
        if KNOWN.iter().any(|k| k.eq_ignore_ascii_case(name)) {
            name.to_string()
        } else {
            self.client_label(name)
        }
    }

    /// The keyed hashes of a statement's literals as a JSON array, or `null` when the text uses
    /// a construct the lexer does not split with certainty (see normalize.rs).
    pub fn literals_json(&self, sql: &[u8]) -> Box<[u8]> {
        let mut out = Vec::with_capacity(48);
        let complete = crate::normalize::for_each_literal(sql, |value| {
            out.push(if out.is_empty() { b'[' } else { b',' });
            self.push_json(&mut out, value);
        });
        if !complete {
            return Box::from(&b"null"[..]);
        }
        if out.is_empty() {
            out.push(b'[');
        }
        out.push(b']');
        out.into_boxed_slice()
    }

    /// The keyed hashes of a Bind's parameter values as a JSON array (SQL NULL: null).
    pub fn parameters_json<'a>(&self, values: impl Iterator<Item = Option<&'a [u8]>>) -> Box<[u8]> {
        let mut out = Vec::with_capacity(48);
        out.push(b'[');
        for (i, v) in values.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match v {
                Some(v) => self.push_json(&mut out, v),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b']');
        out.into_boxed_slice()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Now as RFC 3339 UTC with microseconds: `2026-12-06T15:35:34.123456Z`.
pub fn now() -> String {
    let mut out = Vec::with_capacity(27);
    write_ts(&mut out, std::time::SystemTime::now());
    // Only ASCII digits and separators were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Writes `t` as RFC 3339 UTC with microseconds (no quotes).
pub fn write_ts(out: &mut Vec<u8>, t: std::time::SystemTime) {
    let us = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    crate::audit::time::write_us(out, us);
}

/// A random (version 4) UUID naming one session in every record about it: unique across
/// restarts and gateways, unlike a counter.
pub fn session_uuid() -> Arc<str> {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[usize::from(byte >> 4)] as char);
        s.push(HEX[usize::from(byte & 15)] as char);
    }
    Arc::from(s)
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is the trail's canonical escaping.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// One statement as the gateway judged it, for the `statement` record.
pub struct StatementRecord<'a> {
    pub session: &'a str,
    /// The statement's number in its session (its `result` carries the same).
    pub stmt: u64,
    pub decision: &'a Decision,
    pub cached: bool,
    pub protocol: &'a str,
    /// Keyed hashes of the literals (a JSON array or `null`).
    pub literals: &'a [u8],
    /// Keyed hashes of the bound parameters (a JSON array), None for a simple Query.
    pub parameters: Option<&'a [u8]>,
}

/// `{"cached","columns_read","columns_written","decision","event":"statement","kind","literals",
/// "masking","normalized","parameters","protocol","relations","rule","session","stmt","ts"}`
pub fn statement(r: &StatementRecord<'_>) -> Vec<u8> {
    let d = r.decision;
    let f = &*d.facts;
    let normalized = d.normalized.as_deref();
    let mut o = Vec::with_capacity(300 + normalized.map_or(0, str::len) + r.literals.len() + f.len());
    o.extend_from_slice(if r.cached { b"{\"cached\":true" } else { b"{\"cached\":false" });
    o.extend_from_slice(b",\"columns_read\":");
    o.extend_from_slice(&f.columns_read);
    o.extend_from_slice(b",\"columns_written\":");
    o.extend_from_slice(&f.columns_written);
    o.extend_from_slice(if d.action == crate::cache::Action::Allow { b",\"decision\":\"allow\"" } else { b",\"decision\":\"deny\"" });
    o.extend_from_slice(b",\"event\":\"statement\",\"kind\":");
    o.extend_from_slice(&f.kind);
    o.extend_from_slice(b",\"literals\":");
    o.extend_from_slice(r.literals);
    o.extend_from_slice(b",\"masking\":");
    o.extend_from_slice(&f.masking);
    o.extend_from_slice(b",\"normalized\":");
    match normalized {
        Some(n) => json_str(&mut o, n),
        None => o.extend_from_slice(b"null"),
    }
    o.extend_from_slice(b",\"parameters\":");
    o.extend_from_slice(r.parameters.unwrap_or(b"null"));
    o.extend_from_slice(b",\"protocol\":");
    json_str(&mut o, r.protocol);
    o.extend_from_slice(b",\"relations\":");
    o.extend_from_slice(&f.relations);
    o.extend_from_slice(b",\"rule\":");
    o.extend_from_slice(&f.rule);
    o.extend_from_slice(b",\"session\":");
    json_str(&mut o, r.session);
    let _ = write!(o, ",\"stmt\":{},\"ts\":\"", r.stmt);
    write_ts(&mut o, std::time::SystemTime::now());
    o.extend_from_slice(b"\"}");
    o
}

/// What one statement's execution came to, for the `result` record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResultRecord {
    /// Rows reported by the statement's CommandComplete (summed over a Query's statements).
    pub rows: u64,
    /// Bytes sent to the client for it.
    pub bytes: u64,
    pub duration_us: u64,
    /// SQLSTATE of the error that ended it; None on success.
    pub sqlstate: Option<String>,
    /// Rows (or COPY lines) layer 2 changed: masked columns or detector hits.
    pub rows_masked: u64,
    /// The server never ran it: an earlier message of its pipeline failed.
    pub skipped: bool,
}

/// `{"bytes","duration_us","event":"result","possible"?,"rows","rows_masked","session","skipped",
/// "sqlstate","stmt","subjects"?,"ts"}` (`possible` and `subjects`: the accounting of
/// disclosures, when the statement sent rows of `[phi.subjects]` relations).
pub fn result(session: &str, stmt: u64, r: &ResultRecord, disclosures: Option<&Disclosures>) -> Vec<u8> {
    let mut o = Vec::with_capacity(220 + disclosures.map_or(0, |d| d.possible.len() + d.subjects.len() + 24));
    let _ = write!(o, "{{\"bytes\":{},\"duration_us\":{},\"event\":\"result\",", r.bytes, r.duration_us);
    if let Some(d) = disclosures {
        o.extend_from_slice(b"\"possible\":");
        o.extend_from_slice(&d.possible);
        o.push(b',');
    }
    let _ = write!(o, "\"rows\":{},\"rows_masked\":{},\"session\":", r.rows, r.rows_masked);
    json_str(&mut o, session);
    o.extend_from_slice(if r.skipped { b",\"skipped\":true,\"sqlstate\":" } else { b",\"skipped\":false,\"sqlstate\":" });
    match &r.sqlstate {
        Some(s) => json_str(&mut o, s),
        None => o.extend_from_slice(b"null"),
    }
    let _ = write!(o, ",\"stmt\":{stmt},");
    if let Some(d) = disclosures {
        o.extend_from_slice(b"\"subjects\":");
        o.extend_from_slice(&d.subjects);
        o.push(b',');
    }
    o.extend_from_slice(b"\"ts\":\"");
    write_ts(&mut o, std::time::SystemTime::now());
    o.extend_from_slice(b"\"}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Action, AuditFacts, Reuse};

    fn canonical(bytes: &[u8]) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(serde_json::to_vec(&v).unwrap(), bytes, "not canonical: {}", String::from_utf8_lossy(bytes));
        v
    }

    fn decision(action: Action, normalized: Option<&str>, facts: AuditFacts) -> Decision {
        Decision { action, reuse: Reuse::Exact, normalized: normalized.map(Arc::from), rewritten: None, protected: false,
            origins: None, copy_columns: None, notices: None, subject_relations: None, facts: Arc::new(facts), cursor: None, approval: None }
    }

    #[test]
    fn hot_records_are_canonical_json() {
        // serde_json's map sorts keys (no preserve_order feature in the build): the facts it
        // renders, and the round trip below, are canonical.
        let m: serde_json::Map<String, serde_json::Value> = [("b".to_string(), 1.into()), ("a".to_string(), 2.into())].into_iter().collect();
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"a":2,"b":1}"#);
        let key = HashKey::new(b"k");
        let facts = AuditFacts::from_answer(&serde_json::json!({
            "kind": "select", "rule": "role:analyst allow select \"x\"\u{1}é",
            "relations": ["public.patients"], "columns_read": ["public.patients.mrn"], "columns_written": [],
            "masking": {"by": "layer2", "columns": {"public.patients.ssn": "redact", "public.patients.dob": "year"}},
        })).unwrap();
        let literals = key.literals_json(b"select 'a''b', 42 from t");
        let params = key.parameters_json([Some(&b"x"[..]), None].into_iter());
        for (d, p) in [
            (decision(Action::Allow, Some("select \"x\"\n\t\u{1f}\\é $1"), facts), Some(&params[..])),
            (decision(Action::Deny { sqlstate: "42501".into(), message: "m".into(), hint: None }, None, AuditFacts::default()), None),
        ] {
            let bytes = statement(&StatementRecord { session: "0f0e", stmt: 3, decision: &d, cached: true, protocol: "simple",
                literals: &literals, parameters: p });
            let v = canonical(&bytes);
            assert_eq!(v["event"], "statement");
            assert_eq!(v["stmt"], 3);
            assert_eq!(v["literals"].as_array().unwrap().len(), 2);
        }
        for sqlstate in [None, Some("42501".to_string())] {
            let r = ResultRecord { rows: 3, bytes: 10, duration_us: 17, sqlstate: sqlstate.clone(), rows_masked: 1, skipped: false };
            let v = canonical(&result("s\"1", 3, &r, None));
            assert_eq!((v["rows"].as_u64(), v["sqlstate"].as_str()), (Some(3), sqlstate.as_deref()));
            // With disclosures, `possible` and `subjects` sit at their sorted places.
            let d = Disclosures { possible: br#"{"public.notes":2}"#.to_vec(), subjects: br#"{"public.patients":{"clear":[],"h":[],"masked":[],"more":1}}"#.to_vec() };
            let v = canonical(&result("s", 4, &r, Some(&d)));
            assert_eq!(v["possible"]["public.notes"], 2);
            assert_eq!(v["subjects"]["public.patients"]["more"], 1);
        }
    }

    #[test]
    fn keyed_hashes_use_the_key() {
        let a = HashKey::new(b"key one");
        let b = HashKey::new(b"key two");
        let h = a.hash(b"someone");
        assert_eq!(h, a.hash(b"someone"));
        assert_ne!(h, b.hash(b"someone"));
        assert_ne!(h, a.hash(b"someone else"));
        assert!(h.starts_with("h:") && h.len() == 34 && h[2..].bytes().all(|c| c.is_ascii_hexdigit()));
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        assert_eq!(HashKey::new(b"Jefe").hash(b"what do ya want for nothing?"), "h:5bdcc146bf60754e6a042426089575c7");
        assert_eq!(a.client_label(""), "");
        assert_eq!(a.parameter_label("DateStyle"), "DateStyle");
        assert!(a.parameter_label("someone").starts_with("h:"));
    }

    #[test]
    fn literal_hashes_are_of_the_values() {
        let k = HashKey::new(b"k");
        let lits = |sql: &str| String::from_utf8(k.literals_json(sql.as_bytes()).into_vec()).unwrap();
        // A string literal is hashed as its value: '' is one quote, as PostgreSQL reads it.
        assert_eq!(lits("select * from t where a = 'O''Brien' and b = 12"),
            format!("[\"{}\",\"{}\"]", k.hash(b"O'Brien"), k.hash(b"12")));
        assert_eq!(lits("select $$x$$, $q$y$q$"), format!("[\"{}\",\"{}\"]", k.hash(b"x"), k.hash(b"y")));
        assert_eq!(lits("select 1"), format!("[\"{}\"]", k.hash(b"1")));
        assert_eq!(lits("select a from t"), "[]");
        assert_eq!(lits("select 'open"), "null");
    }

    #[test]
    fn timestamps_are_rfc3339_micro() {
        let mut o = Vec::new();
        write_ts(&mut o, std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_796_571_334_123_456));
        assert_eq!(String::from_utf8(o).unwrap(), "2026-12-06T15:35:34.123456Z");
        let mut o = Vec::new();
        write_ts(&mut o, std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)); // leap day
        assert_eq!(String::from_utf8(o).unwrap(), "2000-02-29T00:00:00.000000Z");
        assert_eq!(now().len(), 27);
    }

    #[test]
    fn session_uuids_are_v4() {
        let u = session_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(u, session_uuid());
    }
}
