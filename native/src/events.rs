//! Per-statement events formatted straight into JSON bytes: these are on the hot path (one or two
//! per statement), so they skip building a serde_json::Value tree. Strings are escaped by serde_json.

use std::io::Write;

fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes quotes, backslashes and control characters.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `{"ts":…,"event":"statement","session_id":…,"decision":…,"cached":…,"protocol":…,"normalized":…}`
pub fn statement(session_id: u64, allowed: bool, cached: bool, protocol: &str, normalized: Option<&str>) -> Vec<u8> {
    let mut o = Vec::with_capacity(160 + normalized.map_or(0, str::len));
    let _ = write!(
        o,
        r#"{{"ts":{:.6},"event":"statement","session_id":{},"decision":"{}","cached":{},"protocol":"{}","normalized":"#,
        crate::bridge::now_ts(),
        session_id,
        if allowed { "allow" } else { "deny" },
        cached,
        protocol
    );
    match normalized {
        Some(n) => json_str(&mut o, n),
        None => o.extend_from_slice(b"null"),
    }
    o.push(b'}');
    o
}

/// `{"ts":…,"event":"result","session_id":…,"rows":…,"bytes":…,"duration_ms":…,"error":…}`
pub fn result(session_id: u64, rows: u64, bytes: u64, duration_ms: f64, error: Option<&str>) -> Vec<u8> {
    let mut o = Vec::with_capacity(140);
    let _ = write!(
        o,
        r#"{{"ts":{:.6},"event":"result","session_id":{},"rows":{},"bytes":{},"duration_ms":{:.3},"error":"#,
        crate::bridge::now_ts(),
        session_id,
        rows,
        bytes,
        duration_ms
    );
    match error {
        Some(e) => json_str(&mut o, e),
        None => o.extend_from_slice(b"null"),
    }
    o.push(b'}');
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_are_valid_json() {
        let s = super::statement(7, true, false, "simple", Some("select \"x\"\n$1"));
        let v: serde_json::Value = serde_json::from_slice(&s).unwrap();
        assert_eq!(v["normalized"], "select \"x\"\n$1");
        assert_eq!(v["decision"], "allow");
        let r = super::result(7, 3, 10, 0.5, Some("42501"));
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        assert_eq!((v["rows"].as_u64(), v["error"].as_str()), (Some(3), Some("42501")));
        let r = super::result(7, 0, 0, 0.0, None);
        assert!(serde_json::from_slice::<serde_json::Value>(&r).unwrap()["error"].is_null());
    }
}
