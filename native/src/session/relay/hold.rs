//! Holding a statement for approval: before a statement whose decision carries `approval` goes
//! upstream, ask the control plane (run, deny or hold); when held, tell the client at once with a
//! NoticeResponse, then wait without CPU for a person's decision, the client's cancel or
//! disconnect, the session's end or the data plane's own timeout.

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::bridge::RequestKind;
use crate::errors::{sqlstate, GateError};
use crate::protocol::messages::{error_response, extended::Bind};
use crate::protocol::stream::ReadPart;
use super::decision::refusal_sqlstate;
use super::Ctx;

/// Statement texts of the session kept for approvers ("earlier statements"), each cut to this.
const EARLIER_COUNT: usize = 10;
const EARLIER_BYTES: usize = 4096;
/// While held, the client is still read (to notice a disconnect) until this much is buffered;
/// then TCP back-pressure holds the client instead.
const HOLD_READ_LIMIT: usize = 1 << 20;
/// The data plane waits this much longer than the control plane's timeout before it gives up
/// on its own (the control plane answers its timeouts itself).
const OWN_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);
/// When neither the answer nor the decision says how long to wait.
const DEFAULT_TIMEOUT_MS: u64 = 15 * 60 * 1000;
/// The SQLSTATE of the notice a held statement's client gets ("statement held for approval").
const HELD_NOTICE: &str = "01A01";
const QUERY_CANCELED: &str = "57014";
/// A request id is the control plane's (a UUID); anything much longer is not one.
const MAX_REQUEST_ID: usize = 128;

/// The session's last statement texts, each cut to EARLIER_BYTES. The buffers are reused, so
/// after the first ten statements keeping one costs a copy of at most 4 KB and no allocation.
#[derive(Default)]
pub(super) struct Earlier {
    texts: VecDeque<Vec<u8>>,
}

impl Earlier {
    pub(super) fn push(&mut self, sql: &[u8]) {
        let mut slot = if self.texts.len() >= EARLIER_COUNT { self.texts.pop_front().unwrap_or_default() } else { Vec::new() };
        slot.clear();
        slot.extend_from_slice(&sql[..utf8_cut(sql, EARLIER_BYTES)]);
        self.texts.push_back(slot);
    }

    fn to_json(&self) -> Value {
        Value::Array(self.texts.iter().map(|t| Value::String(String::from_utf8_lossy(t).into_owned())).collect())
    }
}

