//! The control plane's statement decision as the relay reads it: fail closed on anything else.

use bytes::Bytes;
use std::sync::Arc;

use crate::cache::{Action, AuditFacts, Decision, Notice, Reuse};
use crate::errors::sqlstate;
use crate::protocol::messages::error_response;

/// Notices one decision may carry (one per relation a statement reads, and a few more): more
/// is not a decision the control plane makes.
const MAX_NOTICES: usize = 1024;

/// Distinct refusal SQLSTATEs kept (the control plane uses a handful); past this, 42501.
const REFUSAL_CODES_MAX: usize = 64;

/// The SQLSTATE of a refusal from the control plane, as the client gets it: five characters
/// [0-9A-Z] of an error class (not 00 success, 01 warning, 02 no data) pass as they are, so a
/// new refusal needs no change here; anything else becomes 42501 (fail closed). `GateError`
/// holds a `&'static str`, so each distinct code is interned once (refusals only, never rows).
pub(super) fn refusal_sqlstate(s: &str) -> &'static str {
    let b = s.as_bytes();
    let shaped = b.len() == 5 && b.iter().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase());
    if !shaped || matches!(&b[..2], b"00" | b"01" | b"02") {
        return sqlstate::INSUFFICIENT_PRIVILEGE;
    }
    static INTERNED: parking_lot::Mutex<Vec<&'static str>> = parking_lot::Mutex::new(Vec::new());
    let mut seen = INTERNED.lock();
    if let Some(k) = seen.iter().find(|k| **k == s) {
        return k;
    }
    if seen.len() >= REFUSAL_CODES_MAX {
        return sqlstate::INSUFFICIENT_PRIVILEGE;
    }
    let k: &'static str = Box::leak(s.to_owned().into_boxed_str());
    seen.push(k);
    k
}

pub(super) fn parse_decision(a: &serde_json::Value) -> Option<Decision> {
    let action = match a.get("action")?.as_str()? {
        "allow" => Action::Allow,
        "deny" => Action::Deny {
            sqlstate: a.get("sqlstate").and_then(|v| v.as_str()).unwrap_or("42501").to_string(),
            message: a.get("message").and_then(|v| v.as_str()).unwrap_or("statement refused by gateway policy").to_string(),
            hint: a.get("hint").and_then(|v| v.as_str()).map(str::to_string),
        },
        _ => return None,
    };
    let reuse = match a.get("cache").and_then(|v| v.as_str()).unwrap_or("none") {
        "exact" => Reuse::Exact,
        "normalized" => Reuse::Normalized,
        _ => Reuse::None,
    };
    let normalized = a.get("normalized").and_then(|v| v.as_str()).map(Arc::from);
    let rewritten = match a.get("rewrite") {
        None | Some(serde_json::Value::Null) => None,
        // A rewrite with a NUL would cut the statement short upstream: refuse the answer.
        Some(v) => Some(Bytes::copy_from_slice(v.as_str().filter(|r| !r.is_empty() && !r.contains('\0'))?.as_bytes())),
    };
    // Absent means "reads nothing protected" only for statements that were not rewritten.
    let protected = a.get("protected").and_then(|v| v.as_bool()).unwrap_or(rewritten.is_some());
    let origins = match a.get("origins") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v.as_array()?.iter().map(|o| o.as_u64().and_then(|o| u32::try_from(o).ok())).collect::<Option<Arc<[u32]>>>()?),
    };
    let copy_columns = match a.get("copy_columns") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_array()?
                .iter()
                .map(|c| {
                    let c = c.as_array().filter(|c| c.len() == 3)?;
                    let num = |i: usize| c[i].as_u64();
                    Some((u32::try_from(num(0)?).ok()?, i16::try_from(num(1)?).ok()?, u32::try_from(num(2)?).ok()?))
                })
                .collect::<Option<Arc<[(u32, i16, u32)]>>>()?,
        ),
    };
    let notices = match a.get("notices") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let list = v.as_array().filter(|l| l.len() <= MAX_NOTICES)?;
            let parsed = list.iter().map(parse_notice).collect::<Option<Arc<[Notice]>>>()?;
            (!parsed.is_empty()).then_some(parsed)
        }
    };
    let subject_relations = match a.get("subject_relations") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let list = v.as_array().filter(|l| l.len() <= MAX_NOTICES)?;
            let names = list.iter().map(|n| n.as_str().filter(|s| !s.is_empty()).map(Arc::from)).collect::<Option<Arc<[Arc<str>]>>>()?;
            (!names.is_empty()).then_some(names)
        }
    };
    // The statement record's facts; a decision without them (an internal refusal) records
    // none, a malformed one is refused like any malformed answer.
    let facts = match a.get("audit") {
        None | Some(serde_json::Value::Null) => AuditFacts::default(),
        Some(f) => AuditFacts::from_answer(f)?,
    };
    // Both or neither (CLOSE ALL: no name); a name with a NUL or an unknown operation refuses
    // the decision.
    let cursor = match (a.get("cursor"), a.get("cursor_op")) {
        (None | Some(serde_json::Value::Null), None | Some(serde_json::Value::Null)) => None,
        (None | Some(serde_json::Value::Null), Some(op)) if op.as_str() == Some("close_all") => {
            Some((Arc::from(""), Arc::from("close_all")))
        }
        (Some(n), Some(op)) => {
            let name = n.as_str().filter(|n| !n.is_empty() && !n.contains('\0'))?;
            let op = op.as_str().filter(|op| matches!(*op, "declare" | "fetch" | "move" | "close"))?;
            Some((Arc::from(name), Arc::from(op)))
        }
        _ => return None,
    };
    // Held for approval at each execution; anything but an object is a malformed answer.
    let approval = match a.get("approval") {
        None | Some(serde_json::Value::Null) => None,
        Some(v @ serde_json::Value::Object(_)) if matches!(action, Action::Allow) => Some(Arc::new(v.clone())),
        // On a refusal it would change nothing: the statement never runs.
        Some(serde_json::Value::Object(_)) => None,
        Some(_) => return None,
    };
    Some(Decision { action, reuse, normalized, rewritten, protected, origins, copy_columns, notices, subject_relations, facts: Arc::new(facts), cursor, approval })
}

