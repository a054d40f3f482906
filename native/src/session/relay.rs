//! The relay: after startup, moves bytes both ways. Client→upstream cuts every message, judges
//! statements (decision cache first, the control plane on a miss) and forwards; upstream→client
//! streams results through untouched except the few message types it must see.
//!
//! Refusals keep PostgreSQL's exact error semantics by letting PostgreSQL produce the error: a
//! refused statement is replaced by a per-session marker that fails to parse upstream, and the
//! upstream's ErrorResponse for that marker is swapped for the gateway's own. So transaction
//! state, "skip until Sync" in pipelines and the single ReadyForQuery are PostgreSQL's own, and
//! responses can never be reordered.
//!
//! Every message sent upstream is recorded in the session's `Pipeline` (what it will answer), so
//! the upstream half knows which refusal, cycle or masked statement each response belongs to.
//! What is in flight is bounded by back-pressure: past the bounds, the client half stops reading
//! the client until the server has answered.

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

use crate::bridge::{now_ts, RequestKind};
use crate::cache::{Action, Decision, Reuse};
use crate::engine::{EngineCore, Settings};
use crate::errors::{sqlstate, GateError};
use crate::protocol::framing::{next_frame, peek_header, ClientCutter, Cut};
use crate::session::frontend::{Established, Identity};
use crate::protocol::messages::{error_response, extended, query, session, tag_b, tag_f};
use crate::session::pipeline::{Entry, Event, Expect, Pipeline, Refusal, StmtInfo};
use crate::masking::rowguard::{RowGuard, Step};
use crate::protocol::stream::{release_if_idle, ReadPart, WritePart};

/// Upstream messages the relay must see whole; everything else streams through.
fn upstream_inspected(tag: u8) -> bool {
    matches!(tag, b'E' | b'Z' | b'C' | b'R' | b'K' | b'W' | b'v')
}

/// Refusals in flight at most: past this, the client half waits until the server has answered
/// (or skipped) older ones, so every refusal keeps its marker until it is answered.
const MAX_REFUSALS: u64 = 4096;
/// Messages in flight (sent upstream, not yet answered) before the client half waits.
const SOFT_IN_FLIGHT: u64 = 1 << 14;
/// A COPY FROM STDIN cannot answer anything before its data ends, so while one runs the client
/// half does not wait; this bound stops a client that pipelines messages into it forever.
const MAX_IN_FLIGHT: u64 = 1 << 20;

pub struct SessionEnd {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub statements: u64,
    pub reason: &'static str,
    /// The client side ended (or the gateway closed the session) while the server was still
    /// working for it: the statement must be cancelled upstream.
    pub cancel_upstream: bool,
}

#[derive(Default)]
struct Shared {
    /// A fatal error the client→upstream half hit; the other half writes it and ends the session.
    fatal: Option<Bytes>,
    /// Entries published by the client half, in order, not yet taken by the upstream half.
    published: Vec<Entry>,
}

/// How far each half got, for back-pressure and for knowing whether the server is still busy.
#[derive(Default)]
struct Flow {
    /// Entries (and refusals among them) the client half published; written by it only.
    published: AtomicU64,
    /// Entries (and refusals) the upstream half released; written by it only.
    released: AtomicU64,
    released_refusals: AtomicU64,
    /// A COPY FROM STDIN is reading the client's data.
    copy_in: AtomicBool,
    /// The client half waits for `room`.
    waiting: AtomicBool,
    /// Upstream half → client half: something was released.
    room: Notify,
    /// Client half → upstream half: take what was published now (it may release skipped work).
    pressure: Notify,
}

struct Ctx {
    core: Arc<EngineCore>,
    settings: Arc<Settings>,
    session_id: u64,
    identity: Identity,
    target_name: String,
    /// ParameterStatus messages the server sent at startup (layer 2 follows DateStyle).
    startup_parameters: Vec<Bytes>,
    marker_prefix: String,
    next_marker: AtomicU64,
    shared: Mutex<Shared>,
    flow: Flow,
    kill: Notify,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    statements: AtomicU64,
}

/// What the client half will send upstream next, and the entries recording it.
#[derive(Default)]
struct Outbox {
    bytes: BytesMut,
    entries: Vec<Entry>,
    /// CopyDone/CopyFail messages forwarded so far.
    copy_ends: u32,
    /// Entries and refusals recorded so far (published or not).
    total: u64,
    total_refusals: u64,
    /// Portal names and statement facts are only kept for masked sessions.
    masked: bool,
}

impl Outbox {
    fn expect(&mut self, expect: Expect) {
        self.total += 1;
        self.entries.push(Entry { expect, refusal: None, copy_ends: self.copy_ends });
    }

    fn refuse(&mut self, expect: Expect, refusal: Refusal) {
        self.total += 1;
        self.total_refusals += 1;
        self.entries.push(Entry { expect, refusal: Some(Box::new(refusal)), copy_ends: self.copy_ends });
    }

    /// A portal name as the pipeline keeps it (only layer 2 needs it).
    fn portal(&self, portal: &[u8]) -> Vec<u8> {
        if self.masked {
            portal.to_vec()
        } else {
            Vec::new()
        }
    }
}

enum Verdict {
    /// Run it; with a text to send upstream instead (the PHI masking rewrite).
    Allow(Option<Bytes>, StmtInfo),
    Deny(GateError),
}

