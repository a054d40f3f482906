//! The upstream→client half of the relay: places every answer with the session's pipeline,
//! swaps refusal markers for the gateway's errors, masks and scrubs for masked identities, and
//! streams everything else through.

use bytes::{Buf, Bytes, BytesMut};
use serde_json::json;
use std::sync::atomic::Ordering;

use crate::bridge::now_ts;
use crate::errors::{sqlstate, GateError};
use crate::protocol::framing::{next_frame, peek_header};
use crate::protocol::messages::{error_response, query, tag_b};
use crate::session::pipeline::{Entry, Event, Expect, Pipeline};
use crate::masking::rowguard::{RowGuard, Step};
use crate::protocol::stream::{release_if_idle, ReadPart, WritePart};
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
    match crate::masking::scrub::scrubbed(tag, body, detectors) {
        Ok((bytes, report)) => {
            if report.changed {
                // The audit trail keeps hashes of what was withheld, never the text itself.
                ctx.core.bridge.emit(&json!({"ts": now_ts(), "event": "message_scrubbed", "session_id": ctx.session_id,
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
    let mut out = BytesMut::new();
    let mut pass_remaining = 0usize;
    let mut cycle_rows = 0u64;
    let mut cycle_bytes = 0u64;
    let mut cycle_error: Option<String> = None;
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
            // Tracked sessions see every message whole: rows are masked or accounted,
            // descriptions planned.
            let inspect = tracked || upstream_inspected(h.tag);
            if !inspect {
                // Rows, descriptions, COPY data: stream through without waiting for the whole
                // message (the pipeline only needs the tag).
                if let Some(due) = pipeline.take_notices(h.tag) {
                    sent_notices.write(&due, &mut out);
                }
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
            // The control plane's notices precede the result they are about.
            if let Some(due) = pipeline.take_notices(frame.tag) {
                sent_notices.write(&due, &mut out);
            }
            let event = match pipeline.step(frame.tag) {
                Ok(event) => event,
                Err(lost) if tracked => {
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
                    let mut record = crate::events::result(ctx.session_id, cycle_rows, cycle_bytes + out.len() as u64,
                        duration_ms, cycle_error.take().as_deref());
                    if let Some(g) = guard.as_mut() {
                        g.take_disclosures(&mut record);
                    }
                    ctx.core.bridge.emit_line(&record);
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
