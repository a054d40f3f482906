//! ErrorResponse / NoticeResponse (B): building the gateway's own, and reading fields of upstream ones.

use super::{put_cstr, put_message};
use bytes::{BufMut, Bytes, BytesMut};

/// Longest text we put in one field: libpq drops messages over 30,000 bytes of other types, and
/// ErrorResponse bodies this size are never useful.
const MAX_FIELD: usize = 4000;

/// `s` cut to MAX_FIELD bytes at a character boundary.
pub fn clip(s: &str) -> &str {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn clean(s: &str) -> Vec<u8> {
    // A NUL would end the field early and let the rest be read as a new field.
    clip(s).bytes().filter(|&b| b != 0).collect()
}

/// Builds an ErrorResponse with severity, SQLSTATE, message and optional detail/hint.
pub fn build(severity: &str, sqlstate: &str, message: &str, detail: Option<&str>, hint: Option<&str>) -> Bytes {
    build_tagged(b'E', severity, sqlstate, message, detail, hint)
}

/// Builds a NoticeResponse (severity NOTICE) with SQLSTATE, message and optional hint.
pub fn notice(sqlstate: &str, message: &str, hint: Option<&str>) -> Bytes {
    build_tagged(b'N', "NOTICE", sqlstate, message, None, hint)
}

fn build_tagged(tag: u8, severity: &str, sqlstate: &str, message: &str, detail: Option<&str>, hint: Option<&str>) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + message.len());
    put_message(&mut out, tag, |o| {
        o.put_u8(b'S');
        put_cstr(o, severity.as_bytes());
        o.put_u8(b'V');
        put_cstr(o, severity.as_bytes());
        o.put_u8(b'C');
        put_cstr(o, sqlstate.as_bytes());
        o.put_u8(b'M');
        put_cstr(o, &clean(message));
        if let Some(d) = detail {
            o.put_u8(b'D');
            put_cstr(o, &clean(d));
        }
        if let Some(h) = hint {
            o.put_u8(b'H');
            put_cstr(o, &clean(h));
        }
        o.put_u8(0);
    });
    out.freeze()
}

/// Returns the value of field `code` in an ErrorResponse/NoticeResponse body.
pub fn field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut pos = 0;
    while pos < body.len() {
        let c = body[pos];
        if c == 0 {
            return None;
        }
        pos += 1;
        let val = crate::protocol::framing::read_cstr(body, &mut pos)?;
        if c == code {
            return Some(val);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_fields() {
        let m = build("ERROR", "42501", "no\0pe", Some("d"), Some("h"));
        let body = &m[5..];
        assert_eq!(field(body, b'C'), Some(&b"42501"[..]));
        assert_eq!(field(body, b'M'), Some(&b"nope"[..]));
        assert_eq!(field(body, b'H'), Some(&b"h"[..]));
        assert_eq!(field(body, b'X'), None);
        let len = u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
        assert_eq!(len + 1, m.len());
    }

    #[test]
    fn notices_are_notice_severity_and_clipped() {
        let long = "x".repeat(MAX_FIELD + 10);
        let m = notice("01M01", &long, Some("h"));
        assert_eq!(m[0], b'N');
        let body = &m[5..];
        assert_eq!(field(body, b'S'), Some(&b"NOTICE"[..]));
        assert_eq!(field(body, b'V'), Some(&b"NOTICE"[..]));
        assert_eq!(field(body, b'C'), Some(&b"01M01"[..]));
        assert_eq!(field(body, b'M').map(<[u8]>::len), Some(MAX_FIELD));
        assert_eq!(field(body, b'H'), Some(&b"h"[..]));
    }
}
