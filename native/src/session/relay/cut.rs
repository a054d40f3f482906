//! Cutting a result at max_rows, on the upstream→client half: which upstream messages of a cut
//! statement the client still gets, the 54000 error that ends it, the `max_rows_exceeded`
//! request, and the cancel that stops the server from producing rows nobody will get.
//!
//! Transaction state after a cut (the client believes the statement failed, as PostgreSQL would
//! have aborted it) is made true upstream, by the server itself wherever possible:
//! - At the first row beyond the cap the gateway cancels the statement upstream. If the cancel
//!   wins, PostgreSQL fails the statement itself (57014, which becomes our 54000): its effects
//!   are rolled back, a pipeline is skipped until Sync, a transaction block is aborted.
//! - If the statement completed first (small results often do: the server is done before the
//!   gateway has read the cap), the completion becomes our 54000 and the client half, which
//!   held every later message back while the capped statement ran (relay.rs: `settle_capped`),
//!   makes the server fail instead: extended protocol — it drops the client's messages up to
//!   Sync (PostgreSQL would have skipped them) and sends a marker that fails before the Sync,
//!   so the implicit or explicit transaction is rolled back or aborted; simple protocol — when
//!   the ReadyForQuery says a transaction block is open ('T'), the client gets 'E' and a marker
//!   Query (error and ReadyForQuery swallowed) aborts the block before the client's next
//!   statement. Outside a block, a simple Query that completed has committed: a SELECT changed
//!   nothing; a write with RETURNING stays committed (documented limit).
//! - A late cancel cannot hit the next statement: the client half writes nothing more upstream
//!   until the cancel connection has closed (the server has signalled the backend by then, and
//!   a cancel reaching an idle backend is ignored).

use bytes::Bytes;
use serde_json::json;
use tokio::sync::oneshot;

use crate::bridge::RequestKind;
use crate::errors::{sqlstate, GateError};
use crate::protocol::messages::session;
use crate::session::pipeline::{Entry, Event, Expect, RowCap};
use crate::session::rowcap::{RowCounter, RowVerdict};
use super::Ctx;

/// What the client half must do once a cut statement has ended upstream.
pub(super) struct CutOutcome {
    /// An Execute (extended protocol) was cut; else a Query.
    pub extended: bool,
    /// The server failed the statement itself (the cancel won, or another error).
    pub server_failed: bool,
    /// Simple protocol: a transaction block is still open upstream and must be aborted.
    pub fail_block: bool,
    /// Resolves when the cancel connection closed.
    pub cancel_done: Option<oneshot::Receiver<()>>,
}

/// What the upstream half does with one message of a capped session.
pub(super) enum Act {
    /// As always.
    Pass,
    /// Never reaches the client (a row beyond the cap, the rest of a cut statement).
    Drop,
    /// Ends the cut statement for the client with these bytes instead.
    Replace(Bytes),
}

/// The statement being cut.
struct Cutting {
    query: bool,
    /// A Query's cut statement ended; the rest of the Query string is swallowed.
    ended: bool,
    server_failed: bool,
    error: Bytes,
    cancel_done: Option<oneshot::Receiver<()>>,
}

#[derive(Default)]
pub(super) struct Cutter {
    counter: RowCounter,
    cutting: Option<Cutting>,
}

/// The cap of the entry a row or a result's end belongs to.
fn owner<'a>(event: &'a Event, front: Option<&'a Expect>) -> Option<&'a RowCap> {
    let expect = match event {
        Event::Done(Entry { expect, .. }) => Some(expect),
        Event::Error { failed: Some(expect), .. } => Some(expect),
        _ => front,
    };
    match expect? {
        Expect::Execute { cap, .. } | Expect::Query { cap, .. } => cap.as_deref(),
        _ => None,
    }
}

/// A CommandComplete's tag without its NUL.
fn command_tag(body: &[u8]) -> &[u8] {
    body.strip_suffix(b"\0").unwrap_or(body)
}

impl Cutter {
    /// Cursors tracked now (the client half refuses DECLAREs beyond the bound).
    pub fn cursors(&self) -> usize {
        self.counter.cursors()
    }