/// Prepared statements and portals a client may have at most (per session); more is refused.
const MAX_PREPARED: usize = 100_000;

/// What the gateway knows of a prepared statement: its text and the epoch it was judged under.
/// A reload bumps the epoch, and the next Bind or Execute judges the text again.
struct Prepared {
    sql: Bytes,
    epoch: u64,
    /// The text actually prepared upstream, if the gateway rewrote it.
    rewritten: Option<Bytes>,
    info: StmtInfo,
}

#[derive(Default)]
struct Extended {
    statements: HashMap<Vec<u8>, Prepared>,
    portals: HashMap<Vec<u8>, Vec<u8>>,
    /// Masked sessions: portals described since their Bind in the current cycle (their rows'
    /// RowDescription reaches layer 2). Per cycle because a Describe skipped after an error
    /// never answers: the skip ends at Sync, and an Execute after it describes again.
    described: std::collections::HashSet<Vec<u8>>,
}

impl Extended {
    /// Remembers that a portal's RowDescription will reach layer 2. Bounded: Describe of
    /// portals that do not exist costs the client nothing, so the set is cleared when full
    /// (forgetting only makes the gateway describe a portal again).
    fn mark_described(&mut self, portal: &[u8]) {
        if self.described.len() >= MAX_PREPARED && !self.described.contains(portal) {
            self.described.clear();
        }
        self.described.insert(portal.to_vec());
    }

    /// What layer 2 needs to know of the statement behind a portal (unknown: a SQL-level cursor,
    /// whose DECLARE was judged and rewritten).
    fn portal_info(&self, portal: &[u8]) -> StmtInfo {
        self.portals.get(portal).and_then(|s| self.statements.get(s)).map(|p| p.info.clone()).unwrap_or_default()
    }
}

pub async fn run(core: Arc<EngineCore>, settings: Arc<Settings>, est: Established, session_id: u64) -> SessionEnd {
    let (cr, cw) = est.client.split();
    let mut up = est.upstream;
    let startup_parameters = std::mem::take(&mut up.parameter_status);
    let (ur, uw) = up.stream.split();
    let ctx = Ctx {
        core,
        settings,
        session_id,
        identity: est.identity,
        target_name: est.target_name,
        startup_parameters,
        marker_prefix: format!("phigate_refusal_{:016x}_", rand::random::<u64>()),
        next_marker: AtomicU64::new(1),
        shared: Mutex::new(Shared::default()),
        flow: Flow::default(),
        kill: Notify::new(),
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
        statements: AtomicU64::new(0),
    };
    let reason = tokio::select! {
        r = client_to_upstream(&ctx, cr, uw, est.client_buf) => r,
        r = upstream_to_client(&ctx, ur, cw, up.leftover) => r,
    };
    let c = &ctx.core.counters;
    let (bi, bo) = (ctx.bytes_in.load(Ordering::Relaxed), ctx.bytes_out.load(Ordering::Relaxed));
    c.bytes_in.fetch_add(bi, Ordering::Relaxed);
    c.bytes_out.fetch_add(bo, Ordering::Relaxed);
    // The upstream answered everything sent (or is gone, or the client asked to terminate,
    // which PostgreSQL itself honours only after the running statement): nothing to cancel.
    let f = &ctx.flow;
    let busy = f.published.load(Ordering::Acquire) > f.released.load(Ordering::Acquire) || f.copy_in.load(Ordering::Acquire);
    let cancel_upstream = busy && !matches!(reason, "upstream_closed" | "upstream_write_failed" | "upstream_protocol_error" | "client_terminated");
    SessionEnd { bytes_in: bi, bytes_out: bo, statements: ctx.statements.load(Ordering::Relaxed), reason, cancel_upstream }
}