/// One entry of a decision's `notices`: `{"key", "code", "message", "hint"}`, prebuilt as the
/// NoticeResponse the client gets. None (the whole decision is refused) unless the code is a
/// warning-class SQLSTATE (01xxx) and the texts hold no NUL.
fn parse_notice(n: &serde_json::Value) -> Option<Notice> {
    let text = |k: &str| -> Option<Option<&str>> {
        match n.get(k) {
            None | Some(serde_json::Value::Null) => Some(None),
            Some(v) => Some(Some(v.as_str().filter(|s| !s.is_empty() && !s.contains('\0'))?)),
        }
    };
    let code = n.get("code")?.as_str()?;
    let valid_code = code.len() == 5 && code.starts_with("01") && code.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
    if !valid_code {
        return None;
    }
    let message = text("message")??;
    let hint = text("hint")?;
    let key = text("key")?.map(Arc::from);
    Some(Notice { key, message: error_response::notice(code, message, hint) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allow(notices: serde_json::Value) -> Option<Decision> {
        parse_decision(&json!({"action": "allow", "cache": "exact", "notices": notices}))
    }

    #[test]
    fn notices_become_notice_responses() {
        let d = allow(json!([
            {"key": "public.patients", "code": "01M01", "message": "masked: ssn", "hint": "SHOW phigate.masking"},
            {"key": null, "code": "01M02", "message": "compared masked"},
        ]))
        .unwrap();
        let n = d.notices.unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].key.as_deref(), Some("public.patients"));
        assert_eq!(n[0].message[0], b'N');
        let body = &n[0].message[5..];
        assert_eq!(error_response::field(body, b'C'), Some(&b"01M01"[..]));
        assert_eq!(error_response::field(body, b'M'), Some(&b"masked: ssn"[..]));
        assert_eq!(error_response::field(body, b'H'), Some(&b"SHOW phigate.masking"[..]));
        assert_eq!(n[1].key, None);
        assert_eq!(error_response::field(&n[1].message[5..], b'H'), None);
        // None, null and an empty list all mean no notice.
        assert!(allow(json!([])).unwrap().notices.is_none());
        assert!(allow(serde_json::Value::Null).unwrap().notices.is_none());
        assert!(parse_decision(&json!({"action": "allow"})).unwrap().notices.is_none());
    }

    #[test]
    fn a_malformed_notice_fails_the_whole_decision() {
        for bad in [
            json!("01M01"),
            json!([{"code": "01M01"}]),
            json!([{"code": "01M01", "message": ""}]),
            json!([{"code": "01M01", "message": 5}]),
            json!([{"code": "01M01", "message": "a\u{0}b"}]),
            json!([{"code": "42501", "message": "m"}]),
            json!([{"code": "01m01", "message": "m"}]),
            json!([{"code": "01M0", "message": "m"}]),
            json!([{"code": "01M01", "message": "m", "key": 3}]),
            json!([{"code": "01M01", "message": "m", "key": ""}]),
            json!([{"code": "01M01", "message": "m", "hint": ["h"]}]),
            json!([{"code": "01M01", "message": "m"}, 7]),
            json!((0..=MAX_NOTICES).map(|_| json!({"code": "01M01", "message": "m"})).collect::<Vec<_>>()),
        ] {
            assert!(allow(bad.clone()).is_none(), "{bad}");
        }
    }

    #[test]
    fn audit_facts_are_rendered_or_refused() {
        let d = parse_decision(&json!({"action": "allow", "audit": {"kind": "select", "rule": "role:a allow select",
            "relations": ["public.t"], "columns_read": ["public.t.b", "public.t.a"], "columns_written": [],
            "masking": {"by": "layer2", "columns": {"public.t.b": "redact", "public.t.a": "year"}}}})).unwrap();
        let f = &d.facts;
        assert_eq!(&*f.kind, br#""select""#);
        assert_eq!(&*f.columns_read, br#"["public.t.b","public.t.a"]"#);
        // Keys sorted: the record is canonical as it is.
        assert_eq!(&*f.masking, br#"{"by":"layer2","columns":{"public.t.a":"year","public.t.b":"redact"}}"#);
        assert_eq!(parse_decision(&json!({"action": "deny"})).unwrap().facts.rule.as_ref(), b"null");
        for bad in [
            json!({"kind": 3}), json!({"rule": ["x"]}), json!({"relations": [1]}), json!({"columns_read": "a"}),
            json!({"masking": {"by": "other"}}), json!({"masking": {"columns": {"a": 1}}}), json!({"masking": []}),
        ] {
            assert!(parse_decision(&json!({"action": "allow", "audit": bad.clone()})).is_none(), "{bad}");
        }
    }

    #[test]
    fn cursor_operations_are_read_or_refused() {
        let d = parse_decision(&json!({"action": "allow", "cursor": "c1", "cursor_op": "fetch"})).unwrap();
        assert_eq!(d.cursor.as_ref().map(|(n, op)| (&**n, &**op)), Some(("c1", "fetch")));
        assert!(parse_decision(&json!({"action": "allow", "cursor": null, "cursor_op": null})).unwrap().cursor.is_none());
        let all = parse_decision(&json!({"action": "allow", "cursor": null, "cursor_op": "close_all"})).unwrap();
        assert_eq!(all.cursor.as_ref().map(|(_, op)| &**op), Some("close_all"));
        for bad in [json!({"cursor": "c"}), json!({"cursor_op": "fetch"}), json!({"cursor": "c", "cursor_op": "rewind"}),
            json!({"cursor": "", "cursor_op": "fetch"}), json!({"cursor": 3, "cursor_op": "fetch"})] {
            let mut a = bad.clone();
            a["action"] = json!("allow");
            assert!(parse_decision(&a).is_none(), "{bad}");
        }
    }

    #[test]
    fn approval_is_kept_verbatim_or_the_decision_refused() {
        let approval = json!({"rule": "write", "role": "agents", "reason": "writes need approval", "mode": "hold",
            "timeout_ms": 900000, "extra": [1, {"nested": true}]});
        let d = parse_decision(&json!({"action": "allow", "cache": "exact", "approval": approval.clone()})).unwrap();
        assert_eq!(d.approval.as_deref(), Some(&approval));
        assert!(parse_decision(&json!({"action": "allow"})).unwrap().approval.is_none());
        assert!(parse_decision(&json!({"action": "allow", "approval": null})).unwrap().approval.is_none());
        // A refusal never runs, so it is never held.
        assert!(parse_decision(&json!({"action": "deny", "approval": approval})).unwrap().approval.is_none());
        for bad in [json!("write"), json!(["write"]), json!(true), json!(1)] {
            assert!(parse_decision(&json!({"action": "allow", "approval": bad.clone()})).is_none(), "{bad}");
        }
    }

    #[test]
    fn refusal_sqlstates_pass_when_well_formed_errors() {
        for code in ["42501", "3D000", "42704", "0A000", "58000", "57014", "XX000"] {
            assert_eq!(refusal_sqlstate(code), code);
        }
        assert!(std::ptr::eq(refusal_sqlstate("42704"), refusal_sqlstate("42704")), "interned once");
        // Not an error class, or not a SQLSTATE at all: fail closed.
        for bad in ["00000", "01M01", "02000", "4250", "425011", "42a01", "42 01", "", "é4250"] {
            assert_eq!(refusal_sqlstate(bad), "42501", "{bad:?}");
        }
    }
}
