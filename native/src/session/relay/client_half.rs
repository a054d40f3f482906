//! The client→upstream half of the relay: cuts every client message, validates it, judges
//! statements (prepared ones again after a reload), records what each will answer, and forwards.

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::errors::{sqlstate, GateError};
use crate::protocol::framing::{ClientCutter, Cut};
use crate::protocol::messages::{extended, query, session, tag_f};
use crate::session::pipeline::{Expect, StmtInfo};
use crate::protocol::stream::{release_if_idle, ReadPart, WritePart};
use super::hold::{bound_values, hold, max_rows_approval, Earlier, Outcome, Statement};
use super::*;

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
    /// How it was judged, for the record of each execution.
    audit: StmtAudit,
}

/// A bound portal: its prepared statement and the keyed hashes of its parameters (JSON).
struct Portal {
    statement: Vec<u8>,
    parameters: Box<[u8]>,
    /// max_rows (capped sessions): rows its Executes sent so far, and the Bind (its values are
    /// shown to approvers when a result is cut).
    rows: Option<Arc<AtomicU64>>,
    bind: Option<Bytes>,
    /// The statement record written at its Bind because it needed approval: the first Execute
    /// is that statement, not a new one.
    recorded: Option<u64>,
    /// The cap an approval set for this execution (None: the session's max_rows).
    max_rows: Option<Option<u64>>,
}

#[derive(Default)]
struct Extended {
    statements: HashMap<Vec<u8>, Prepared>,
    portals: HashMap<Vec<u8>, Portal>,
    /// Masked sessions: portals described since their Bind in the current cycle (their rows'
    /// RowDescription reaches layer 2). Per cycle because a Describe skipped after an error
    /// never answers: the skip ends at Sync, and an Execute after it describes again.
    described: std::collections::HashSet<Vec<u8>>,
    /// A statement with notices was prepared in this session (unmasked sessions look a
    /// portal's statement up at Execute only then).
    any_notices: bool,
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
        self.portals.get(portal).and_then(|p| self.statements.get(&p.statement)).map(|p| p.info.clone()).unwrap_or_default()
    }

    /// What an unmasked session's Execute carries: only the notices of the portal's statement.
    fn portal_notices(&self, portal: &[u8]) -> StmtInfo {
        if !self.any_notices {
            return StmtInfo::default();
        }
        let notices = self.portals.get(portal).and_then(|p| self.statements.get(&p.statement)).and_then(|p| p.info.notices.clone());
        StmtInfo { notices, ..StmtInfo::default() }
    }

    fn insert_statement(&mut self, name: &[u8], p: Prepared) {
        self.any_notices |= p.info.notices.is_some();
        self.statements.insert(name.to_vec(), p);
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

/// A statement prepared under older masking rules must be prepared again: the text prepared
/// upstream is the old rewrite.
fn rules_changed() -> GateError {
    GateError::error(sqlstate::FEATURE_NOT_SUPPORTED, "the masking rules for this prepared statement changed after a reload")
        .with_hint("Prepare the statement again.")
}

/// A refusal the gateway makes itself, with what its statement record says.
fn gateway_refused(rule: &str) -> StmtAudit {
    StmtAudit { decision: super::gateway_refusal(rule), cached: false, literals: Arc::from(&b"null"[..]) }
}

/// Judges a prepared statement again after a reload (at its next Bind or Execute): the refusal,
/// if any, with what its statement record says. The statement keeps running only if its
/// rewrite is unchanged (the text prepared upstream is the old rewrite); its layer-2 facts,
/// judgement and epoch are brought up to date.
async fn rejudge(
    ctx: &Ctx,
    ext: &mut Extended,
    stmt: &[u8],
    sql: &[u8],
    ob: &mut Outbox,
    uw: &mut WritePart,
) -> Result<Option<(GateError, StmtAudit)>, &'static str> {
    let epoch = ctx.core.cache.epoch();
    let judged = ctx.decide(sql, Some(stmt), "extended", ob, uw).await?;
    Ok(match judged.verdict {
        Verdict::Allow(rewritten, info) => match ext.statements.get_mut(stmt) {
            Some(p) if p.rewritten == rewritten => {
                p.epoch = epoch;
                ext.any_notices |= info.notices.is_some();
                p.info = info;
                p.audit = judged.audit;
                None
            }
            _ => Some((rules_changed(), gateway_refused("gateway: masking rules of a prepared statement changed"))),
        },
        Verdict::Deny(e) => Some((e, judged.audit)),
    })
}

