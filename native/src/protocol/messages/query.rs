//! Reading statement text out of Query and Parse (F) messages.

use crate::protocol::framing::{read_cstr, read_i16};

/// The SQL text of a Query body (must be exactly one NUL-terminated string).
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    let mut pos = 0;
    let sql = read_cstr(body, &mut pos)?;
    (pos == body.len()).then_some(sql)
}

/// Statement name and SQL text of a Parse body; the parameter type list is validated for length.
pub fn parse_fields(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut pos = 0;
    let name = read_cstr(body, &mut pos)?;
    let sql = read_cstr(body, &mut pos)?;
    let n = read_i16(body, &mut pos)?;
    if n < 0 || body.len() != pos + 4 * n as usize {
        return None;
    }
    Some((name, sql))
}

/// The parameter-type part of a Parse body (Int16 count + Int32 OIDs), after name and text.
pub fn parse_param_types<'a>(body: &'a [u8], name: &[u8], sql: &[u8]) -> &'a [u8] {
    &body[name.len() + 1 + sql.len() + 1..]
}

/// The rows count of a CommandComplete tag ("SELECT 5", "INSERT 0 3", "COPY 10").
pub fn command_rows(body: &[u8]) -> u64 {
    let mut pos = 0;
    let Some(tag) = read_cstr(body, &mut pos) else { return 0 };
    let last = tag.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
    std::str::from_utf8(last).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parse_and_query() {
        assert_eq!(query_text(b"select 1\0"), Some(&b"select 1"[..]));
        assert_eq!(query_text(b"select 1\0junk"), None);
        let mut p = b"s1\0select $1\0".to_vec();
        p.extend_from_slice(&1i16.to_be_bytes());
        p.extend_from_slice(&23i32.to_be_bytes());
        assert_eq!(parse_fields(&p), Some((&b"s1"[..], &b"select $1"[..])));
        p.pop();
        assert_eq!(parse_fields(&p), None);
        assert_eq!(command_rows(b"INSERT 0 3\0"), 3);
        assert_eq!(command_rows(b"BEGIN\0"), 0);
    }
}
