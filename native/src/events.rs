//! Per-statement events formatted straight into JSON bytes: these are on the hot path (one or two
//! per statement), so they skip building a serde_json::Value tree. Strings are escaped by serde_json.

use std::io::Write;
use std::sync::OnceLock;

/// Client-chosen text (a startup user name, an application_name) as the events log may hold it:
/// a keyed hash under a key drawn at each start, so equal names can be correlated within one
/// run but the log holds no text a client typed (it may be a patient's name) and the hash cannot
/// be reversed by guessing names offline.
pub fn client_label(s: &str) -> String {
    if s.is_empty() {
        return String::new(); // nothing was sent: nothing to hide
    }
    keyed_hash(s.as_bytes())
}

/// `hmac:` and 16 hex digits of HMAC-SHA256 under a key drawn at each start: text that may hold
/// PHI (client-typed names, error details the gateway withheld) as the events log may hold it.
/// Equal inputs correlate within one run; a low-entropy input (an SSN in a constraint detail)
/// cannot be recovered by hashing candidates offline, as a plain SHA-256 would allow.
pub fn keyed_hash(data: &[u8]) -> String {
    static KEY: OnceLock<ring::hmac::Key> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let bytes: [u8; 32] = rand::random();
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes)
    });
    let tag = ring::hmac::sign(key, data);
    let mut out = String::with_capacity(21);
    out.push_str("hmac:");
    for b in &tag.as_ref()[..8] {
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
    }
    out
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes quotes, backslashes and control characters.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A startup parameter the gateway did not forward, as the events log may name it: the well-known
/// names drivers send as they are, any other name (a client may send any) as a keyed hash.
pub fn parameter_label(name: &str) -> String {
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
        client_label(name)
    }
}

/// `{"ts":…,"event":"statement","session_id":…,"decision":…,"cached":…,"protocol":…,"normalized":…}`
pub fn statement(session_id: u64, allowed: bool, cached: bool, protocol: &str, normalized: Option<&str>) -> Vec<u8> {
    let mut o = Vec::with_capacity(160 + normalized.map_or(0, str::len));
    let _ = write!(
        o,
        r#"{{"ts":"{}","event":"statement","session_id":{},"decision":"{}","cached":{},"protocol":"{}","normalized":"#,
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
        r#"{{"ts":"{}","event":"result","session_id":{},"rows":{},"bytes":{},"duration_ms":{:.3},"error":"#,
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

    #[test]
    fn client_labels_are_keyed_hashes() {
        let a = super::client_label("someone");
        assert_eq!(a, super::client_label("someone"));
        assert_ne!(a, super::client_label("someone else"));
        assert!(a.starts_with("hmac:") && a.len() == 21 && !a.contains("someone"));
        assert_eq!(super::client_label(""), "");
        assert_eq!(super::parameter_label("DateStyle"), "DateStyle");
        assert!(super::parameter_label("someone").starts_with("hmac:"));
    }
}
