//! The control plane's statement decision as the relay reads it: fail closed on anything else.

use bytes::Bytes;
use std::sync::Arc;

use crate::cache::{Action, Decision, Reuse};
use crate::errors::sqlstate;

/// SQLSTATEs are 5 ASCII alphanumerics; anything else from the control plane becomes 42501.
pub(super) fn leak_sqlstate(s: &str) -> &'static str {
    const KNOWN: &[&str] = &["42501", "42601", "0A000", "57014", "58000", "54000", "22021", "25006", "28000", "3D000"];
    KNOWN.iter().find(|k| **k == s).copied().unwrap_or(sqlstate::INSUFFICIENT_PRIVILEGE)
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
    Some(Decision { action, reuse, normalized, rewritten, protected, origins, copy_columns })
}