/// The longest prefix of `s` of at most `max` bytes that does not end inside a UTF-8 sequence.
fn utf8_cut(s: &[u8], max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut end = max;
    while end > 0 && (s[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    end
}

/// A Bind's parameter values as approvers read them: text values as text, binary ones (and
/// text that is not UTF-8) as hex, NULL as null.
pub(crate) fn bound_values(bind: &Bind<'_>) -> Value {
    Value::Array(
        bind.values()
            .enumerate()
            .map(|(i, v)| {
                let Some(v) = v else { return Value::Null };
                let format = bind.format(i);
                match std::str::from_utf8(v) {
                    Ok(text) if format == 0 => json!({"format": 0, "value": text}),
                    _ => json!({"format": format, "hex": hex(v)}),
                }
            })
            .collect(),
    )
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The statement about to run, as the `approval` request names it.
pub(super) struct Statement<'a> {
    pub sql: &'a [u8],
    pub statement_name: Option<&'a [u8]>,
    pub protocol: &'static str,
    /// Its statement record's number.
    pub stmt: u64,
    /// Keyed hashes of its literals and of its bound parameters (JSON), as its record has them.
    pub literal_hashes: &'a [u8],
    pub parameter_hashes: Option<&'a [u8]>,
    /// The bound values in clear (approvers may see them): `bound_values`.
    pub parameters: Option<Value>,
    /// The decision's `approval`, passed back verbatim.
    pub approval: &'a Value,
}

/// The `approval` a statement asks with when its earlier run was cut at max_rows (its decision
/// needs none): the control plane runs it without the cap if an approver lifted it.
pub(super) fn max_rows_approval() -> Arc<Value> {
    Arc::new(json!({"rule": "max_rows", "mode": "return", "reason": "an earlier run was cut at max_rows"}))
}

/// What becomes of a statement that needed approval.
pub(super) enum Outcome {
    /// It goes upstream as it is; with the cap an approval set for this execution (None: the
    /// session's max_rows; Some(None): no cap).
    Run(Option<Option<u64>>),
    /// It is refused with this error (through a refusal marker: the session goes on).
    Refuse(GateError),
    /// The session ends with this error (the gateway is shutting down).
    Fatal(GateError),
    /// The client disconnected while it was held.
    Disconnected,
}

/// A `run` or `deny` answer, or a malformed one (fail closed).
fn verdict(answer: &Value, request: Option<&str>) -> Outcome {
    match answer.get("action").and_then(Value::as_str) {
        Some("run") => match answer.get("max_rows") {
            None => Outcome::Run(None),
            Some(Value::Null) => Outcome::Run(Some(None)),
            Some(v) => match v.as_u64().filter(|n| *n > 0) {
                Some(n) => Outcome::Run(Some(Some(n))),
                None => Outcome::Refuse(invalid_answer()),
            },
        },
        Some("deny") => {
            let text = |k: &str| answer.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
            let code = refusal_sqlstate(text("sqlstate").unwrap_or(sqlstate::INSUFFICIENT_PRIVILEGE));
            let message = match (text("message"), request) {
                (Some(m), _) => m.to_string(),
                (None, Some(id)) => format!("approval request {id} was denied"),
                (None, None) => "the statement needs an approval it cannot get".to_string(),
            };
            let mut err = GateError::error(code, message);
            err.hint = text("hint").map(str::to_string);
            err.detail = text("detail").map(str::to_string);
            // The control plane stopping answers held statements so: their sessions end.
            if code == sqlstate::ADMIN_SHUTDOWN {
                Outcome::Fatal(err.into_fatal())
            } else {
                Outcome::Refuse(err)
            }
        }
        _ => Outcome::Refuse(invalid_answer()),
    }
}

fn invalid_answer() -> GateError {
    GateError::error(sqlstate::SYSTEM_ERROR, "phigate's control plane gave an invalid approval answer; the statement was not run")
        .with_hint("Tell the gateway operator; details are in the gateway log.")
}

/// A `hold` answer: the request id, the notice for the client and how long to wait.
struct Hold {
    request: String,
    notice: Bytes,
    timeout: Duration,
}

fn parse_hold(answer: &Value, approval: &Value) -> Option<Hold> {
    let request = answer.get("request")?.as_str().filter(|r| !r.is_empty() && r.len() <= MAX_REQUEST_ID && !r.chars().any(char::is_control))?;
    let text = |k: &str| answer.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let message = match text("notice") {
        Some(n) => n.replace(['\r', '\n'], " "),
        None => format!("statement held for approval: request {request}"),
    };
    let timeout_ms = answer.get("timeout_ms").or_else(|| approval.get("timeout_ms")).and_then(Value::as_u64).unwrap_or(DEFAULT_TIMEOUT_MS);
    Some(Hold {
        request: request.to_string(),
        notice: error_response::notice(HELD_NOTICE, &message, text("hint")),
        timeout: Duration::from_millis(timeout_ms).saturating_add(OWN_TIMEOUT_MARGIN),
    })
}

/// Withdraws a held request unless disarmed; dropped with the session (killed, drained, the
/// upstream gone) it withdraws with reason `session_end`.
struct Withdraw<'a> {
    ctx: &'a Ctx,
    request: &'a str,
    armed: bool,
}

impl Withdraw<'_> {
    fn send(&mut self, reason: &str) {
        if std::mem::take(&mut self.armed) {
            self.ctx.core.bridge.tell(RequestKind::Withdraw, json!({"session": &*self.ctx.session, "request": self.request, "reason": reason}));
        }
    }
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.send("session_end");
        self.ctx.holding.store(false, Ordering::SeqCst);
    }
}

