//! Scrubs ErrorResponse and NoticeResponse messages going to masked identities: the content
//! detectors run over every free-text field, row-echoing details of constraint violations are
//! replaced by a generic one, and the audit gets a hash of what was removed.
//!
//! PostgreSQL puts values into error text in a few places: DETAIL of class 23 errors ("Key
//! (ssn)=(123-45-6789) already exists.", "Failing row contains (...)"), MESSAGE of class 22
//! errors ('invalid input syntax for type integer: "123-45-6789"'), and anything RAISE writes.
//! The rewrite already keeps clear values out of what the server evaluates; this is the check.

use bytes::{BufMut, Bytes, BytesMut};
use crate::events::HashKey;

use crate::masking::detectors::Detectors;
use crate::protocol::framing::read_cstr;
use crate::protocol::messages::error_response::clip;
use crate::protocol::messages::{put_cstr, put_message};

/// What replaces a detail that echoed a row or key.
pub const GENERIC_DETAIL: &str = "The conflicting values are withheld by phigate; the original detail is in the audit record.";

/// What scrubbing did, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScrubReport {
    /// The message differs from the original in some field.
    pub changed: bool,
    /// Keyed hash (`crate::events::HashKey::hash`, the audit HMAC key) of the original DETAIL when it was replaced by
    /// `GENERIC_DETAIL`.
    pub detail_hmac: Option<String>,
    /// Keyed hash of the original MESSAGE when values were cut out of it.
    pub message_hmac: Option<String>,
    /// Fields dropped because the gateway does not know what they carry.
    pub dropped_fields: Vec<u8>,
}

/// Why a message could not be scrubbed (the caller replaces it with its own error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubError(pub &'static str);

impl std::fmt::Display for ScrubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed error or notice from the server: {}", self.0)
    }
}

/// Fields forwarded as they are: severities, codes, positions, identifiers, source location.
fn passthrough_field(code: u8) -> bool {
    matches!(code, b'S' | b'V' | b'C' | b'P' | b'p' | b's' | b't' | b'c' | b'd' | b'n' | b'F' | b'L' | b'R')
}

/// Fields that carry free text and are scrubbed: message, detail, hint, where/context,
/// internal query.
fn text_field(code: u8) -> bool {
    matches!(code, b'M' | b'D' | b'H' | b'W' | b'q')
}

/// A DETAIL that repeats row or key values (unique, foreign key, not-null, check, exclusion,
/// partition routing).
fn echoes_values(detail: &str) -> bool {
    detail.contains(")=(") || detail.contains("row contains (") || detail.starts_with("Key (")
}

/// Replaces the contents of every double-quoted span with "***" (class 22 messages quote the
/// offending input: `invalid input syntax for type integer: "123-45-6789"`).
fn redact_quoted(s: &str) -> Option<String> {
    if !s.contains('"') {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut inside = false;
    for c in s.chars() {
        if c == '"' {
            if inside {
                out.push_str("***");
            }
            inside = !inside;
            out.push(c);
        } else if !inside {
            out.push(c);
        }
    }
    if inside {
        out.push_str("***");
    }
    (out != s).then_some(out)
}


/// Rebuilds the ErrorResponse/NoticeResponse `tag` (b'E' or b'N') with body `body` for a masked
/// identity, appending the whole message to `out`.
pub fn scrub_error_or_notice(
    tag: u8,
    body: &[u8],
    detectors: &Detectors,
    key: &HashKey,
    out: &mut BytesMut,
) -> Result<ScrubReport, ScrubError> {
    if tag != b'E' && tag != b'N' {
        return Err(ScrubError("not an ErrorResponse or NoticeResponse"));
    }
    let mut fields: Vec<(u8, &[u8])> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(&code) = body.get(pos) else { return Err(ScrubError("unterminated field list")) };
        pos += 1;
        if code == 0 {
            break;
        }
        let v = read_cstr(body, &mut pos).ok_or(ScrubError("unterminated field"))?;
        fields.push((code, v));
    }
    if pos != body.len() {
        return Err(ScrubError("bytes after the field list"));
    }
    let sqlstate = fields.iter().find(|(c, _)| *c == b'C').map(|(_, v)| *v).unwrap_or(b"");
    let mut report = ScrubReport::default();
    let mut kept: Vec<(u8, Vec<u8>)> = Vec::with_capacity(fields.len());
    for (code, v) in fields {
        if passthrough_field(code) {
            kept.push((code, v.to_vec()));
            continue;
        }
        if !text_field(code) {
            // Unknown field types may carry anything; newer servers lose nothing important.
            report.dropped_fields.push(code);
            report.changed = true;
            continue;
        }
        let text = String::from_utf8_lossy(v);
        let mut new: String = if code == b'D' && echoes_values(&text) {
            report.detail_hmac = Some(key.hash(v));
            GENERIC_DETAIL.to_owned()
        } else if code == b'M' && sqlstate.starts_with(b"22") {
            match redact_quoted(&text) {
                Some(r) => {
                    report.message_hmac = Some(key.hash(v));
                    r
                }
                None => text.into_owned(),
            }
        } else {
            text.into_owned()
        };
        if let std::borrow::Cow::Owned(s) = detectors.scrub(&new) {
            if code == b'M' && report.message_hmac.is_none() {
                report.message_hmac = Some(key.hash(v));
            }
            new = s;
        }
        let new = clip(&new).as_bytes().to_vec();
        if new != v {
            report.changed = true;
        }
        kept.push((code, new));
    }
    put_message(out, tag, |o| {
        for (code, v) in &kept {
            o.put_u8(*code);
            put_cstr(o, v);
        }
        o.put_u8(0);
    });
    Ok(report)
}

