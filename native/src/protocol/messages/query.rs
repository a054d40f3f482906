//! Reading statement text out of Query (F) messages and row counts out of CommandComplete (B).

use crate::protocol::framing::read_cstr;

/// The SQL text of a Query body (must be exactly one NUL-terminated string).
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    let mut pos = 0;
    let sql = read_cstr(body, &mut pos)?;
    (pos == body.len()).then_some(sql)
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
        assert_eq!(command_rows(b"INSERT 0 3\0"), 3);
        assert_eq!(command_rows(b"BEGIN\0"), 0);
    }
}
