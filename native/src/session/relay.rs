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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

use crate::bridge::RequestKind;
use crate::cache::{Action, AuditFacts, Decision, Reuse};
use crate::engine::{EngineCore, Settings};
use crate::errors::{sqlstate, GateError};
use crate::session::{Established, Identity};
use crate::protocol::messages::error_response;
use crate::session::pipeline::{Entry, Expect, Refusal, RowCap, StmtInfo};
use crate::session::rowcap::CursorOp;
use crate::protocol::stream::WritePart;

mod client_half;
mod cut;
mod decision;
mod hold;
mod notices;
mod upstream_half;

pub(crate) use hold::bound_values;

use client_half::client_to_upstream;
use decision::{parse_decision, refusal_sqlstate};
use upstream_half::upstream_to_client;

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
    /// Why it ended (see `end_reason`).
    pub reason: &'static str,
    /// The client side ended (or the gateway closed the session) while the server was still
    /// working for it: the statement must be cancelled upstream.
    pub cancel_upstream: bool,
}

#[derive(Default)]
struct Shared {
    /// A fatal error the client→upstream half hit; the other half writes it and ends the session.
    fatal: Option<Bytes>,
    /// Why the session ends when `fatal` is set.
    fatal_reason: &'static str,
    /// Entries published by the client half, in order, not yet taken by the upstream half.
    published: Vec<Entry>,
    /// A statement was cut at max_rows and has ended upstream: what the client half must do
    /// before it writes anything more upstream.
    cut: Option<cut::CutOutcome>,
    /// NoticeResponses for the client from the client half (a statement held for approval),
    /// written by the upstream half at the next message boundary.
    notices: Vec<Bytes>,
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
    /// The session's UUID in every record about it.
    session: Arc<str>,
    identity: Identity,
    /// Results are attributed to statements and their rows read whole: the identity sees some
    /// PHI masked, or the target has subject relations whose disclosures are recorded.
    tracked: bool,
    target_name: String,
    /// ParameterStatus messages the server sent at startup (layer 2 follows DateStyle).
    startup_parameters: Vec<Bytes>,
    marker_prefix: String,
    next_marker: AtomicU64,
    shared: Mutex<Shared>,
    flow: Flow,
    kill: Notify,
    /// Client half → upstream half: `Shared::notices` has something to write.
    notices_ready: Notify,
    /// Woken by each CancelRequest with this session's key (a held statement is withdrawn).
    cancelled: Arc<Notify>,
    /// Set while a statement waits for approval (see session::cancel).
    holding: Arc<AtomicBool>,
    /// The client's address ("ip:port"), for approvers.
    peer: String,
    /// The connection asked for return mode (see frontend.rs).
    return_mode: bool,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Statement records written so far (the last one's `stmt`).
    statements: AtomicU64,
    /// sync = "write" or "statement": the latest statement record's durability, awaited before the
    /// next bytes go upstream.
    durable: parking_lot::Mutex<Option<crate::audit::Durable>>,
    /// The BackendKeyData the client got (the gateway cancels a cut statement upstream with it).
    our_pid: i32,
    /// Statements cut at max_rows in this session (see `was_cut`).
    cuts: Mutex<crate::session::rowcap::CutStatements>,
    /// SQL-level cursors the upstream half counts rows of (capped sessions).
    tracked_cursors: std::sync::atomic::AtomicUsize,
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

/// A judged statement: the verdict and what its statement record says.
struct Judged {
    verdict: Verdict,
    audit: StmtAudit,
}

/// What a statement record needs of a judgement; kept with a prepared statement so each of its
/// executions is recorded with it.
#[derive(Clone)]
struct StmtAudit {
    decision: Arc<Decision>,
    cached: bool,
    /// Keyed hashes of the statement's literals (JSON).
    literals: Arc<[u8]>,
}

/// Session end reasons as the session_end record names them.
pub mod end_reason {
    /// The client sent Terminate.
    pub const CLIENT_QUIT: &str = "client_quit";
    /// The client's connection closed (or broke) without Terminate.
    pub const CLIENT_DISCONNECTED: &str = "client_disconnected";
    /// The session's token expired and the identity source closes sessions on expiry.
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// The gateway shut down and the drain grace period ended.
    pub const DRAIN: &str = "drain";
    /// The client broke the protocol.
    pub const PROTOCOL_VIOLATION: &str = "protocol_violation";
    /// The client exceeded a gateway limit that ends sessions.
    pub const RESOURCE_LIMIT: &str = "resource_limit";
    /// The upstream connection closed or failed.
    pub const UPSTREAM_FAILURE: &str = "upstream_failure";
    /// The upstream database sent something invalid.
    pub const UPSTREAM_PROTOCOL_ERROR: &str = "upstream_protocol_error";
    /// Layer 2 could not attribute or mask a result: closed so no unmasked row leaves.
    pub const MASKING_FAILURE: &str = "masking_failure";
    /// Another fatal gateway error.
    pub const GATEWAY_ERROR: &str = "gateway_error";
    /// sync = "write" or "statement" and a statement record could not be made durable: the statement
    /// was not sent, and the session closed.
    pub const AUDIT_FAILURE: &str = "audit_failure";
}

pub async fn run(core: Arc<EngineCore>, settings: Arc<Settings>, est: Established, session: Arc<str>) -> SessionEnd {
    let (cr, cw) = est.client.split();
    let mut up = est.upstream;
    let startup_parameters = std::mem::take(&mut up.parameter_status);
    let (ur, uw) = up.stream.split();
    let accounted = settings.disclosures.is_some() && core.subjects.get(&est.target_name).is_some();
    let ctx = Ctx {
        tracked: est.identity.masked || accounted,
        core,
        settings,
        session,
        identity: est.identity,
        target_name: est.target_name,
        startup_parameters,
        marker_prefix: format!("phigate_refusal_{:016x}_", rand::random::<u64>()),
        next_marker: AtomicU64::new(1),
        shared: Mutex::new(Shared::default()),
        flow: Flow::default(),
        kill: Notify::new(),
        notices_ready: Notify::new(),
        cancelled: est.cancelled,
        holding: est.holding,
        peer: est.peer.to_string(),
        return_mode: est.return_mode,
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
        statements: AtomicU64::new(0),
        durable: parking_lot::Mutex::new(None),
        our_pid: est.our_pid,
        cuts: Mutex::new(Default::default()),
        tracked_cursors: Default::default(),
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
    let cancel_upstream = busy && !matches!(reason, end_reason::UPSTREAM_FAILURE | end_reason::UPSTREAM_PROTOCOL_ERROR | end_reason::CLIENT_QUIT);
    SessionEnd { bytes_in: bi, bytes_out: bo, statements: ctx.statements.load(Ordering::Relaxed), reason, cancel_upstream }
}

impl Ctx {
    /// Hands a fatal error to the upstream→client half, which sends it and ends the session.
    async fn die(&self, err: GateError) -> &'static str {
        let reason = match err.sqlstate {
            sqlstate::PROTOCOL_VIOLATION => end_reason::PROTOCOL_VIOLATION,
            sqlstate::INVALID_PASSWORD => end_reason::TOKEN_EXPIRED,
            sqlstate::PROGRAM_LIMIT_EXCEEDED => end_reason::RESOURCE_LIMIT,
            sqlstate::ADMIN_SHUTDOWN => end_reason::DRAIN,
            _ => end_reason::GATEWAY_ERROR,
        };
        if err.sqlstate == sqlstate::PROTOCOL_VIOLATION {
            self.core.counters.protocol_violations.fetch_add(1, Ordering::Relaxed);
            self.core.bridge.emit(&json!({"ts": crate::events::now(), "event": "protocol_violation", "session": &*self.session, "detail": err.message}));
        }
        {
            let mut shared = self.shared.lock();
            shared.fatal = Some(err.to_error_response());
            shared.fatal_reason = reason;
        }
        self.kill.notify_one();
        std::future::pending::<()>().await;
        reason
    }

    /// Queues a NoticeResponse for the client; the upstream half writes it at once, between two
    /// messages if it is streaming a result.
    fn notify_client(&self, notice: Bytes) {
        self.shared.lock().notices.push(notice);
        self.notices_ready.notify_one();
    }

    /// The session's credential expired (and the identity source asked to close on expiry).
    fn expired(&self) -> bool {
        self.identity.expires_at.is_some_and(|at| std::time::SystemTime::now() >= at)
    }

    /// Publishes the outbox's entries, then writes its bytes upstream (in that order: an answer
    /// can only be read after its entry is there).
    async fn flush(&self, ob: &mut Outbox, uw: &mut WritePart) -> Result<(), &'static str> {
        let durable = self.durable.lock().take();
        if let Some(durable) = durable {
            // sync = "write" or "statement": a statement whose record could not be made durable never
            // goes upstream; the session ends (new sessions are refused with 58030 meanwhile).
            if !matches!(durable.await, Ok(Ok(()))) {
                return Err(end_reason::AUDIT_FAILURE);
            }
        }
        if !ob.entries.is_empty() {
            self.shared.lock().published.append(&mut ob.entries);
            self.flow.published.store(ob.total, Ordering::Release);
        }
        if !ob.bytes.is_empty() {
            uw.write_all(&ob.bytes).await.map_err(|_| end_reason::UPSTREAM_FAILURE)?;
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

    /// Whether this statement text had a result cut at max_rows earlier in the session: its
    /// next execution may ask the control plane for an approval that lifts the cap.
    pub(super) fn was_cut(&self, sql: &[u8]) -> bool {
        self.identity.max_rows.is_some() && self.cuts.lock().was_cut(sql)
    }

    /// The max_rows cap of one execution: `max_rows` is the execution's own (None: the
    /// session's; Some(None): no cap, e.g. an approver lifted it). None: nothing is counted.
    fn row_cap(&self, max_rows: Option<Option<u64>>, decision: &Decision, report: impl FnOnce() -> crate::session::rowcap::CutReport,
        portal: Option<&Arc<AtomicU64>>, sql: &[u8]) -> Option<Box<RowCap>> {
        let max = max_rows.unwrap_or(self.identity.max_rows)?;
        let cursor = decision.cursor.as_ref().and_then(|(name, op)| Some((name.clone(), CursorOp::from_decision(op, sql)?)));
        Some(Box::new(RowCap { max, portal: portal.cloned(), cursor, report: Arc::new(report()) }))
    }

    /// A DECLARE in a capped session that already has as many cursors counted as the gateway
    /// keeps: refused (forgetting a count would let a cursor's FETCHes start over).
    fn cursor_refusal(&self, verdict: Verdict, decision: &Decision) -> Verdict {
        let declares = decision.cursor.as_ref().is_some_and(|(_, op)| &**op == "declare");
        match verdict {
            Verdict::Allow(..) if declares && self.identity.max_rows.is_some()
                && self.tracked_cursors.load(Ordering::Relaxed) >= crate::session::rowcap::MAX_TRACKED_CURSORS => {
                Verdict::Deny(GateError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED,
                    format!("this session already has {} open cursors", crate::session::rowcap::MAX_TRACKED_CURSORS))
                    .with_hint("Close cursors you no longer need (CLOSE name, or CLOSE ALL)."))
            }
            v => v,
        }
    }

    /// After a capped statement was written upstream: waits until the server has answered it
    /// (nothing else goes upstream meanwhile, so a cut can still be made true upstream), then
    /// does what its cut, if any, leaves to do (see cut.rs). True: drop the client's messages
    /// up to the next Sync, where `fail_at_sync` makes the server fail.
    async fn settle_capped(&self, ob: &mut Outbox, uw: &mut WritePart) -> Result<bool, &'static str> {
        let entry = ob.total;
        self.flush(ob, uw).await?;
        let f = &self.flow;
        loop {
            let room = f.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            f.waiting.store(true, Ordering::SeqCst);
            // A COPY FROM STDIN waits for the client's data: nothing to hold back then.
            if f.released.load(Ordering::SeqCst) >= entry || f.copy_in.load(Ordering::SeqCst) {
                break;
            }
            f.pressure.notify_one();
            room.await;
        }
        f.waiting.store(false, Ordering::SeqCst);
        let Some(outcome) = self.shared.lock().cut.take() else { return Ok(false) };
        if let Some(done) = outcome.cancel_done {
            // A cancel still on its way must not hit the next statement.
            let _ = done.await;
        }
        if outcome.fail_block {
            let (marker, refusal) = self.silent_marker();
            ob.refuse(Expect::Query { info: StmtInfo::default(), sent: std::time::Instant::now(), stmt: 0, cap: None }, refusal);
            ob.bytes.extend_from_slice(&crate::protocol::messages::session::query(marker.as_bytes()));
        }
        Ok(outcome.extended && !outcome.server_failed)
    }

    /// At the Sync that ends a pipeline whose capped Execute completed upstream although the
    /// client got an error: a marker that fails first, so the server rolls back (implicit
    /// transaction) or aborts (block) what the client believes failed.
    fn fail_at_sync(&self, ob: &mut Outbox) {
        let (marker, refusal) = self.silent_marker();
        ob.refuse(Expect::Ack(b'1'), refusal);
        ob.bytes.extend_from_slice(&crate::protocol::messages::session::parse(b"", marker.as_bytes()));
    }

    /// A refusal marker whose error (and, for a Query, ReadyForQuery) the client never sees.
    fn silent_marker(&self) -> (String, Refusal) {
        let n = self.next_marker.fetch_add(1, Ordering::Relaxed);
        (format!("{}{n}", self.marker_prefix), Refusal { marker: n, response: Bytes::new(), stmt: 0 })
    }

    /// A refusal: the marker statement text that stands in for it upstream, and what the
    /// client gets when the server answers the marker.
    fn marker(&self, err: &GateError, stmt: u64) -> (String, Refusal) {
        let n = self.next_marker.fetch_add(1, Ordering::Relaxed);
        (format!("{}{n}", self.marker_prefix), Refusal { marker: n, response: err.to_error_response(), stmt })
    }

    /// Writes a statement record; returns its number in the session.
    /// With `sync = "write"` or `"statement"` the record is awaited before the next bytes go
    /// upstream (`flush`): no statement reaches the database before its record is written
    /// (write) or on disk (statement).
    fn record_statement(&self, audit: &StmtAudit, protocol: &str, parameters: Option<&[u8]>) -> u64 {
        let stmt = self.statements.fetch_add(1, Ordering::Relaxed) + 1;
        let durable = self.core.bridge.emit_statement(crate::events::statement(&crate::events::StatementRecord {
            session: &self.session,
            stmt,
            decision: &audit.decision,
            cached: audit.cached,
            protocol,
            literals: &audit.literals,
            parameters,
        }));
        if durable.is_some() {
            // The writer writes and fsyncs in order: the latest record durable means every
            // earlier one is.
            *self.durable.lock() = durable;
        }
        stmt
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

    /// Judges a statement text: the cached decision, else the control plane's.
    async fn decide(&self, sql: &[u8], name: Option<&[u8]>, protocol: &'static str, ob: &mut Outbox, uw: &mut WritePart) -> Result<Judged, &'static str> {
        self.core.counters.statements.fetch_add(1, Ordering::Relaxed);
        let literals: Arc<[u8]> = Arc::from(self.settings.hash_key.literals_json(sql));
        let refused = |rule: &str, err: GateError| Judged {
            verdict: Verdict::Deny(err),
            audit: StmtAudit { decision: gateway_refusal(rule), cached: false, literals: literals.clone() },
        };
        if let Some(reason) = self.core.bridge.audit_failing() {
            return Ok(refused("gateway: audit trail cannot be written", crate::errors::audit_refusal(&reason)));
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            return Ok(refused("gateway: statement text is not UTF-8", GateError::error(sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
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
                let payload = json!({"session": &*self.session, "identity_class": &*self.identity.class,
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
                        None => return Ok(refused("gateway: invalid decision from the control plane", GateError::error(sqlstate::SYSTEM_ERROR,
                            "phigate's control plane gave an invalid decision; the statement was not run")
                            .with_hint("Tell the gateway operator; details are in the gateway log."))),
                    },
                    Err(_) => return Ok(refused("gateway: control plane decision timeout", GateError::error(sqlstate::SYSTEM_ERROR,
                        format!("phigate's control plane did not decide within {} ms; the statement was not run", timeout.as_millis()))
                        .with_hint("Retry; if this persists, tell the gateway operator."))),
                }
            }
        };
        let verdict = match &decision.action {
            Action::Allow => Verdict::Allow(decision.rewritten.clone(), StmtInfo {
                protected: decision.protected,
                rewritten: decision.rewritten.is_some(),
                origins: decision.origins.clone(),
                copy_columns: decision.copy_columns.clone(),
                notices: decision.notices.clone(),
                subject_relations: decision.subject_relations.clone(),
            }),
            Action::Deny { sqlstate, message, hint } => {
                let mut e = GateError::error(refusal_sqlstate(sqlstate), message.clone());
                e.hint = hint.clone();
                Verdict::Deny(e)
            }
        };
        Ok(Judged { verdict, audit: StmtAudit { decision, cached, literals } })
    }
}

/// The decision standing for a refusal the gateway made itself (no policy decision exists),
/// with the rule that names why.
fn gateway_refusal(rule: &str) -> Arc<Decision> {
    let facts = AuditFacts { rule: serde_json::to_vec(rule).unwrap_or_default().into_boxed_slice(), ..AuditFacts::default() };
    Arc::new(Decision {
        action: Action::Deny { sqlstate: String::new(), message: String::new(), hint: None },
        reuse: Reuse::None, normalized: None, rewritten: None, protected: false, origins: None,
        copy_columns: None, notices: None, subject_relations: None, facts: Arc::new(facts), cursor: None, approval: None,
    })
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