/// Convenience: the scrubbed message as its own buffer.
pub fn scrubbed(tag: u8, body: &[u8], detectors: &Detectors, key: &HashKey) -> Result<(Bytes, ScrubReport), ScrubError> {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    let r = scrub_error_or_notice(tag, body, detectors, key, &mut out)?;
    Ok((out.freeze(), r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::error_response::field;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn det() -> &'static Detectors {
        static D: OnceLock<Detectors> = OnceLock::new();
        D.get_or_init(Detectors::standard)
    }

    fn key() -> &'static HashKey {
        static K: std::sync::OnceLock<HashKey> = std::sync::OnceLock::new();
        K.get_or_init(|| HashKey::new(b"test key"))
    }

    fn body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = vec![];
        for (c, v) in fields {
            b.push(*c);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    fn run(tag: u8, fields: &[(u8, &str)]) -> (Bytes, ScrubReport) {
        let (m, r) = scrubbed(tag, &body(fields), det(), key()).unwrap();
        assert_eq!(m[0], tag);
        assert_eq!(u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize + 1, m.len());
        (m, r)
    }

    fn f(m: &Bytes, code: u8) -> Option<String> {
        field(&m[5..], code).map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    #[test]
    fn unique_violation_detail_is_replaced_and_hashed() {
        let detail = "Key (ssn)=(123-45-6789) already exists.";
        let (m, r) = run(b'E', &[
            (b'S', "ERROR"), (b'V', "ERROR"), (b'C', "23505"),
            (b'M', "duplicate key value violates unique constraint \"patients_ssn_key\""),
            (b'D', detail), (b's', "public"), (b't', "patients"), (b'n', "patients_ssn_key"),
        ]);
        assert_eq!(f(&m, b'D').as_deref(), Some(GENERIC_DETAIL));
        assert_eq!(r.detail_hmac, Some(key().hash(detail.as_bytes())));
        assert!(r.changed);
        assert_eq!(f(&m, b'M').unwrap(), "duplicate key value violates unique constraint \"patients_ssn_key\"");
        assert_eq!(f(&m, b'n').as_deref(), Some("patients_ssn_key"));
        assert_eq!(f(&m, b'C').as_deref(), Some("23505"));
        assert!(!String::from_utf8_lossy(&m).contains("6789"));
    }

    #[test]
    fn failing_row_and_fk_details() {
        for d in [
            "Failing row contains (1, Jane Doe, null).",
            "Key (patient_id)=(42) is not present in table \"patients\".",
            "Partition key of the failing row contains (dob) = (1984-08-17).",
        ] {
            let (m, r) = run(b'E', &[(b'C', "23514"), (b'M', "x"), (b'D', d)]);
            assert_eq!(f(&m, b'D').as_deref(), Some(GENERIC_DETAIL), "{d}");
            assert!(r.detail_hmac.is_some());
        }
    }

    #[test]
    fn cast_error_values_are_cut_from_the_message() {
        let msg = "invalid input syntax for type integer: \"Jane Doe\"";
        let (m, r) = run(b'E', &[(b'C', "22P02"), (b'M', msg)]);
        assert_eq!(f(&m, b'M').unwrap(), "invalid input syntax for type integer: \"***\"");
        assert_eq!(r.message_hmac, Some(key().hash(msg.as_bytes())));
    }

    #[test]
    fn detectors_scrub_text_fields_of_notices() {
        let (m, r) = run(b'N', &[
            (b'S', "NOTICE"), (b'C', "00000"),
            (b'M', "patient ssn 123-45-6789 mail jane@example.org"),
            (b'H', "call 555-123-4567"),
            (b'W', "PL/pgSQL function f() line 3 at RAISE, MRN-0012345"),
            (b'q', "SELECT '123-45-6789'"),
        ]);
        assert_eq!(f(&m, b'M').unwrap(), "patient ssn [SSN] mail [EMAIL]");
        assert_eq!(f(&m, b'H').unwrap(), "call [PHONE]");
        assert_eq!(f(&m, b'W').unwrap(), "PL/pgSQL function f() line 3 at RAISE, [MRN]");
        assert_eq!(f(&m, b'q').unwrap(), "SELECT '[SSN]'");
        assert!(r.changed && r.message_hmac.is_some());
    }

    #[test]
    fn clean_messages_are_unchanged_and_unknown_fields_dropped() {
        let fields = [(b'S', "ERROR"), (b'C', "42P01"), (b'M', "relation \"nope\" does not exist"), (b'P', "15")];
        let (m, r) = run(b'E', &fields);
        assert_eq!(&m[5..], &body(&fields)[..]);
        assert_eq!(r, ScrubReport::default());
        let (m, r) = run(b'E', &[(b'C', "42P01"), (b'M', "m"), (b'Z', "future field 123-45-6789")]);
        assert_eq!(f(&m, b'Z'), None);
        assert_eq!(r.dropped_fields, vec![b'Z']);
    }

    #[test]
    fn malformed_is_an_error_and_fields_are_clipped() {
        assert!(scrubbed(b'E', b"Mabc", det(), key()).is_err());
        assert!(scrubbed(b'E', b"Mabc\0", det(), key()).is_err());
        assert!(scrubbed(b'E', b"Mabc\0\0x", det(), key()).is_err());
        assert!(scrubbed(b'D', b"\0", det(), key()).is_err());
        let long = "é".repeat(10_000);
        let (m, r) = run(b'N', &[(b'M', &long)]);
        assert!(m.len() < 4100);
        assert!(r.changed);
        assert!(f(&m, b'M').is_some());
    }

    #[test]
    fn names_from_the_dictionary_are_tagged_in_errors_and_notices() {
        use crate::masking::dictionary::Kind;
        let set = crate::masking::dictionary_set::test_set(&[(Kind::Name, "Daniel Harris"), (Kind::City, "Springfield")]);
        let d = Detectors::standard().with_dictionaries(set);
        let body = body(&[
            (b'S', "ERROR"), (b'C', "P0001"),
            (b'M', "patient Daniel Harris of Springfield has no chart"),
            (b'H', "ask harris"),
            (b't', "patients"),
        ]);
        let (m, r) = scrubbed(b'E', &body, &d, key()).unwrap();
        assert_eq!(f(&m, b'M').unwrap(), "patient [NAME] of [CITY] has no chart");
        assert_eq!(f(&m, b'H').unwrap(), "ask [NAME]");
        assert_eq!(f(&m, b't').as_deref(), Some("patients"));
        assert!(r.changed && r.message_hmac.is_some());
        // Scrubbing the scrubbed message changes nothing.
        let (again, _) = scrubbed(b'E', &m[5..], &d, key()).unwrap();
        assert_eq!(again, m);
    }

    proptest! {
        #[test]
        fn scrubbing_is_idempotent(msg in "[ -~]{0,60}", ssn in "[0-9]{3}-[0-9]{2}-[0-9]{4}", state in prop::sample::select(vec!["22P02", "23505", "P0001"])) {
            let m1 = format!("{msg} {ssn}");
            let d = format!("Key (x)=({ssn})");
            let (a, _) = run(b'E', &[(b'C', state), (b'M', &m1), (b'D', &d)]);
            prop_assert!(!String::from_utf8_lossy(&a).contains(&ssn));
            let (b, _) = scrubbed(b'E', &a[5..], det(), key()).unwrap();
            prop_assert_eq!(a, b);
        }
    }
}
