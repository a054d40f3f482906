//! The upstream→client half of the relay: places every answer with the session's pipeline,
//! swaps refusal markers for the gateway's errors, masks and scrubs for masked identities, and
//! streams everything else through.

use bytes::{Buf, Bytes, BytesMut};
use serde_json::json;
use std::sync::atomic::Ordering;

use crate::errors::{sqlstate, GateError};
use crate::protocol::framing::{next_frame, peek_header};
use crate::protocol::messages::{error_response, query, tag_b};
use crate::session::pipeline::{Entry, Event, Expect, Pipeline};
use crate::masking::rowguard::{RowGuard, Step};
use crate::protocol::stream::{release_if_idle, ReadPart, WritePart};
use super::cut::{Act, Cutter};
use super::notices::SentNotices;
use super::*;

/// Upstream messages the relay must see whole; everything else streams through.
fn upstream_inspected(tag: u8) -> bool {
    matches!(tag, b'E' | b'Z' | b'C' | b'R' | b'K' | b'W' | b'v')
}

/// An upstream ErrorResponse/NoticeResponse as a masked identity may see it: identifiers found by
/// the content detectors are replaced by tags and details that echo rows or keys ("Failing row
/// contains", "Key (...)=(...)") by a generic detail. If the message cannot be parsed, a generic
/// error replaces it: fail closed.
fn scrub_for_masked(ctx: &Ctx, tag: u8, body: &[u8], detectors: &crate::masking::detectors::Detectors) -> Bytes {
    match crate::masking::scrub::scrubbed(tag, body, detectors, &ctx.settings.hash_key) {
        Ok((bytes, report)) => {
            if report.changed {
                // The audit trail keeps hashes of what was withheld, never the text itself.
                ctx.core.bridge.emit(&json!({"ts": crate::events::now(), "event": "message_scrubbed", "session": &*ctx.session,
                    "kind": if tag == tag_b::NOTICE_RESPONSE { "notice" } else { "error" },
                    "detail_hmac": report.detail_hmac, "message_hmac": report.message_hmac}));
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

/// The answer to the statement being read so far, until its result record is written.
#[derive(Default)]
struct Answer {
    /// Rows CommandComplete reported (summed over a Query's statements).
    rows: u64,
    /// DataRows seen (a suspended portal reports no CommandComplete).
    data_rows: u64,
    /// Bytes for the client counted so far: flushed ones, and `out` from `mark` on.
    flushed: u64,
    mark: usize,
    sqlstate: Option<String>,
    /// The guard's masked-row counter when the answer started.
    masked_at: u64,
}

/// A statement whose answer is complete: its result record goes out once the message that
/// completed it is counted.
struct Finished {
    stmt: u64,
    sent: Option<std::time::Instant>,
    sqlstate: Option<String>,
}

/// What a pipeline event completes: an Execute, a Query (at its ReadyForQuery); a Sync's
/// ReadyForQuery completes nothing but clears an error that was the Sync's own.
fn finished_by(event: &Event, answer: &mut Answer) -> Option<Finished> {
    match event {
        Event::Done(Entry { expect: Expect::Execute { stmt, sent, .. }, .. }) if *stmt > 0 => {
            Some(Finished { stmt: *stmt, sent: Some(*sent), sqlstate: answer.sqlstate.take() })
        }
        Event::Ready(sent, stmt) if *stmt > 0 => Some(Finished { stmt: *stmt, sent: Some(*sent), sqlstate: answer.sqlstate.take() }),
        Event::Ready(..) => {
            answer.sqlstate = None;
            None
        }
        _ => None,
    }
}

/// Writes the result record of a finished statement and starts counting the next answer.
fn write_result(ctx: &Ctx, f: Finished, answer: &mut Answer, out_len: usize, guard: Option<&mut RowGuard>) {
    let masked_now = guard.as_ref().map_or(0, |g| g.values_masked);
    let disclosures = guard.and_then(RowGuard::take_disclosures);
    let record = crate::events::ResultRecord {
        rows: if answer.rows > 0 { answer.rows } else { answer.data_rows },
        bytes: answer.flushed + (out_len.saturating_sub(answer.mark)) as u64,
        duration_us: f.sent.map_or(0, |s| u64::try_from(s.elapsed().as_micros()).unwrap_or(u64::MAX)),
        sqlstate: f.sqlstate,
        rows_masked: masked_now - answer.masked_at,
        skipped: false,
    };
    ctx.core.bridge.emit_canonical(crate::events::result(&ctx.session, f.stmt, &record, disclosures.as_ref()));
    *answer = Answer { mark: out_len, masked_at: masked_now, ..Answer::default() };
}

/// Result records of statements the server skipped after an error. The first one after an
/// error in a Parse, Bind or Describe is the statement that message belonged to (drivers send
/// each statement's messages together): it failed with that error (`cause`). The others were
/// skipped: an earlier message of their pipeline failed.
fn write_skipped(ctx: &Ctx, pipeline: &mut Pipeline, cause: &mut Option<String>) {
    for stmt in pipeline.skipped.drain(..) {
        let record = match cause.take() {
            Some(code) => crate::events::ResultRecord { sqlstate: Some(code), ..Default::default() },
            None => crate::events::ResultRecord { skipped: true, ..Default::default() },
        };
        ctx.core.bridge.emit_canonical(crate::events::result(&ctx.session, stmt, &record, None));
    }
}

pub(super) async fn upstream_to_client(ctx: &Ctx, mut ur: ReadPart, mut cw: WritePart, mut buf: BytesMut) -> &'static str {
    let max_message = ctx.settings.cfg.max_message_bytes;
    let mut shutdown = ctx.core.force_close.subscribe();
    // Created once per session: a fresh Notified/changed() per loop turn costs a lock each.
    let kill = ctx.kill.notified();
    tokio::pin!(kill);
    let gateway_stop = shutdown.changed();
    tokio::pin!(gateway_stop);
    let pressure = ctx.flow.pressure.notified();
    tokio::pin!(pressure);
    let notices_ready = ctx.notices_ready.notified();
    tokio::pin!(notices_ready);
    // The client half's notices (a statement held for approval), until a message boundary.
    let mut own_notices: Vec<Bytes> = Vec::new();
    let mut out = BytesMut::new();
    let mut pass_remaining = 0usize;
    let mut answer = Answer::default();
    let mut finished: Option<Finished> = None;
    // The error of a failed Parse, Bind or Describe, until the Execute it skipped is recorded.
    let mut skip_cause: Option<String> = None;
    let masked = ctx.identity.masked;
    let tracked = ctx.tracked;
    let mut pipeline = Pipeline::new(tracked);
    let mut sent_notices = SentNotices::default();
    let mut published: Vec<Entry> = Vec::new();
    // What the client half was last woken for: it is only woken again for progress.
    let mut told = ((0, 0), false);
    let mut guard = tracked.then(|| {
        let mut g = RowGuard::new(&ctx.identity, &ctx.target_name);
        for p in &ctx.startup_parameters {
            g.parameter_status(&p[5..]);
        }
        match &ctx.settings.disclosures {
            Some((key, cap)) => g.with_disclosures(key.clone(), *cap, ctx.core.subjects.get(&ctx.target_name)),
            None => g,
        }
    });
    // Layer-2 rules, detectors and key; read again at every RowDescription so a catalog reload
    // reaches live sessions at their next result (one lock and Arc clone per result).
    let mut rules = ctx.core.masking();
    // max_rows: counts rows of capped results and cuts them (only once an entry had a cap).
    let mut cutter = Cutter::default();
    let mut scratch = BytesMut::new();
    // The next ReadyForQuery answers a silent marker (cut.rs): the client never sees it.
    let mut swallow_ready = false;
    loop {
        // Everything an answer read so far can belong to was published before its message was
        // written upstream.
        {
            let mut shared = ctx.shared.lock();
            std::mem::swap(&mut shared.published, &mut published);
            own_notices.append(&mut shared.notices);
        }
        pipeline.absorb(&mut published);
        loop {
            if pass_remaining > 0 {
                if !stream_through(&mut buf, &mut out, &mut pass_remaining) {
                    break;
                }
                continue;
            }
            if let Some(f) = finished.take() {
                write_result(ctx, f, &mut answer, out.len(), guard.as_mut());
            }
            if !pipeline.skipped.is_empty() {
                write_skipped(ctx, &mut pipeline, &mut skip_cause);
            }
            let h = match peek_header(&buf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => return end_with(&mut cw, &mut out, GateError::protocol("the upstream database sent an invalid message; closing the session"), end_reason::UPSTREAM_PROTOCOL_ERROR).await,
            };
            // Tracked sessions see every message whole: rows are masked or accounted,
            // descriptions planned; so do capped ones (rows are counted, a cut drops them).
            let inspect = tracked || pipeline.capped || upstream_inspected(h.tag);
            if !inspect {
                // Rows, descriptions, COPY data: stream through without waiting for the whole
                // message (the pipeline only needs the tag).
                if let Some(due) = pipeline.take_notices(h.tag) {
                    sent_notices.write(&due, &mut out);
                }
                let event = match pipeline.step(h.tag) {
                    Ok(event) => event,
                    Err(_) => pipeline.recover(h.tag).map_or(Event::Ongoing, |(sent, stmt)| Event::Ready(sent, stmt)),
                };
                if h.tag == b'D' {
                    answer.data_rows += 1;
                }
                finished = finished_by(&event, &mut answer).or(finished);
                let take = h.wire_len().min(buf.len());
                out.extend_from_slice(&buf[..take]);
                buf.advance(take);
                pass_remaining = h.wire_len() - take;
                continue;
            }
            let frame = match next_frame(&mut buf, |_| max_message) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return end_with(&mut cw, &mut out, GateError::protocol("the upstream database sent an oversized message; closing the session"), end_reason::UPSTREAM_PROTOCOL_ERROR).await,
            };
            // The control plane's notices precede the result they are about.
            if let Some(due) = pipeline.take_notices(frame.tag) {
                sent_notices.write(&due, &mut out);
            }
            let event = match pipeline.step(frame.tag) {
                Ok(event) => event,
                Err(lost) if tracked => {
                    let e = crate::masking::rowguard::lost(lost.0);
                    ctx.core.counters.masking_failures.fetch_add(1, Ordering::Relaxed);
                    ctx.core.bridge.emit(&json!({"ts": crate::events::now(), "event": "masking_failure", "session": &*ctx.session, "detail": e.message}));
                    return end_with(&mut cw, &mut out, e, end_reason::MASKING_FAILURE).await;
                }
                // Unmasked: only refusal markers (checked by number) and result records
                // depend on placing answers; carry on.
                Err(_) => match pipeline.recover(frame.tag) {
                    Some((sent, stmt)) => Event::Ready(sent, stmt),
                    None => Event::Ongoing,
                },
            };
            if pipeline.capped {
                match cutter.see(ctx, frame.tag, frame.body(), &event, pipeline.front()) {
                    Act::Pass => {}
                    act => {
                        // Layer 2 still follows the statement (into a scratch buffer) except for
                        // rows never sent: they are neither masked nor counted as disclosed.
                        if let (Some(g), false) = (guard.as_mut(), frame.tag == b'D') {
                            scratch.clear();
                            if let Err(e) = g.step(frame.tag, &frame.bytes, &event, pipeline.front(), &rules, &mut scratch) {
                                ctx.core.counters.masking_failures.fetch_add(1, Ordering::Relaxed);
                                ctx.core.bridge.emit(&json!({"ts": crate::events::now(), "event": "masking_failure", "session": &*ctx.session, "detail": e.message}));
                                return end_with(&mut cw, &mut out, e, end_reason::MASKING_FAILURE).await;
                            }
                        }
                        if let Act::Replace(bytes) = act {
                            if frame.tag == tag_b::READY_FOR_QUERY {
                                skip_cause = None;
                                finished = finished_by(&event, &mut answer).or(finished);
                            } else {
                                // The cut statement's end: its result record says 54000.
                                let code = Some(sqlstate::PROGRAM_LIMIT_EXCEEDED.to_string());
                                match &event {
                                    Event::Done(Entry { expect: Expect::Execute { stmt, sent, .. }, .. })
                                    | Event::Error { failed: Some(Expect::Execute { stmt, sent, .. }), .. } if *stmt > 0 => {
                                        finished = Some(Finished { stmt: *stmt, sent: Some(*sent), sqlstate: code });
                                    }
                                    _ => answer.sqlstate = code,
                                }
                            }
                            out.extend_from_slice(&bytes);
                        }
                        continue;
                    }
                }
            }
            if frame.tag == b'D' {
                answer.data_rows += 1;
            }
            // An error's SQLSTATE is known only below; other completions are placed now.
            if frame.tag != tag_b::ERROR_RESPONSE {
                finished = finished_by(&event, &mut answer).or(finished);
            }
            if let Some(g) = guard.as_mut() {
                if frame.tag == b'T' {
                    rules = ctx.core.masking();
                    if let Some(a) = g.accounting.as_mut() {
                        a.subjects = ctx.core.subjects.get(&ctx.target_name);
                    }
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
                        ctx.core.bridge.emit(&json!({"ts": crate::events::now(), "event": "masking_failure", "session": &*ctx.session, "detail": e.message}));
                        return end_with(&mut cw, &mut out, e, end_reason::MASKING_FAILURE).await;
                    }
                }
            }
            match frame.tag {
                tag_b::READY_FOR_QUERY => {
                    // The skip ended; a failed step that skipped no Execute explains nothing more.
                    skip_cause = None;
                    if swallow_ready {
                        swallow_ready = false;
                    } else {
                        out.extend_from_slice(&frame.bytes);
                    }
                }
                tag_b::COMMAND_COMPLETE => {
                    answer.rows += query::command_rows(frame.body());
                    out.extend_from_slice(&frame.bytes);
                }
                tag_b::NOTICE_RESPONSE if masked => out.extend_from_slice(&scrub_for_masked(ctx, frame.tag, frame.body(), &rules.ctx.detectors)),
                tag_b::ERROR_RESPONSE => {
                    let (refusal, failed) = match event {
                        Event::Error { refusal, failed } => (refusal, failed),
                        _ => (None, None),
                    };
                    // The statement this error ends: a failed Execute, a refused Parse, Bind or
                    // Execute (a Query's error ends it at its ReadyForQuery).
                    let ends = match (&failed, &refusal) {
                        (Some(Expect::Execute { stmt, sent, .. }), _) if *stmt > 0 => Some((*stmt, Some(*sent))),
                        (Some(_), Some(r)) if r.stmt > 0 => Some((r.stmt, None)),
                        _ => None,
                    };
                    let fails_a_step = ends.is_none() && matches!(failed, Some(Expect::Ack(b'1' | b'2') | Expect::DescribeStatement | Expect::DescribePortal { .. }));
                    let replacement = match refusal {
                        Some(r) if ctx.answers_marker(frame.body(), r.marker) => {
                            // A silent marker (cut.rs) fails a transaction the client already
                            // believes failed: neither its error nor a Query's ReadyForQuery
                            // reaches the client.
                            swallow_ready |= r.response.is_empty() && failed.is_none();
                            Some(r.response)
                        }
                        // Parameter types are resolved at Parse, Bind and Describe.
                        _ if matches!(failed, Some(Expect::Ack(b'1' | b'2') | Expect::DescribeStatement)) => unknown_type(frame.body()),
                        _ => None,
                    };
                    let bytes = match replacement {
                        Some(r) => r,
                        None if masked => scrub_for_masked(ctx, frame.tag, frame.body(), &rules.ctx.detectors),
                        None => frame.bytes,
                    };
                    let code = bytes.get(5..).and_then(|b| error_response::field(b, b'C')).map(|c| String::from_utf8_lossy(c).into_owned());
                    match ends {
                        Some((stmt, sent)) => finished = Some(Finished { stmt, sent, sqlstate: code }),
                        None if fails_a_step => skip_cause = code,
                        None => answer.sqlstate = code,
                    }
                    out.extend_from_slice(&bytes);
                }
                t if !upstream_inspected(t) => out.extend_from_slice(&frame.bytes),
                _ => {
                    // Authentication, BackendKeyData, CopyBoth or protocol negotiation mid-session:
                    // never legitimate after startup (CopyBoth is replication, which is refused).
                    return end_with(&mut cw, &mut out, GateError::protocol("the upstream database sent an unexpected message; closing the session"), end_reason::UPSTREAM_PROTOCOL_ERROR).await;
                }
            }
        }
        // Tell the client half how far the server got (it may be waiting for room).
        let progress = (pipeline.released(), pipeline.in_copy());
        if pipeline.capped {
            ctx.tracked_cursors.store(cutter.cursors(), Ordering::Relaxed);
        }
        let f = &ctx.flow;
        f.released.store(progress.0 .0, Ordering::SeqCst);
        f.released_refusals.store(progress.0 .1, Ordering::SeqCst);
        f.copy_in.store(progress.1, Ordering::SeqCst);
        if progress != told && f.waiting.load(Ordering::SeqCst) {
            told = progress;
            f.room.notify_one();
        }
        if let Some(f) = finished.take() {
            write_result(ctx, f, &mut answer, out.len(), guard.as_mut());
        }
        if !pipeline.skipped.is_empty() {
            write_skipped(ctx, &mut pipeline, &mut skip_cause);
        }
        if !out.is_empty() {
            answer.flushed += (out.len().saturating_sub(answer.mark)) as u64;
            answer.mark = 0;
            ctx.bytes_out.fetch_add(out.len() as u64, Ordering::Relaxed);
            if cw.write_all(&out).await.is_err() {
                return end_reason::CLIENT_DISCONNECTED;
            }
            out.clear();
        }
        // Not inside a message being streamed through: the notices can go now.
        if pass_remaining == 0 && !own_notices.is_empty() {
            for n in own_notices.drain(..) {
                ctx.bytes_out.fetch_add(n.len() as u64, Ordering::Relaxed);
                if cw.write_all(&n).await.is_err() {
                    return end_reason::CLIENT_DISCONNECTED;
                }
            }
        }
        release_if_idle(&mut out);
        release_if_idle(&mut buf);
        tokio::select! {
            biased;
            _ = &mut kill => {
                let (fatal, reason) = {
                    let mut shared = ctx.shared.lock();
                    (shared.fatal.take(), shared.fatal_reason)
                };
                if let Some(f) = fatal {
                    let _ = cw.write_all(&f).await;
                }
                cw.shutdown().await;
                return reason;
            }
            _ = &mut gateway_stop => {
                let e = GateError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection because the gateway is shutting down");
                let _ = cw.write_all(&e.to_error_response()).await;
                cw.shutdown().await;
                return end_reason::DRAIN;
            }
            // The client half waits for room: take what it published (skipped work is released).
            _ = &mut pressure => {
                pressure.set(ctx.flow.pressure.notified());
            }
            // The client half queued a notice for the client.
            _ = &mut notices_ready => {
                notices_ready.set(ctx.notices_ready.notified());
            }
            r = ur.read_into(&mut buf) => match r {
                Ok(0) | Err(_) => return end_reason::UPSTREAM_FAILURE,
                Ok(_) => {}
            }
        }
    }
}