impl Ctx {
    /// Hands a fatal error to the upstream→client half, which sends it and ends the session.
    async fn die(&self, err: GateError) -> &'static str {
        let reason = if err.sqlstate == sqlstate::PROTOCOL_VIOLATION { "protocol_violation" } else { "credential_expired" };
        if err.sqlstate == sqlstate::PROTOCOL_VIOLATION {
            self.core.counters.protocol_violations.fetch_add(1, Ordering::Relaxed);
            self.core.bridge.emit(&json!({"ts": now_ts(), "event": "protocol_violation", "session_id": self.session_id, "detail": err.message}));
        }
        self.shared.lock().fatal = Some(err.to_error_response());
        self.kill.notify_one();
        std::future::pending::<()>().await;
        reason
    }

    /// The session's credential expired (and the identity source asked to close on expiry).
    fn expired(&self) -> bool {
        self.identity.expires_at.is_some_and(|at| std::time::SystemTime::now() >= at)
    }

    /// Publishes the outbox's entries, then writes its bytes upstream (in that order: an answer
    /// can only be read after its entry is there).
    async fn flush(&self, ob: &mut Outbox, uw: &mut WritePart) -> Result<(), &'static str> {
        if !ob.entries.is_empty() {
            self.shared.lock().published.append(&mut ob.entries);
            self.flow.published.store(ob.total, Ordering::Release);
        }
        if !ob.bytes.is_empty() {
            uw.write_all(&ob.bytes).await.map_err(|_| "upstream_write_failed")?;
            ob.bytes.clear();
        }
        Ok(())
    }

    /// Too much in flight (`divisor` 1: time to wait; 2: the level a wait lasts down to).
    fn crowded(&self, ob: &Outbox, divisor: u64) -> bool {
        let f = &self.flow;
        let refusals = ob.total_refusals - f.released_refusals.load(Ordering::SeqCst);
        let in_flight = ob.total - f.released.load(Ordering::SeqCst);
        refusals >= MAX_REFUSALS / divisor || (in_flight >= SOFT_IN_FLIGHT / divisor && !f.copy_in.load(Ordering::SeqCst))
    }

    /// Back-pressure before the next message: when too much is in flight, send what is pending
    /// and stop reading the client until the server has answered (or skipped) enough. Every
    /// message in flight is answered without more input from the client (a COPY FROM STDIN,
    /// which is not, lifts the wait), and skipped ones are released as soon as they are
    /// published, so the wait always ends.
    async fn make_room(&self, ob: &mut Outbox, uw: &mut WritePart) -> Result<(), &'static str> {
        if ob.total - self.flow.released.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            let err = GateError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, "too many pipelined messages without reading their results")
                .with_hint("Read results before sending more than a million messages.");
            return Err(self.die(err).await);
        }
        if !self.crowded(ob, 1) {
            return Ok(());
        }
        self.flush(ob, uw).await?;
        loop {
            let room = self.flow.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            self.flow.waiting.store(true, Ordering::SeqCst);
            if !self.crowded(ob, 2) {
                break;
            }
            self.flow.pressure.notify_one();
            room.await;
        }
        self.flow.waiting.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// A refusal: the marker statement text that stands in for it upstream, and what the
    /// client gets when the server answers the marker.
    fn marker(&self, err: &GateError) -> (String, Refusal) {
        let n = self.next_marker.fetch_add(1, Ordering::Relaxed);
        (format!("{}{n}", self.marker_prefix), Refusal { marker: n, response: err.to_error_response() })
    }

    /// Whether an upstream ErrorResponse is the answer to marker `n` (and not some other error
    /// that happened to come where the marker's was expected).
    fn answers_marker(&self, body: &[u8], n: u64) -> bool {
        let Some(msg) = error_response::field(body, b'M') else { return false };
        let p = self.marker_prefix.as_bytes();
        let Some(at) = msg.windows(p.len()).position(|w| w == p) else { return false };
        let digits: Vec<u8> = msg[at + p.len()..].iter().copied().take_while(u8::is_ascii_digit).collect();
        std::str::from_utf8(&digits).ok().and_then(|d| d.parse::<u64>().ok()) == Some(n)
    }

    async fn decide(&self, sql: &[u8], name: Option<&[u8]>, protocol: &'static str, ob: &mut Outbox, uw: &mut WritePart) -> Result<Verdict, &'static str> {
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.core.counters.statements.fetch_add(1, Ordering::Relaxed);
        let Ok(text) = std::str::from_utf8(sql) else {
            return Ok(Verdict::Deny(GateError::error(sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
                "statement text is not valid UTF-8").with_hint("Set client_encoding to UTF8.")));
        };
        let cache = &self.core.cache;
        let (hit, norm) = cache.lookup(&self.identity.class, sql);
        let (decision, cached) = match hit {
            Some(d) => (d, true),
            None => {
                // Earlier pipelined messages go upstream now; the answer may take a while.
                self.flush(ob, uw).await?;
                let epoch = cache.epoch();
                let payload = json!({"session_id": self.session_id, "identity_class": &*self.identity.class,
                    "subject": self.identity.subject, "sql": text,
                    "statement_name": name.map(|n| String::from_utf8_lossy(n).into_owned()), "protocol": protocol});
                let timeout = self.settings.cfg.decision_timeout();
                match self.core.bridge.ask(RequestKind::Decide, payload, timeout).await {
                    Ok(answer) => match parse_decision(&answer) {
                        Some(d) => {
                            let d = Arc::new(d);
                            cache.insert(epoch, &self.identity.class, sql, norm, d.clone());
                            (d, false)
                        }
                        None => return Ok(Verdict::Deny(GateError::error(sqlstate::SYSTEM_ERROR,
                            "phigate's control plane gave an invalid decision; the statement was not run")
                            .with_hint("Tell the gateway operator; details are in the gateway log."))),
                    },
                    Err(_) => return Ok(Verdict::Deny(GateError::error(sqlstate::SYSTEM_ERROR,
                        format!("phigate's control plane did not decide within {} ms; the statement was not run", timeout.as_millis()))
                        .with_hint("Retry; if this persists, tell the gateway operator."))),
                }
            }
        };
        let allowed = decision.action == Action::Allow;
        self.core.bridge.emit_line(&crate::events::statement(self.session_id, allowed, cached, protocol, decision.normalized.as_deref()));
        Ok(match &decision.action {
            Action::Allow => Verdict::Allow(decision.rewritten.clone(), StmtInfo {
                protected: decision.protected,
                rewritten: decision.rewritten.is_some(),
                origins: decision.origins.clone(),
                copy_columns: decision.copy_columns.clone(),
            }),
            Action::Deny { sqlstate, message, hint } => {
                let mut e = GateError::error(leak_sqlstate(sqlstate), message.clone());
                e.hint = hint.clone();
                Verdict::Deny(e)
            }
        })
    }
}