/// Asks whether `st` may run and, when it is held, waits for the decision. Earlier pipelined
/// messages must already be upstream; later ones wait (the caller does not read on). The client
/// is read into `buf` meanwhile, only to notice a disconnect.
pub(super) async fn hold(ctx: &Ctx, st: Statement<'_>, earlier: &Earlier, cr: &mut ReadPart, buf: &mut BytesMut) -> Outcome {
    // Enabled before asking, so a cancel sent while the control plane answers counts too.
    let cancelled = ctx.cancelled.notified();
    tokio::pin!(cancelled);
    cancelled.as_mut().enable();
    let parameter_hashes = st.parameter_hashes.and_then(|h| serde_json::from_slice::<Value>(h).ok());
    let payload = json!({
        "session": &*ctx.session, "stmt": st.stmt, "subject": ctx.identity.subject,
        "identity_class": &*ctx.identity.class, "target": ctx.target_name, "protocol": st.protocol,
        "sql": String::from_utf8_lossy(st.sql),
        "statement_name": st.statement_name.map(|n| String::from_utf8_lossy(n).into_owned()),
        "parameters": st.parameters,
        "literal_hashes": serde_json::from_slice::<Value>(st.literal_hashes).unwrap_or(Value::Null),
        "parameter_hashes": parameter_hashes,
        "approval": st.approval, "return_mode": ctx.return_mode, "earlier": earlier.to_json(), "peer": ctx.peer,
    });
    let timeout = ctx.settings.cfg.decision_timeout();
    let answer = match ctx.core.bridge.ask(RequestKind::Approval, payload, timeout).await {
        Ok(a) => a,
        Err(_) => {
            return Outcome::Refuse(GateError::error(sqlstate::SYSTEM_ERROR,
                format!("phigate's control plane did not answer within {} ms whether this statement may run; it was not run", timeout.as_millis()))
                .with_hint("Retry; if this persists, tell the gateway operator."));
        }
    };
    if answer.get("action").and_then(Value::as_str) != Some("hold") {
        return verdict(&answer, None);
    }
    let Some(held) = parse_hold(&answer, st.approval) else { return Outcome::Refuse(invalid_answer()) };
    ctx.notify_client(held.notice);
    // From now until it is decided, a cancel is the gateway's alone (session::cancel).
    ctx.holding.store(true, Ordering::SeqCst);
    let mut withdraw = Withdraw { ctx, request: &held.request, armed: true };
    let decided = ctx.core.bridge.ask_later(RequestKind::AwaitApproval, json!({"session": &*ctx.session, "request": &held.request}));
    tokio::pin!(decided);
    let expired = tokio::time::sleep(held.timeout);
    tokio::pin!(expired);
    // A session whose token expires while it waits is closed then, as it would be at its next
    // statement (only identities whose source closes sessions on expiry have `expires_at`).
    let token_left = ctx.identity.expires_at.map(|at| at.duration_since(std::time::SystemTime::now()).unwrap_or_default());
    let token_expired = async move {
        match token_left {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(token_expired);
    loop {
        tokio::select! {
            answer = &mut decided => {
                withdraw.armed = false;
                return match answer {
                    Ok(a) if a.get("action").and_then(Value::as_str) != Some("hold") => verdict(&a, Some(&held.request)),
                    Ok(_) => Outcome::Refuse(invalid_answer()),
                    // The control plane dropped it (a crash in its handler): fail closed.
                    Err(_) => Outcome::Refuse(GateError::error(sqlstate::SYSTEM_ERROR,
                        format!("phigate's control plane lost approval request {}; the statement was not run", held.request))
                        .with_hint("Retry; if this persists, tell the gateway operator.")),
                };
            }
            _ = &mut cancelled => {
                withdraw.send("cancel");
                return Outcome::Refuse(GateError::error(QUERY_CANCELED, "canceling statement due to user request")
                    .with_detail(format!("Approval request {} was withdrawn.", held.request)));
            }
            _ = &mut token_expired => {
                withdraw.send("token_expired");
                return Outcome::Fatal(GateError::fatal(sqlstate::INVALID_PASSWORD,
                    format!("your access token expired while approval request {} waited; this session is closed", held.request))
                    .with_hint("Reconnect with a fresh token and run the statement again."));
            }
            _ = &mut expired => {
                withdraw.send("timeout");
                return Outcome::Refuse(GateError::error(QUERY_CANCELED, format!("approval request {} timed out; nobody decided", held.request))
                    .with_hint("Ask an approver to decide sooner, then run the statement again."));
            }
            r = cr.read_into(buf), if buf.len() < HOLD_READ_LIMIT => match r {
                Ok(0) | Err(_) => {
                    withdraw.send("disconnect");
                    return Outcome::Disconnected;
                }
                Ok(n) => {
                    ctx.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_keeps_the_last_ten_cut_at_a_character() {
        let mut e = Earlier::default();
        for i in 0..25 {
            e.push(format!("select {i}").as_bytes());
        }
        let texts = e.to_json();
        let texts: Vec<&str> = texts.as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(texts, (15..25).map(|i| format!("select {i}")).collect::<Vec<_>>());
        let long = "é".repeat(3000);
        e.push(long.as_bytes());
        let last = e.to_json().as_array().unwrap().last().unwrap().as_str().unwrap().to_string();
        assert_eq!(last, "é".repeat(2048));
        assert_eq!(e.texts.len(), EARLIER_COUNT);
    }

    #[test]
    fn answers_are_read_or_refused() {
        let approval = json!({"timeout_ms": 1000});
        assert!(matches!(verdict(&json!({"action": "run", "max_rows": null}), None), Outcome::Run(Some(None))));
        match verdict(&json!({"action": "deny", "sqlstate": "42501", "message": "denied by x", "hint": "h"}), Some("r1")) {
            Outcome::Refuse(e) => assert_eq!((e.sqlstate, e.message.as_str(), e.hint.as_deref()), ("42501", "denied by x", Some("h"))),
            _ => panic!("a deny refuses"),
        }
        match verdict(&json!({"action": "deny"}), Some("r1")) {
            Outcome::Refuse(e) => assert_eq!((e.sqlstate, e.message.as_str()), ("42501", "approval request r1 was denied")),
            _ => panic!("a deny refuses"),
        }
        // A warning class or garbage is no refusal code: 42501.
        match verdict(&json!({"action": "deny", "sqlstate": "01A01", "message": "m"}), None) {
            Outcome::Refuse(e) => assert_eq!(e.sqlstate, "42501"),
            _ => panic!("a deny refuses"),
        }
        assert!(matches!(verdict(&json!({"action": "deny", "sqlstate": "57P01", "message": "m"}), None), Outcome::Fatal(e) if e.is_fatal()));
        for bad in [json!({}), json!({"action": "allow"}), json!({"action": 1})] {
            assert!(matches!(verdict(&bad, None), Outcome::Refuse(e) if e.sqlstate == sqlstate::SYSTEM_ERROR), "{bad}");
        }
        let h = parse_hold(&json!({"action": "hold", "request": "r-1", "notice": "held\nwaiting", "timeout_ms": 500}), &approval).unwrap();
        assert_eq!(h.timeout, Duration::from_millis(500) + OWN_TIMEOUT_MARGIN);
        assert_eq!(error_response::field(&h.notice[5..], b'C'), Some(&b"01A01"[..]));
        assert_eq!(error_response::field(&h.notice[5..], b'M'), Some(&b"held waiting"[..]));
        assert_eq!(h.notice[0], b'N');
        // The decision's timeout when the answer has none.
        assert_eq!(parse_hold(&json!({"request": "r"}), &approval).unwrap().timeout, Duration::from_millis(1000) + OWN_TIMEOUT_MARGIN);
        for bad in [json!({}), json!({"request": ""}), json!({"request": 5}), json!({"request": "a\u{0}b"}), json!({"request": "x".repeat(200)})] {
            assert!(parse_hold(&bad, &approval).is_none(), "{bad}");
        }
    }

    #[test]
    fn bound_values_by_format() {
        // Bind: portal "", statement "s", formats [0, 1, 0], values "ab", 0x00ff and NULL, no result formats.
        let mut body = b"\0s\0".to_vec();
        body.extend_from_slice(&3i16.to_be_bytes());
        for f in [0i16, 1, 0] {
            body.extend_from_slice(&f.to_be_bytes());
        }
        body.extend_from_slice(&3i16.to_be_bytes());
        for v in [Some(&b"ab"[..]), Some(&[0u8, 0xff][..]), None] {
            match v {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        let bind = crate::protocol::messages::extended::bind(&body).unwrap();
        assert_eq!(bound_values(&bind), json!([{"format": 0, "value": "ab"}, {"format": 1, "hex": "00ff"}, null]));
    }
}
