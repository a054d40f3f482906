//! Canonical JSON for record bodies: sorted keys (serde_json's Map is a BTreeMap: this crate
//! does not enable `preserve_order`), no whitespace, serde_json's escaping — which is byte for
//! byte Python's `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)` — and
//! no floats, which the two languages would print differently.

use serde_json::{Map, Value};

/// A body that could not be taken as it came.
#[derive(Debug, PartialEq, Eq)]
pub enum Problem {
    /// Not a JSON object at all: the body is replaced by a `bad_record` record saying so.
    NotAnObject(String),
}

/// The canonical bytes of a record body, and the paths of float values that were written as
/// strings instead (an error for the producer to fix, never a reason to lose the record).
pub fn canonicalize(body: &[u8]) -> Result<(Vec<u8>, Vec<String>), Problem> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Problem::NotAnObject(format!("not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(Problem::NotAnObject("not a JSON object".into()));
    };
    let mut floats = vec![];
    let map = replace_floats(map, "", &mut floats);
    // serde_json cannot fail to serialize a Value.
    Ok((serde_json::to_vec(&Value::Object(map)).unwrap_or_default(), floats))
}

fn replace_floats(map: Map<String, Value>, path: &str, floats: &mut Vec<String>) -> Map<String, Value> {
    map.into_iter()
        .map(|(k, v)| {
            let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            (k, replace_value(v, &p, floats))
        })
        .collect()
}

fn replace_value(v: Value, path: &str, floats: &mut Vec<String>) -> Value {
    match v {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => {
            floats.push(path.to_string());
            Value::String(n.to_string())
        }
        Value::Object(m) => Value::Object(replace_floats(m, path, floats)),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| replace_value(x, path, floats)).collect()),
        other => other,
    }
}

/// Whether `body` is already exactly its canonical form (for producers that promise it).
pub fn is_canonical(body: &[u8]) -> bool {
    matches!(canonicalize(body), Ok((c, floats)) if floats.is_empty() && c == body)
}

/// The event type of a canonical body, for messages about it (never its values).
pub fn event_name(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("event").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_keys_and_strips_whitespace() {
        let (c, f) = canonicalize(br#"{ "ts": "t", "event": "x", "a": {"z": 1, "b": [true, null]} }"#).unwrap();
        assert_eq!(c, br#"{"a":{"b":[true,null],"z":1},"event":"x","ts":"t"}"#);
        assert!(f.is_empty());
        assert!(is_canonical(&c));
        assert!(!is_canonical(br#"{"b":1,"a":2}"#));
    }

    #[test]
    fn escapes_like_python() {
        // json.dumps({"k": "\"\\\b\f\n\r\t\x01\x7f é ✓"}, ensure_ascii=False, separators=(",",":"))
        let (c, _) = canonicalize("{\"k\":\"\\\"\\\\\\b\\f\\n\\r\\t\\u0001\u{7f} é ✓\"}".as_bytes()).unwrap();
        assert_eq!(std::str::from_utf8(&c).unwrap(), "{\"k\":\"\\\"\\\\\\b\\f\\n\\r\\t\\u0001\u{7f} é ✓\"}");
        let (c, _) = canonicalize(br#"{"k":"\u00e9\u001F"}"#).unwrap();
        assert_eq!(std::str::from_utf8(&c).unwrap(), "{\"k\":\"é\\u001f\"}");
    }

    #[test]
    fn floats_become_strings_and_are_reported() {
        let (c, f) = canonicalize(br#"{"ts":1.5,"n":[2.25,3],"o":{"d":1e3}}"#).unwrap();
        assert_eq!(c, br#"{"n":["2.25",3],"o":{"d":"1000.0"},"ts":"1.5"}"#);
        assert_eq!(f, vec!["n", "o.d", "ts"]);
    }

    #[test]
    fn non_objects_are_problems() {
        assert!(matches!(canonicalize(b"[1]"), Err(Problem::NotAnObject(_))));
        assert!(matches!(canonicalize(b"{\"a\":"), Err(Problem::NotAnObject(_))));
        assert_eq!(event_name(br#"{"event":"statement"}"#), "statement");
    }
}