/// A Bind (F) naming a statement that cannot exist: PostgreSQL answers with an ErrorResponse that
/// carries the marker, which the other half swaps for the gateway's refusal.
fn marker_bind(portal: &[u8], marker: &str) -> Bytes {
    let mut o = BytesMut::new();
    crate::protocol::messages::put_message(&mut o, b'B', |o| {
        crate::protocol::messages::put_cstr(o, portal);
        crate::protocol::messages::put_cstr(o, marker.as_bytes());
        o.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    });
    o.freeze()
}

/// An upstream ErrorResponse/NoticeResponse as a masked identity may see it: identifiers found by
/// the content detectors are replaced by tags and details that echo rows or keys ("Failing row
/// contains", "Key (...)=(...)") by a generic detail. If the message cannot be parsed, a generic
/// error replaces it: fail closed.
fn scrub_for_masked(ctx: &Ctx, tag: u8, body: &[u8], detectors: &crate::masking::detectors::Detectors) -> Bytes {
    match crate::masking::scrub::scrubbed(tag, body, detectors) {
        Ok((bytes, report)) => {
            if report.changed {
                // The audit trail keeps hashes of what was withheld, never the text itself.
                ctx.core.bridge.emit(&json!({"ts": now_ts(), "event": "message_scrubbed", "session_id": ctx.session_id,
                    "kind": if tag == tag_b::NOTICE_RESPONSE { "notice" } else { "error" },
                    "detail_sha256": report.detail_sha256, "message_sha256": report.message_sha256}));
            }
            bytes
        }
        // A notice that cannot be checked is dropped (replacing it by an error would fail the
        // statement); an error is replaced by a generic one.
        Err(_) if tag == tag_b::NOTICE_RESPONSE => Bytes::new(),
        Err(_) => GateError::error(sqlstate::SYSTEM_ERROR, "the database reported an error phigate could not check; it is withheld")
            .to_error_response(),
    }
}

/// A statement prepared under older masking rules must be prepared again: the text prepared
/// upstream is the old rewrite.
fn rules_changed() -> GateError {
    GateError::error(sqlstate::FEATURE_NOT_SUPPORTED, "the masking rules for this prepared statement changed after a reload")
        .with_hint("Prepare the statement again.")
}


/// Judges a prepared statement again after a reload (at its next Bind or Execute): the refusal,
/// if any. The statement keeps running only if its rewrite is unchanged (the text prepared
/// upstream is the old rewrite); its layer-2 facts and epoch are brought up to date.
async fn rejudge(
    ctx: &Ctx,
    ext: &mut Extended,
    stmt: &[u8],
    sql: &[u8],
    ob: &mut Outbox,
    uw: &mut WritePart,
) -> Result<Option<GateError>, &'static str> {
    let epoch = ctx.core.cache.epoch();
    Ok(match ctx.decide(sql, Some(stmt), "extended", ob, uw).await? {
        Verdict::Allow(rewritten, info) => match ext.statements.get_mut(stmt) {
            Some(p) if p.rewritten == rewritten => {
                p.epoch = epoch;
                p.info = info;
                None
            }
            _ => Some(rules_changed()),
        },
        Verdict::Deny(e) => Some(e),
    })
}

/// A malformed extended-protocol message: the session ends, as PostgreSQL would end it had the
/// gateway passed the message on.
fn malformed(what: &str, why: &str) -> GateError {
    GateError::protocol(format!("invalid {what} message: {why}"))
}

/// PostgreSQL's answer to a parameter type OID that names no type ("cache lookup failed for type
/// N", an internal error class) in the gateway's words: the OID came from the client, so the
/// client gets told, with the SQLSTATE of an unknown type.
fn unknown_type(body: &[u8]) -> Option<Bytes> {
    if error_response::field(body, b'C')? != b"XX000" {
        return None;
    }
    let oid = error_response::field(body, b'M')?.strip_prefix(b"cache lookup failed for type ")?;
    let oid: u32 = std::str::from_utf8(oid).ok()?.parse().ok()?;
    Some(GateError::error("42704", format!("type with OID {oid} does not exist"))
        .with_hint("Send parameter types the database has, or 0 to let the server infer them.")
        .to_error_response())
}


/// SQLSTATEs are 5 ASCII alphanumerics; anything else from the control plane becomes 42501.
fn leak_sqlstate(s: &str) -> &'static str {
    const KNOWN: &[&str] = &["42501", "42601", "0A000", "57014", "58000", "54000", "22021", "25006", "28000"];
    KNOWN.iter().find(|k| **k == s).copied().unwrap_or(sqlstate::INSUFFICIENT_PRIVILEGE)
}