    /// One upstream message, after the pipeline placed it (`event`) and before any output.
    pub fn see(&mut self, ctx: &Ctx, tag: u8, body: &[u8], event: &Event, front: Option<&Expect>) -> Act {
        if self.cutting.is_some() {
            return self.continue_cut(ctx, tag, body, event, front);
        }
        match tag {
            b'D' => {
                let Some(cap) = owner(event, front) else { return Act::Pass };
                match self.counter.row(cap) {
                    RowVerdict::Send => Act::Pass,
                    RowVerdict::Cut => {
                        let query = matches!(front, Some(Expect::Query { .. }));
                        self.cutting = Some(start(ctx, cap, query));
                        Act::Drop
                    }
                }
            }
            b'C' | b's' | b'I' | b'E' => {
                self.counter.result_end(owner(event, front), (tag == b'C').then(|| command_tag(body)));
                Act::Pass
            }
            b'Z' => {
                self.counter.ready(body.first().copied().unwrap_or(b'I'));
                Act::Pass
            }
            _ => Act::Pass,
        }
    }

    fn continue_cut(&mut self, ctx: &Ctx, tag: u8, body: &[u8], event: &Event, front: Option<&Expect>) -> Act {
        if matches!(tag, b'N' | b'S' | b'A') {
            return Act::Pass;
        }
        let c = self.cutting.as_mut().expect("checked by the caller");
        if c.query && !c.ended && tag == b'Z' {
            // Never seen (a statement ends before its Query's ReadyForQuery), but the client
            // must still get the error and a ReadyForQuery.
            c.ended = true;
            let error = c.error.clone();
            return match self.continue_cut(ctx, tag, body, event, front) {
                Act::Replace(z) => Act::Replace([error, z].concat().into()),
                _ => Act::Replace([&error[..], &session::ready_for_query(body.first().copied().unwrap_or(b'I'))[..]].concat().into()),
            };
        }
        if !c.query || !c.ended {
            // The cut statement's own messages until its end.
            return match tag {
                b'C' | b's' | b'I' | b'E' => {
                    self.counter.result_end(owner(event, front), None);
                    c.server_failed = tag == b'E';
                    let error = c.error.clone();
                    if c.query {
                        c.ended = true;
                    } else {
                        self.finish(ctx, false);
                    }
                    Act::Replace(error)
                }
                _ => Act::Drop,
            };
        }
        // A cut Query: the rest of its string is swallowed up to its ReadyForQuery.
        if tag != b'Z' {
            return Act::Drop;
        }
        let status = body.first().copied().unwrap_or(b'I');
        self.counter.ready(status);
        let fail_block = status == b'T';
        self.finish(ctx, fail_block);
        if fail_block {
            // The client believes the statement failed inside the block: so will the server.
            Act::Replace(session::ready_for_query(b'E'))
        } else {
            Act::Pass
        }
    }

    /// The cut statement ended upstream: the client half learns what is left to do.
    fn finish(&mut self, ctx: &Ctx, fail_block: bool) {
        let c = self.cutting.take().expect("a cut is running");
        ctx.shared.lock().cut = Some(CutOutcome { extended: !c.query, server_failed: c.server_failed, fail_block, cancel_done: c.cancel_done });
    }
}

/// The client's error for a result cut after `max` rows, naming the approval request.
pub(super) fn cut_error(max: u64, request: &str) -> GateError {
    GateError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!("result cut after {max} rows: your role allows at most {max} rows per result (max_rows)"))
        .with_hint(format!("Add a WHERE clause or LIMIT; to read more, ask an approver to approve request {request}, then run the identical statement again."))
}

/// The first row beyond the cap: tell the control plane, remember the statement, cancel it
/// upstream.
fn start(ctx: &Ctx, cap: &RowCap, query: bool) -> Cutting {
    let request = crate::events::session_uuid();
    let r = &cap.report;
    ctx.cuts.lock().remember(&r.sql);
    let hashes = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap_or(serde_json::Value::Null);
    ctx.core.bridge.tell(RequestKind::MaxRowsExceeded, json!({
        "session": &*ctx.session, "stmt": r.stmt, "subject": ctx.identity.subject,
        "identity_class": &*ctx.identity.class, "target": ctx.target_name, "protocol": r.protocol,
        "sql": String::from_utf8_lossy(&r.sql),
        "parameters": r.bind.as_ref().and_then(|b| crate::session::rowcap::bind_parameters(&b[5..])),
        "literal_hashes": hashes(&r.literal_hashes),
        "parameter_hashes": r.parameter_hashes.as_deref().map(hashes),
        "request": &*request, "rows_sent": cap.max,
    }));
    let cancel_done = ctx.core.cancels.upstream_of(ctx.our_pid).map(|key| {
        let (tx, rx) = oneshot::channel();
        let core = ctx.core.clone();
        tokio::spawn(async move {
            crate::session::cancel_upstream(&core, &key).await;
            let _ = tx.send(());
        });
        rx
    });
    Cutting { query, ended: false, server_failed: false, error: cut_error(cap.max, &request).to_error_response(), cancel_done }
}