/// The client is gone: the upstream session ends too.
async fn disconnected(uw: &mut WritePart) -> &'static str {
    let _ = uw.write_all(&session::terminate()).await;
    end_reason::CLIENT_DISCONNECTED
}

/// A malformed extended-protocol message: the session ends, as PostgreSQL would end it had the
/// gateway passed the message on.
fn malformed(what: &str, why: &str) -> GateError {
    GateError::protocol(format!("invalid {what} message: {why}"))
}

pub(super) async fn client_to_upstream(ctx: &Ctx, mut cr: ReadPart, mut uw: WritePart, mut buf: BytesMut) -> &'static str {
    let max_statement = ctx.settings.cfg.max_statement_bytes;
    let max_message = ctx.settings.cfg.max_message_bytes;
    // Masked and accounted sessions need every result's RowDescription (see Ctx::tracked).
    let masked = ctx.tracked;
    let mut ob = Outbox { masked, ..Outbox::default() };
    let mut cutter = ClientCutter::new(max_statement, max_message);
    let mut ext = Extended::default();
    // The session's last statements, for approvers of a held one.
    let mut earlier = Earlier::default();
    let cache = &ctx.core.cache;
    let capped = ctx.identity.max_rows.is_some();
    // A capped Execute completed upstream although the client got a 54000: PostgreSQL would
    // skip the client's messages up to Sync, so the gateway drops them (see cut.rs).
    let mut skip_to_sync = false;
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
                    let stmt = ctx.record_statement(&gateway_refused("gateway: statement larger than max_statement_bytes"),
                        if tag == tag_f::QUERY { "simple" } else { "extended" }, None);
                    let (marker, refusal) = ctx.marker(&err, stmt);
                    if tag == tag_f::QUERY {
                        ext.described.clear();
                        ob.refuse(Expect::Query { info: StmtInfo::default(), sent: Instant::now(), stmt, cap: None }, refusal);
                        ob.bytes.extend_from_slice(&session::query(marker.as_bytes()));
                    } else {
                        ob.refuse(Expect::Ack(b'1'), refusal);
                        ob.bytes.extend_from_slice(&session::parse(b"", marker.as_bytes()));
                    }
                    continue;
                }
                Err(e) => return ctx.die(GateError::protocol(format!("invalid message from client: {e}"))).await,
            };
            if skip_to_sync {
                match frame.tag {
                    tag_f::SYNC => {
                        skip_to_sync = false;
                        ctx.fail_at_sync(&mut ob);
                    }
                    tag_f::TERMINATE => {}
                    _ => continue,
                }
            }
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
                    let judged = match ctx.decide(sql, None, "simple", &mut ob, &mut uw).await {
                        Ok(v) => v,
                        Err(r) => return r,
                    };
                    let judged = Judged { verdict: ctx.cursor_refusal(judged.verdict, &judged.audit.decision), audit: judged.audit };
                    let stmt = ctx.record_statement(&judged.audit, "simple", None);
                    // A Query ends the implicit transaction its portals lived in.
                    ext.described.clear();
                    // A statement needing approval asks now; so does one whose earlier run was cut at
                    // max_rows (an approver may have lifted the cap for it).
                    let approval = judged.audit.decision.approval.clone().or_else(|| (capped && ctx.was_cut(sql)).then(max_rows_approval));
                    // The `run` answer's cap for this execution (None: the session's).
                    let mut max_rows: Option<Option<u64>> = None;
                    let verdict = match (judged.verdict, approval.as_deref()) {
                        (Verdict::Allow(rewritten, info), Some(approval)) => {
                            if let Err(r) = ctx.flush(&mut ob, &mut uw).await {
                                return r;
                            }
                            let st = Statement { sql, statement_name: None, protocol: "simple", stmt, literal_hashes: &judged.audit.literals,
                                parameter_hashes: None, parameters: None, approval };
                            match hold(ctx, st, &earlier, &mut cr, &mut buf).await {
                                Outcome::Run(cap) => {
                                    max_rows = cap;
                                    Verdict::Allow(rewritten, info)
                                }
                                Outcome::Refuse(err) => Verdict::Deny(err),
                                Outcome::Fatal(err) => return ctx.die(err).await,
                                Outcome::Disconnected => return disconnected(&mut uw).await,
                            }
                        }
                        (verdict, _) => verdict,
                    };
                    earlier.push(sql);
                    let sent = Instant::now();
                    match verdict {
                        Verdict::Allow(rewritten, info) => {
                            let cap = if capped || max_rows.is_some() {
                                let report = || crate::session::rowcap::CutReport { stmt, protocol: "simple", sql: Bytes::copy_from_slice(sql),
                                    literal_hashes: judged.audit.literals.clone(), parameter_hashes: None, bind: None };
                                ctx.row_cap(max_rows, &judged.audit.decision, report, None, sql)
                            } else {
                                None
                            };
                            let settle = cap.is_some();
                            ob.expect(Expect::Query { info, sent, stmt, cap });
                            match rewritten {
                                None => ob.bytes.extend_from_slice(&frame.bytes),
                                Some(r) => ob.bytes.extend_from_slice(&session::query(&r)),
                            }
                            if settle {
                                match ctx.settle_capped(&mut ob, &mut uw).await {
                                    Ok(skip) => skip_to_sync |= skip,
                                    Err(r) => return r,
                                }
                            }
                        }
                        Verdict::Deny(err) => {
                            let (marker, refusal) = ctx.marker(&err, stmt);
                            ob.refuse(Expect::Query { info: StmtInfo::default(), sent, stmt, cap: None }, refusal);
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
                    let judged = match ctx.decide(sql, Some(name), "extended", &mut ob, &mut uw).await {
                        Ok(v) => Judged { verdict: ctx.cursor_refusal(v.verdict, &v.audit.decision), audit: v.audit },
                        Err(r) => return r,
                    };
                    match judged.verdict {
                        Verdict::Allow(..) if ext.statements.len() >= MAX_PREPARED && !ext.statements.contains_key(name) => {
                            let err = GateError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED,
                                format!("this session already has {MAX_PREPARED} prepared statements"))
                                .with_hint("Close (deallocate) prepared statements you no longer need.");
                            let mut audit = gateway_refused("gateway: too many prepared statements");
                            audit.literals = judged.audit.literals;
                            let stmt = ctx.record_statement(&audit, "extended", None);
                            let (marker, refusal) = ctx.marker(&err, stmt);
                            ob.refuse(Expect::Ack(b'1'), refusal);
                            ob.bytes.extend_from_slice(&session::parse(name, marker.as_bytes()));
                        }
                        Verdict::Allow(rewritten, info) => {
                            ob.expect(Expect::Ack(b'1'));
                            match &rewritten {
                                None => ob.bytes.extend_from_slice(&frame.bytes),
                                Some(r) => ob.bytes.extend_from_slice(&session::parse_with_types(name, r, p.param_types)),
                            }
                            ext.insert_statement(name, Prepared { sql: Bytes::copy_from_slice(sql), epoch, rewritten, info, audit: judged.audit });
                        }
                        Verdict::Deny(err) => {
                            ext.statements.remove(name);
                            // Recorded now: it never runs, so no Execute will record it.
                            let stmt = ctx.record_statement(&judged.audit, "extended", None);
                            let (marker, refusal) = ctx.marker(&err, stmt);
                            ob.refuse(Expect::Ack(b'1'), refusal);
                            ob.bytes.extend_from_slice(&session::parse(name, marker.as_bytes()));
                        }
                    }
                }
                tag_f::BIND => {
                    let bind = match extended::bind(frame.body()) {
                        Ok(b) => b,
                        Err(why) => return ctx.die(malformed("Bind", why)).await,
                    };
                    let (portal, stmt) = (bind.portal, bind.statement);
                    let parameters = ctx.settings.hash_key.parameters_json(bind.values());
                    // A prepared statement runs again only while the audit trail can record it.
                    let audit_failing = ctx.core.bridge.audit_failing();
                    // Its statement needs approval at every execution (known once judged).
                    let mut needs_approval = false;
                    // A refusal and, for a statement judged again, its statement record.
                    let mut refusal: Option<(GateError, Option<StmtAudit>)> = match ext.statements.get(stmt) {
                        _ if audit_failing.is_some() => audit_failing.as_deref().map(|reason| {
                            (crate::errors::audit_refusal(reason), Some(gateway_refused("gateway: audit trail cannot be written")))
                        }),
                        None => Some((GateError::error("26000",
                            format!("prepared statement \"{}\" was not prepared through this gateway", String::from_utf8_lossy(stmt)))
                            .with_hint("Prepare statements with the protocol's Parse message in this session."), None)),
                        Some(p) if p.epoch != cache.epoch() => {
                            let sql = p.sql.clone();
                            match rejudge(ctx, &mut ext, stmt, &sql, &mut ob, &mut uw).await {
                                Ok(refusal) => {
                                    if let Some(p) = ext.statements.get(stmt) {
                                        needs_approval = p.audit.decision.approval.is_some();
                                        if !needs_approval {
                                            earlier.push(&p.sql);
                                        }
                                    }
                                    refusal.map(|(e, a)| (e, Some(a)))
                                }
                                Err(r) => return r,
                            }
                        }
                        Some(_) if ext.portals.len() >= MAX_PREPARED && !ext.portals.contains_key(portal) => {
                            Some((GateError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("this session already has {MAX_PREPARED} open portals"))
                                .with_hint("Close portals you no longer need."), None))
                        }
                        Some(p) => {
                            needs_approval = p.audit.decision.approval.is_some();
                            if !needs_approval {
                                earlier.push(&p.sql);
                            }
                            None
                        }
                    };
                    // Held before the Bind goes upstream: nothing of it (not even its locks)
                    // reaches the database before a person decides. Its statement record is
                    // written now; its first Execute is that statement.
                    let mut recorded = None;
                    let mut max_rows: Option<Option<u64>> = None;
                    // A statement whose earlier run was cut at max_rows asks too: an approver may
                    // have lifted the cap for it.
                    let was_cut = capped && refusal.is_none() && !needs_approval
                        && ext.statements.get(stmt).is_some_and(|p| ctx.was_cut(&p.sql));
                    if (needs_approval || was_cut) && refusal.is_none() {
                        if let Some(p) = ext.statements.get(stmt) {
                            let (sql, audit) = (p.sql.clone(), p.audit.clone());
                            let n = ctx.record_statement(&audit, "extended", Some(&parameters));
                            recorded = Some(n);
                            if let Err(r) = ctx.flush(&mut ob, &mut uw).await {
                                return r;
                            }
                            let approval = audit.decision.approval.clone().unwrap_or_else(max_rows_approval);
                            let st = Statement { sql: &sql, statement_name: Some(stmt), protocol: "extended", stmt: n,
                                literal_hashes: &audit.literals, parameter_hashes: Some(&parameters), parameters: Some(bound_values(&bind)),
                                approval: &approval };
                            match hold(ctx, st, &earlier, &mut cr, &mut buf).await {
                                Outcome::Run(cap) => max_rows = cap,
                                Outcome::Refuse(err) => refusal = Some((err, None)),
                                Outcome::Fatal(err) => return ctx.die(err).await,
                                Outcome::Disconnected => return disconnected(&mut uw).await,
                            }
                            earlier.push(&sql);
                        }
                    }
                    if masked {
                        ext.described.remove(portal);
                    }
                    match refusal {
                        None => {
                            ob.expect(Expect::Ack(b'2'));
                            // Drivers rebind the same portal to the same statement on every
                            // execution: only a change of statement costs allocations.
                            // max_rows: a new Bind starts the portal's count over.
                            let (rows, bind) = if capped { (Some(Arc::new(AtomicU64::new(0))), Some(frame.bytes.clone())) } else { (None, None) };
                            match ext.portals.get_mut(portal) {
                                Some(p) if p.statement == stmt => {
                                    p.parameters = parameters;
                                    p.rows = rows;
                                    p.bind = bind;
                                    p.recorded = recorded;
                                    p.max_rows = max_rows;
                                }
                                _ => {
                                    let p = Portal { statement: stmt.to_vec(), parameters, rows, bind, recorded, max_rows };
                                    ext.portals.insert(portal.to_vec(), p);
                                }
                            }
                            ob.bytes.extend_from_slice(&frame.bytes);
                        }
                        Some((err, audit)) => {
                            ext.portals.remove(portal);
                            let stmt = recorded.unwrap_or_else(|| audit.map_or(0, |a| ctx.record_statement(&a, "extended", Some(&parameters))));
                            let (marker, refusal) = ctx.marker(&err, stmt);
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
                    let stale = ext.portals.get(portal).and_then(|p| {
                        ext.statements.get(&p.statement).filter(|s| s.epoch != cache.epoch()).map(|s| (p.statement.clone(), s.sql.clone()))
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
                    // The cap an approval set at the portal's Bind, if any, holds for all its Executes.
                    let (recorded, max_rows, bound) = match ext.portals.get_mut(portal) {
                        Some(p) => (p.recorded.take(), p.max_rows, ext.statements.get(&p.statement).map(|s| (s, &p.parameters))),
                        None => (None, None, None),
                    };
                    match refusal {
                        None => {
                            // Every execution of a prepared statement is a statement record (one
                            // held at its Bind already has it).
                            let stmt = match recorded {
                                Some(n) => n,
                                None => bound.map_or(0, |(p, params)| ctx.record_statement(&p.audit, "extended", Some(params))),
                            };
                            let sent = Instant::now();
                            let lookup = || ext.portals.get(portal).and_then(|b| Some((b, ext.statements.get(&b.statement)?)));
                            let cap = match (capped || max_rows.is_some()).then(lookup) {
                                None => None,
                                Some(Some((b, p))) => {
                                    let report = || crate::session::rowcap::CutReport { stmt, protocol: "extended", sql: p.sql.clone(),
                                        literal_hashes: p.audit.literals.clone(), parameter_hashes: Some(Arc::from(&b.parameters[..])), bind: b.bind.clone() };
                                    ctx.row_cap(max_rows, &p.audit.decision, report, b.rows.as_ref(), &p.sql)
                                }
                                // A portal the gateway does not know is a SQL-level cursor's (DECLARE
                                // makes a portal of the cursor's name): its rows count against that
                                // cursor, as its FETCHes do, so Executes on it cannot start over.
                                Some(None) => max_rows.unwrap_or(ctx.identity.max_rows).map(|max| {
                                    let report = crate::session::rowcap::CutReport { stmt, protocol: "extended", sql: Bytes::new(),
                                        literal_hashes: Arc::from(&b"null"[..]), parameter_hashes: None, bind: None };
                                    let cursor: Arc<str> = Arc::from(String::from_utf8_lossy(portal).as_ref());
                                    Box::new(RowCap { max, portal: None, cursor: Some((cursor, CursorOp::Fetch)), report: Arc::new(report) })
                                }),
                            };
                            let settle = cap.is_some();
                            if masked {
                                let info = ext.portal_info(portal);
                                if !ext.described.contains(portal) {
                                    // Rows need their portal's RowDescription: ask for it and
                                    // swallow the answer (the client did not ask).
                                    ob.expect(Expect::DescribePortal { portal: portal.to_vec(), info: info.clone(), swallow: true });
                                    ob.bytes.extend_from_slice(&session::describe_portal(portal));
                                    ext.mark_described(portal);
                                }
                                ob.expect(Expect::Execute { portal: portal.to_vec(), info, stmt, sent, cap });
                            } else {
                                ob.expect(Expect::Execute { portal: Vec::new(), info: ext.portal_notices(portal), stmt, sent, cap });
                            }
                            ob.bytes.extend_from_slice(&frame.bytes);
                            if settle {
                                // The server sends the result at once (not only at the Sync the
                                // gateway holds back meanwhile).
                                ob.bytes.extend_from_slice(&session::flush());
                                match ctx.settle_capped(&mut ob, &mut uw).await {
                                    Ok(skip) => skip_to_sync |= skip,
                                    Err(r) => return r,
                                }
                            }
                        }
                        Some((err, audit)) => {
                            let stmt = ctx.record_statement(&audit, "extended", bound.map(|(_, params)| &params[..]));
                            let (marker, refusal) = ctx.marker(&err, stmt);
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
                    let stmt = ctx.record_statement(&gateway_refused("gateway: fast-path function call"), "function_call", None);
                    let (marker, refusal) = ctx.marker(&err, stmt);
                    ob.refuse(Expect::Query { info: StmtInfo::default(), sent: Instant::now(), stmt, cap: None }, refusal);
                    ob.bytes.extend_from_slice(&session::query(marker.as_bytes()));
                }
                tag_f::TERMINATE => {
                    ob.bytes.extend_from_slice(&frame.bytes);
                    let _ = ctx.flush(&mut ob, &mut uw).await;
                    return end_reason::CLIENT_QUIT;
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
            Ok(0) | Err(_) => return disconnected(&mut uw).await,
            Ok(n) => {
                ctx.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}