fn parse_decision(a: &serde_json::Value) -> Option<Decision> {
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


async fn client_to_upstream(ctx: &Ctx, mut cr: ReadPart, mut uw: WritePart, mut buf: BytesMut) -> &'static str {
    let max_statement = ctx.settings.cfg.max_statement_bytes;
    let max_message = ctx.settings.cfg.max_message_bytes;
    let masked = ctx.identity.masked;
    let mut ob = Outbox { masked, ..Outbox::default() };
    let mut cutter = ClientCutter::new(max_statement, max_message);
    let mut ext = Extended::default();
    let cache = &ctx.core.cache;
    loop {
        loop {
            let frame = match cutter.next(&mut buf) {
                Ok(None) => break,
                Ok(Some(Cut::Frame(f))) => f,
                Ok(Some(Cut::Stream(data))) => {
                    ob.bytes.extend_from_slice(&data);
                    continue;
                }
                Ok(Some(Cut::Discarded(tag))) => {
                    if let Err(r) = ctx.make_room(&mut ob, &mut uw).await {
                        return r;
                    }
                    let err = GateError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED,
                        format!("statement is larger than this gateway's limit of {max_statement} bytes"))
                        .with_hint("Send smaller statements (use parameters or COPY for bulk data), or ask the operator to raise max_statement_bytes.");
                    let (marker, refusal) = ctx.marker(&err);
                    if tag == tag_f::QUERY {
                        ext.described.clear();
                        ob.refuse(Expect::Query { info: StmtInfo::default(), sent: Instant::now() }, refusal);
                        ob.bytes.extend_from_slice(&session::query(marker.as_bytes()));
                    } else {
                        ob.refuse(Expect::Ack(b'1'), refusal);
                        ob.bytes.extend_from_slice(&session::parse(b"", marker.as_bytes()));
                    }
                    continue;
                }
                Err(e) => return ctx.die(GateError::protocol(format!("invalid message from client: {e}"))).await,
            };
            if !matches!(frame.tag, tag_f::FLUSH | tag_f::COPY_DONE | tag_f::COPY_FAIL | tag_f::TERMINATE) {
                if let Err(r) = ctx.make_room(&mut ob, &mut uw).await {
                    return r;
                }
            }
            match frame.tag {
                tag_f::QUERY | tag_f::PARSE | tag_f::BIND | tag_f::EXECUTE | tag_f::FUNCTION_CALL if ctx.expired() => {
                    let err = GateError::fatal(sqlstate::INVALID_PASSWORD, "your access token has expired; this session is closed")
                        .with_hint("Reconnect with a fresh token.");
                    let _ = ctx.flush(&mut ob, &mut uw).await;
                    return ctx.die(err).await;
                }
                tag_f::QUERY => {
                    let Some(sql) = query::query_text(frame.body()) else {
                        return ctx.die(malformed("Query", "the statement text is not one NUL-terminated string")).await;
                    };
                    let verdict = match ctx.decide(sql, None, "simple", &mut ob, &mut uw).await {
                        Ok(v) => v,
                        Err(r) => return r,
                    };
                    // A Query ends the implicit transaction its portals lived in.
                    ext.described.clear();
                    let sent = Instant::now();
                    match verdict {
                        Verdict::Allow(None, info) => {
                            ob.expect(Expect::Query { info, sent });
                            ob.bytes.extend_from_slice(&frame.bytes);
                        }
                        Verdict::Allow(Some(rewritten), info) => {
                            ob.expect(Expect::Query { info, sent });
                            ob.bytes.extend_from_slice(&session::query(&rewritten));
                        }
                        Verdict::Deny(err) => {
                            let (marker, refusal) = ctx.marker(&err);
                            ob.refuse(Expect::Query { info: StmtInfo::default(), sent }, refusal);
                            ob.bytes.extend_from_slice(&session::query(marker.as_bytes()));
                        }
                    }
                }
                tag_f::PARSE => {
                    let p = match extended::parse(frame.body()) {
                        Ok(p) => p,
                        Err(why) => return ctx.die(malformed("Parse", why)).await,
                    };
                    let (name, sql) = (p.name, p.sql);
                    let epoch = cache.epoch();
                    let verdict = match ctx.decide(sql, Some(name), "extended", &mut ob, &mut uw).await {
                        Ok(v) => v,
                        Err(r) => return r,
                    };
                    match verdict {
                        Verdict::Allow(..) if ext.statements.len() >= MAX_PREPARED && !ext.statements.contains_key(name) => {
                            let err = GateError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED,
                                format!("this session already has {MAX_PREPARED} prepared statements"))
                                .with_hint("Close (deallocate) prepared statements you no longer need.");
                            let (marker, refusal) = ctx.marker(&err);
                            ob.refuse(Expect::Ack(b'1'), refusal);
                            ob.bytes.extend_from_slice(&session::parse(name, marker.as_bytes()));
                        }
                        Verdict::Allow(rewritten, info) => {
                            ob.expect(Expect::Ack(b'1'));
                            match &rewritten {
                                None => ob.bytes.extend_from_slice(&frame.bytes),
                                Some(r) => ob.bytes.extend_from_slice(&session::parse_with_types(name, r, p.param_types)),
                            }
                            ext.statements.insert(name.to_vec(), Prepared { sql: Bytes::copy_from_slice(sql), epoch, rewritten, info });
                        }
                        Verdict::Deny(err) => {
                            ext.statements.remove(name);
                            let (marker, refusal) = ctx.marker(&err);
                            ob.refuse(Expect::Ack(b'1'), refusal);
                            ob.bytes.extend_from_slice(&session::parse(name, marker.as_bytes()));
                        }
                    }
                }
                tag_f::BIND => {
                    let (portal, stmt) = match extended::bind(frame.body()) {
                        Ok(b) => (b.portal, b.statement),
                        Err(why) => return ctx.die(malformed("Bind", why)).await,
                    };
                    let refusal = match ext.statements.get(stmt) {
                        None => Some(GateError::error("26000",
                            format!("prepared statement \"{}\" was not prepared through this gateway", String::from_utf8_lossy(stmt)))
                            .with_hint("Prepare statements with the protocol's Parse message in this session.")),
                        Some(p) if p.epoch != cache.epoch() => {
                            let sql = p.sql.clone();
                            match rejudge(ctx, &mut ext, stmt, &sql, &mut ob, &mut uw).await {
                                Ok(refusal) => refusal,
                                Err(r) => return r,
                            }
                        }
                        Some(_) if ext.portals.len() >= MAX_PREPARED && !ext.portals.contains_key(portal) => {
                            Some(GateError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("this session already has {MAX_PREPARED} open portals"))
                                .with_hint("Close portals you no longer need."))
                        }
                        Some(_) => None,
                    };
                    if masked {
                        ext.described.remove(portal);
                    }
                    match refusal {
                        None => {
                            ob.expect(Expect::Ack(b'2'));
                            // Drivers rebind the same portal to the same statement on every
                            // execution: only a change costs allocations.
                            if ext.portals.get(portal).map(Vec::as_slice) != Some(stmt) {
                                ext.portals.insert(portal.to_vec(), stmt.to_vec());
                            }
                            ob.bytes.extend_from_slice(&frame.bytes);
                        }
                        Some(err) => {
                            ext.portals.remove(portal);
                            let (marker, refusal) = ctx.marker(&err);
                            ob.refuse(Expect::Ack(b'2'), refusal);
                            ob.bytes.extend_from_slice(&marker_bind(portal, &marker));
                        }
                    }
                }
                tag_f::EXECUTE => {
                    let portal = match extended::execute(frame.body()) {
                        Ok(p) => p,
                        Err(why) => return ctx.die(malformed("Execute", why)).await,
                    };
                    // A portal bound before a reload is judged again before it runs (portals from
                    // SQL-level DECLARE are not in the map: their DECLARE was judged).
                    let stale = ext.portals.get(portal).and_then(|stmt| {
                        ext.statements.get(stmt).filter(|p| p.epoch != cache.epoch()).map(|p| (stmt.clone(), p.sql.clone()))
                    });
                    let refusal = match stale {
                        None => None,
                        Some((stmt, sql)) => match rejudge(ctx, &mut ext, &stmt, &sql, &mut ob, &mut uw).await {
                            Ok(None) => {
                                // Layer 2 plans this portal again under the new rules.
                                ext.described.remove(portal);
                                None
                            }
                            Ok(refusal) => refusal,
                            Err(r) => return r,
                        },
                    };
                    match refusal {
                        None => {
                            if masked {
                                let info = ext.portal_info(portal);
                                if !ext.described.contains(portal) {
                                    // Rows need their portal's RowDescription: ask for it and
                                    // swallow the answer (the client did not ask).
                                    ob.expect(Expect::DescribePortal { portal: portal.to_vec(), info: info.clone(), swallow: true });
                                    ob.bytes.extend_from_slice(&session::describe_portal(portal));
                                    ext.mark_described(portal);
                                }
                                ob.expect(Expect::Execute { portal: portal.to_vec(), info });
                            } else {
                                ob.expect(Expect::Execute { portal: Vec::new(), info: StmtInfo::default() });
                            }
                            ob.bytes.extend_from_slice(&frame.bytes);
                        }
                        Some(err) => {
                            let (marker, refusal) = ctx.marker(&err);
                            ob.refuse(Expect::Ack(b'2'), refusal);
                            ob.bytes.extend_from_slice(&marker_bind(b"", &marker));
                        }
                    }
                }
                tag_f::CLOSE => {
                    let (kind, name) = match extended::target(frame.body()) {
                        Ok(t) => t,
                        Err(why) => return ctx.die(malformed("Close", why)).await,
                    };
                    if kind == b'S' {
                        ext.statements.remove(name);
                        ob.expect(Expect::Ack(b'3'));
                    } else {
                        ext.portals.remove(name);
                        ext.described.remove(name);
                        let portal = ob.portal(name);
                        ob.expect(Expect::ClosePortal(portal));
                    }
                    ob.bytes.extend_from_slice(&frame.bytes);
                }
                tag_f::SYNC => {
                    if !frame.body().is_empty() {
                        return ctx.die(malformed("Sync", "it has a body")).await;
                    }
                    // The cycle ends: whatever a skip left undescribed is described again.
                    ext.described.clear();
                    ob.expect(Expect::Sync { sent: Instant::now() });
                    ob.bytes.extend_from_slice(&frame.bytes);
                }
                tag_f::DESCRIBE => {
                    let (kind, name) = match extended::target(frame.body()) {
                        Ok(t) => t,
                        Err(why) => return ctx.die(malformed("Describe", why)).await,
                    };
                    if kind == b'S' {
                        ob.expect(Expect::DescribeStatement);
                    } else if masked {
                        ob.expect(Expect::DescribePortal { portal: name.to_vec(), info: ext.portal_info(name), swallow: false });
                        ext.mark_described(name);
                    } else {
                        ob.expect(Expect::DescribePortal { portal: Vec::new(), info: StmtInfo::default(), swallow: false });
                    }
                    ob.bytes.extend_from_slice(&frame.bytes);
                }
                tag_f::FLUSH | tag_f::COPY_DONE => {
                    if !frame.body().is_empty() {
                        return ctx.die(malformed(if frame.tag == tag_f::FLUSH { "Flush" } else { "CopyDone" }, "it has a body")).await;
                    }
                    if frame.tag == tag_f::COPY_DONE {
                        ob.copy_ends += 1;
                    }
                    ob.bytes.extend_from_slice(&frame.bytes);
                }
                tag_f::COPY_FAIL => {
                    if let Err(why) = extended::copy_fail(frame.body()) {
                        return ctx.die(malformed("CopyFail", why)).await;
                    }
                    ob.copy_ends += 1;
                    ob.bytes.extend_from_slice(&frame.bytes);
                }
                tag_f::FUNCTION_CALL => {
                    // Fast-path calls carry no SQL to judge. The marker Query yields the same
                    // response shape (ErrorResponse, ReadyForQuery) a failed FunctionCall would.
                    let err = GateError::error(sqlstate::INSUFFICIENT_PRIVILEGE,
                        "FunctionCall (fast-path) messages are refused by phigate: they carry no SQL the gateway can judge")
                        .with_hint("Call the function from a SQL statement instead.");
                    ext.described.clear();
                    let (marker, refusal) = ctx.marker(&err);
                    ob.refuse(Expect::Query { info: StmtInfo::default(), sent: Instant::now() }, refusal);
                    ob.bytes.extend_from_slice(&session::query(marker.as_bytes()));
                }
                tag_f::TERMINATE => {
                    ob.bytes.extend_from_slice(&frame.bytes);
                    let _ = ctx.flush(&mut ob, &mut uw).await;
                    return "client_terminated";
                }
                t => {
                    return ctx.die(GateError::protocol(format!("unexpected message type 0x{t:02x} from client"))).await;
                }
            }
        }
        if let Err(r) = ctx.flush(&mut ob, &mut uw).await {
            return r;
        }
        release_if_idle(&mut ob.bytes);
        release_if_idle(&mut buf);
        match cr.read_into(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = uw.write_all(&session::terminate()).await;
                return "client_closed";
            }
            Ok(n) => {
                ctx.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

async fn upstream_to_client(ctx: &Ctx, mut ur: ReadPart, mut cw: WritePart, mut buf: BytesMut) -> &'static str {
    let max_message = ctx.settings.cfg.max_message_bytes;
    let mut shutdown = ctx.core.force_close.subscribe();
    // Created once per session: a fresh Notified/changed() per loop turn costs a lock each.
    let kill = ctx.kill.notified();
    tokio::pin!(kill);
    let gateway_stop = shutdown.changed();
    tokio::pin!(gateway_stop);
    let pressure = ctx.flow.pressure.notified();
    tokio::pin!(pressure);
    let mut out = BytesMut::new();
    let mut pass_remaining = 0usize;
    let mut cycle_rows = 0u64;
    let mut cycle_bytes = 0u64;
    let mut cycle_error: Option<String> = None;
    let masked = ctx.identity.masked;
    let mut pipeline = Pipeline::new(masked);
    let mut published: Vec<Entry> = Vec::new();
    // What the client half was last woken for: it is only woken again for progress.
    let mut told = ((0, 0), false);
    let mut guard = masked.then(|| {
        let mut g = RowGuard::new(&ctx.identity, &ctx.target_name);
        for p in &ctx.startup_parameters {
            g.parameter_status(&p[5..]);
        }
        g
    });
    // Layer-2 rules, detectors and key; read again at every RowDescription so a catalog reload
    // reaches live sessions at their next result (one lock and Arc clone per result).
    let mut rules = ctx.core.masking();
    loop {
        // Everything an answer read so far can belong to was published before its message was
        // written upstream.
        std::mem::swap(&mut ctx.shared.lock().published, &mut published);
        pipeline.absorb(&mut published);
        loop {
            if pass_remaining > 0 {
                if !stream_through(&mut buf, &mut out, &mut pass_remaining) {
                    break;
                }
                continue;
            }
            let h = match peek_header(&buf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => return end_with(&mut cw, &mut out, GateError::protocol("the upstream database sent an invalid message; closing the session"), "upstream_protocol_error").await,
            };
            // Masked sessions see every message whole: rows are masked, descriptions planned.
            let inspect = masked || upstream_inspected(h.tag);
            if !inspect {
                // Rows, descriptions, COPY data: stream through without waiting for the whole
                // message (the pipeline only needs the tag).
                if pipeline.step(h.tag).is_err() {
                    pipeline.recover(h.tag);
                }
                let take = h.wire_len().min(buf.len());
                out.extend_from_slice(&buf[..take]);
                buf.advance(take);
                pass_remaining = h.wire_len() - take;
                continue;
            }
            let frame = match next_frame(&mut buf, |_| max_message) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return end_with(&mut cw, &mut out, GateError::protocol("the upstream database sent an oversized message; closing the session"), "upstream_protocol_error").await,
            };
            let event = match pipeline.step(frame.tag) {
                Ok(event) => event,
                Err(lost) if masked => {
                    let e = crate::masking::rowguard::lost(lost.0);
                    ctx.core.counters.masking_failures.fetch_add(1, Ordering::Relaxed);
                    ctx.core.bridge.emit(&json!({"ts": now_ts(), "event": "masking_failure", "session_id": ctx.session_id, "detail": e.message}));
                    return end_with(&mut cw, &mut out, e, "masking_failure").await;
                }
                // Unmasked: only refusal markers (checked by number) and result timings depend
                // on placing answers; carry on.
                Err(_) => match pipeline.recover(frame.tag) {
                    Some(sent) => Event::Ready(sent),
                    None => Event::Ongoing,
                },
            };
            if let Some(g) = guard.as_mut() {
                if frame.tag == b'T' {
                    rules = ctx.core.masking();
                }
                let changed_before = g.values_masked;
                let step = g.step(frame.tag, &frame.bytes, &event, pipeline.front(), &rules, &mut out);
                if g.values_masked != changed_before {
                    ctx.core.counters.rows_masked.fetch_add(1, Ordering::Relaxed);
                }
                match step {
                    Ok(Step::Done) => continue,
                    Ok(Step::Default) => {}
                    Err(e) => {
                        ctx.core.counters.masking_failures.fetch_add(1, Ordering::Relaxed);
                        ctx.core.bridge.emit(&json!({"ts": now_ts(), "event": "masking_failure", "session_id": ctx.session_id, "detail": e.message}));
                        return end_with(&mut cw, &mut out, e, "masking_failure").await;
                    }
                }
            }
            match frame.tag {
                tag_b::READY_FOR_QUERY => {
                    out.extend_from_slice(&frame.bytes);
                    let duration_ms = match event {
                        Event::Ready(sent) => sent.elapsed().as_secs_f64() * 1000.0,
                        _ => 0.0,
                    };
                    ctx.core.bridge.emit_line(&crate::events::result(ctx.session_id, cycle_rows, cycle_bytes + out.len() as u64,
                        duration_ms, cycle_error.take().as_deref()));
                    cycle_rows = 0;
                    cycle_bytes = 0;
                }
                tag_b::COMMAND_COMPLETE => {
                    cycle_rows += query::command_rows(frame.body());
                    out.extend_from_slice(&frame.bytes);
                }
                tag_b::NOTICE_RESPONSE if masked => out.extend_from_slice(&scrub_for_masked(ctx, frame.tag, frame.body(), &rules.ctx.detectors)),
                tag_b::ERROR_RESPONSE => {
                    let (refusal, failed) = match event {
                        Event::Error { refusal, failed } => (refusal, failed),
                        _ => (None, None),
                    };
                    let replacement = match refusal {
                        Some(r) if ctx.answers_marker(frame.body(), r.marker) => Some(r.response),
                        // Parameter types are resolved at Parse, Bind and Describe.
                        _ if matches!(failed, Some(Expect::Ack(b'1' | b'2') | Expect::DescribeStatement)) => unknown_type(frame.body()),
                        _ => None,
                    };
                    let bytes = match replacement {
                        Some(r) => r,
                        None if masked => scrub_for_masked(ctx, frame.tag, frame.body(), &rules.ctx.detectors),
                        None => frame.bytes,
                    };
                    cycle_error = error_response::field(&bytes[5..], b'C').map(|c| String::from_utf8_lossy(c).into_owned());
                    out.extend_from_slice(&bytes);
                }
                t if !upstream_inspected(t) => out.extend_from_slice(&frame.bytes),
                _ => {
                    // Authentication, BackendKeyData, CopyBoth or protocol negotiation mid-session:
                    // never legitimate after startup (CopyBoth is replication, which is refused).
                    return end_with(&mut cw, &mut out, GateError::protocol("the upstream database sent an unexpected message; closing the session"), "upstream_protocol_error").await;
                }
            }
        }
        // Tell the client half how far the server got (it may be waiting for room).
        let progress = (pipeline.released(), pipeline.in_copy());
        let f = &ctx.flow;
        f.released.store(progress.0 .0, Ordering::SeqCst);
        f.released_refusals.store(progress.0 .1, Ordering::SeqCst);
        f.copy_in.store(progress.1, Ordering::SeqCst);
        if progress != told && f.waiting.load(Ordering::SeqCst) {
            told = progress;
            f.room.notify_one();
        }
        if !out.is_empty() {
            cycle_bytes += out.len() as u64;
            ctx.bytes_out.fetch_add(out.len() as u64, Ordering::Relaxed);
            if cw.write_all(&out).await.is_err() {
                return "client_write_failed";
            }
            out.clear();
        }
        release_if_idle(&mut out);
        release_if_idle(&mut buf);
        tokio::select! {
            biased;
            _ = &mut kill => {
                let fatal = ctx.shared.lock().fatal.take();
                if let Some(f) = fatal {
                    let _ = cw.write_all(&f).await;
                }
                cw.shutdown().await;
                return "protocol_violation";
            }
            _ = &mut gateway_stop => {
                let e = GateError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection because the gateway is shutting down");
                let _ = cw.write_all(&e.to_error_response()).await;
                cw.shutdown().await;
                return "gateway_shutdown";
            }
            // The client half waits for room: take what it published (skipped work is released).
            _ = &mut pressure => {
                pressure.set(ctx.flow.pressure.notified());
            }
            r = ur.read_into(&mut buf) => match r {
                Ok(0) | Err(_) => return "upstream_closed",
                Ok(_) => {}
            }
        }
    }
}


/// Moves up to `remaining` bytes of a message being streamed from `buf` to `out`; false when
/// `buf` is empty and more must be read first.
fn stream_through(buf: &mut BytesMut, out: &mut BytesMut, remaining: &mut usize) -> bool {
    if buf.is_empty() {
        return false;
    }
    let take = (*remaining).min(buf.len());
    out.extend_from_slice(&buf[..take]);
    buf.advance(take);
    *remaining -= take;
    true
}

async fn end_with(cw: &mut WritePart, out: &mut BytesMut, err: GateError, reason: &'static str) -> &'static str {
    out.extend_from_slice(&err.to_error_response());
    let _ = cw.write_all(out).await;
    cw.shutdown().await;
    reason
}

