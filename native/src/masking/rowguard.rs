//! Layer 2 of masking inside the relay, for identities that see some PHI masked: knows which
//! statement or portal each upstream result belongs to and masks its DataRow and CopyData
//! messages with the plan built from that result's RowDescription.
//!
//! The extended protocol gives rows no description of their own: an Execute's DataRows follow
//! whatever Describe the client sent earlier, maybe in another round trip, or none at all. The
//! session's `Pipeline` says which message each response answers; the guard remembers the plan
//! of every described portal. Portals executed without a Describe of their own in the same
//! cycle get one injected before the Execute and its answer is swallowed here: the portal's
//! RowDescription carries the real result formats, which a statement's Describe cannot.
//!
//! Everything here fails closed: a row the guard cannot attribute to a plan, or cannot mask,
//! ends the session with an error instead of reaching the client.
//!
//! The same bookkeeping serves the accounting of disclosures (crate::disclosures): sessions on
//! a target with subject relations get a guard even when nothing is masked for them, and every
//! DataRow's subject keys are tallied before it is masked.

use bytes::{Bytes, BytesMut};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::errors::{sqlstate, GateError};
use crate::session::Identity;
use crate::masking::rules::MaskingState;
use crate::masking::copy;
use crate::masking::dates::DateStyle;
use crate::masking::plan::{self, MaskPlan, OriginFallback, PlanOptions};
use crate::masking::values::{Classified, ColumnRule, Mask};
use crate::session::pipeline::{Entry, Event, Expect};
use crate::disclosures::{ResultPlan, SubjectKey, SubjectMap, Tally};
pub use crate::session::pipeline::StmtInfo;

/// Plans remembered per portal at most (the client half refuses more portals than this anyway).
const MAX_PORTAL_PLANS: usize = 100_000;

/// What a described result's rows get: a mask plan (None: sent as they are) and what they
/// disclose (None: nothing about subjects).
#[derive(Clone, Default)]
struct Described {
    mask: Option<Arc<MaskPlan>>,
    subjects: Option<Arc<ResultPlan>>,
}

/// The accounting of disclosures for one session: the audit HMAC key, the cap on hashes kept,
/// the target's subject relations (refreshed at every RowDescription) and the cycle's tally.
pub struct Accounting {
    key: Arc<SubjectKey>,
    cap: usize,
    pub subjects: Option<Arc<SubjectMap>>,
    tally: Tally,
}

/// What rows arriving now are masked with.
enum Current {
    None,
    Rows(Described),
    /// COPY out in text or CSV: the detectors run over each CopyData payload.
    CopyScan,
    /// Text COPY of a plain read: columns masked by position with their known origins.
    CopyPlan(Arc<MaskPlan>),
}

/// The upstream→client half's layer-2 state for one masked session.
pub struct RowGuard {
    target: String,
    clear: Vec<Arc<str>>,
    portals: HashMap<Vec<u8>, Described>,
    current: Current,
    /// The identity sees some PHI masked (else the guard only keeps the accounting).
    masking: bool,
    pub accounting: Option<Accounting>,
    /// The subject relations a COPY out in progress reads (its rows carry no description).
    copy_read: Option<Arc<[Arc<str>]>>,
    /// Values masked or scrubbed in this session (for the session's events).
    pub values_masked: u64,
    /// The session's DateStyle as the server last reported it (ParameterStatus).
    date_style: DateStyle,
}

/// What the relay does with one upstream message after the guard saw it.
pub enum Step {
    /// The guard appended what the client gets (masked rows) or nothing (a swallowed reply).
    Done,
    /// Not the guard's business beyond bookkeeping: the relay handles it as usual.
    Default,
}

pub(crate) fn lost(what: &str) -> GateError {
    GateError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("phigate lost track of which statement a result belongs to ({what}); the session is closed so no unmasked row can leave"))
        .with_hint("Reconnect. If this repeats, tell the gateway operator which driver and statements you use.")
}

impl RowGuard {
    pub fn new(identity: &Identity, target: &str) -> Self {
        RowGuard {
            target: target.to_string(),
            clear: identity.clear_kinds.iter().map(|k| Arc::from(k.as_str())).collect(),
            portals: HashMap::new(),
            current: Current::None,
            masking: identity.masked,
            accounting: None,
            copy_read: None,
            values_masked: 0,
            date_style: DateStyle::Iso,
        }
    }

    /// Follows the server's DateStyle from a ParameterStatus (B) body: at startup and whenever
    /// a SET, set_config or function changes it.
    pub fn parameter_status(&mut self, body: &[u8]) {
        let mut pos = 0;
        let name = crate::protocol::framing::read_cstr(body, &mut pos);
        let value = crate::protocol::framing::read_cstr(body, &mut pos);
        if let (Some(name), Some(value)) = (name, value) {
            if name.eq_ignore_ascii_case(b"DateStyle") {
                self.date_style = DateStyle::parse(&String::from_utf8_lossy(value));
            }
        }
    }

    /// Records disclosures with the audit HMAC key, keeping up to `cap` hashes per relation
    /// and result before counting.
    pub fn with_disclosures(mut self, key: Arc<SubjectKey>, cap: usize, subjects: Option<Arc<SubjectMap>>) -> Self {
        self.accounting = Some(Accounting { key, cap, subjects, tally: Tally::default() });
        self
    }

    /// The disclosures of the statement that just finished, for its result record; the
    /// tally starts over for the next one.
    pub fn take_disclosures(&mut self) -> Option<crate::disclosures::Disclosures> {
        self.accounting.as_mut().and_then(|a| a.tally.take())
    }

    fn describe(&self, state: &MaskingState, body: &[u8], info: &StmtInfo) -> Result<Described, GateError> {
        let mask = if self.masking { self.plan(state, body, info)? } else { None };
        let subjects = match self.accounting.as_ref().and_then(|a| a.subjects.as_ref()) {
            None => None,
            Some(map) => {
                let masked = |oid, attnum| mask.is_some() && matches!(self.classify(state, oid, attnum), Classified::Masked(_));
                let plan = ResultPlan::from_row_description(body, map, masked, info.subject_relations.as_deref())
                    .ok_or_else(|| lost("a RowDescription that cannot be read"))?;
                (!plan.is_empty()).then(|| Arc::new(plan))
            }
        };
        Ok(Described { mask, subjects })
    }

    /// Tallies one DataRow's subjects (before it is masked).
    fn disclose(&mut self, described: &Described, body: &[u8]) {
        if let (Some(plan), Some(a)) = (&described.subjects, self.accounting.as_mut()) {
            a.tally.row(plan, &a.key, body, a.cap);
        }
    }

    fn plan(&self, state: &MaskingState, body: &[u8], info: &StmtInfo) -> Result<Option<Arc<MaskPlan>>, GateError> {
        let rules = state.targets.get(&self.target);
        let unexpected = |oid: u32| info.origins.as_ref().is_some_and(|o| !o.contains(&oid));
        let lookup = |oid: u32, attnum: i16| {
            if unexpected(oid) {
                // A plain read may only show columns of the tables the control plane checked: a
                // table recreated since the catalog was read has a new OID and no rules here.
                Classified::Masked(ColumnRule { kind: Arc::from("unexpected origin"), mask: Mask::Redact })
            } else {
                self.classify(state, oid, attnum)
            }
        };
        let opts = PlanOptions {
            touches_protected: info.protected,
            protected_oids: rules.map(|r| &r.protected_oids),
            // Layer 1 masked at the source: its computed columns derive from masked values and
            // are scanned. A protected statement it did not rewrite gets them redacted.
            origin_fallback: if info.rewritten { OriginFallback::Scan } else { OriginFallback::default() },
            scan_text: true,
        };
        let mut plan = MaskPlan::from_row_description(body, lookup, &opts, state.ctx.clone()).map_err(|e| e.to_gate_error())?;
        plan.date_style = self.date_style;
        Ok(plan.is_active().then(|| Arc::new(plan)))
    }

    /// Sees one whole upstream message, after the pipeline placed it (`event`; `front` is the
    /// pipeline's front entry after it); appends to `out` when it answers `Step::Done`.
    pub fn step(
        &mut self,
        tag: u8,
        frame: &Bytes,
        event: &Event,
        front: Option<&Expect>,
        state: &MaskingState,
        out: &mut BytesMut,
    ) -> Result<Step, GateError> {
        let body = &frame[5..];
        match tag {
            b'D' => {
                let described = match &self.current {
                    Current::Rows(p) => p.clone(),
                    Current::None => match front {
                        Some(Expect::Execute { portal, .. }) => {
                            let p = self.portals.get(portal).ok_or_else(|| lost("rows of an undescribed portal"))?.clone();
                            if let (Some(plan), Some(a)) = (&p.subjects, self.accounting.as_mut()) {
                                a.tally.begin(plan);
                            }
                            self.current = Current::Rows(p.clone());
                            p
                        }
                        _ => return Err(lost("rows without a description")),
                    },
                    Current::CopyScan | Current::CopyPlan(_) => return Err(lost("a row inside COPY")),
                };
                self.disclose(&described, body);
                match described.mask {
                    None => out.extend_from_slice(frame),
                    Some(plan) => {
                        let before = out.len();
                        plan::mask_data_row(&plan, body, out).map_err(|e| e.to_gate_error().into_fatal())?;
                        if out[before..] != frame[..] {
                            self.values_masked += 1;
                        }
                    }
                }
                Ok(Step::Done)
            }
            b'd' => {
                if let (Some(read), Some(a)) = (&self.copy_read, self.accounting.as_mut()) {
                    a.tally.copy_row(read);
                }
                if !self.masking {
                    out.extend_from_slice(frame);
                    return Ok(Step::Done);
                }
                if let Current::CopyPlan(plan) = &self.current {
                    let before = out.len();
                    copy::mask_copy_data(plan, body, b'\t', out).map_err(|e| e.to_gate_error().into_fatal())?;
                    if out[before..] != frame[..] {
                        self.values_masked += 1;
                    }
                    return Ok(Step::Done);
                }
                if !matches!(self.current, Current::CopyScan) {
                    return Err(lost("COPY data outside COPY"));
                }
                // client_encoding is pinned to UTF8 upstream, so text COPY output is UTF-8; bytes
                // that are not are replaced (U+FFFD) rather than passed unchecked.
                let text = crate::masking::values::utf8_text(body);
                let scrubbed = state.ctx.detectors.scrub(&text);
                if matches!((&text, &scrubbed), (Cow::Borrowed(_), Cow::Borrowed(_))) {
                    out.extend_from_slice(frame);
                } else {
                    self.values_masked += 1;
                    crate::protocol::messages::put_message(out, b'd', |o| o.extend_from_slice(scrubbed.as_bytes()));
                }
                Ok(Step::Done)
            }
            b'T' => match event {
                Event::Done(Entry { expect: Expect::DescribeStatement, .. }) => Ok(Step::Default),
                Event::Done(Entry { expect: Expect::DescribePortal { portal, info, swallow }, .. }) => {
                    let described = self.describe(state, body, info)?;
                    self.remember(portal.clone(), described);
                    Ok(if *swallow { Step::Done } else { Step::Default })
                }
                _ => match front {
                    Some(Expect::Query { info, .. }) => {
                        let described = self.describe(state, body, info)?;
                        if let (Some(plan), Some(a)) = (&described.subjects, self.accounting.as_mut()) {
                            a.tally.begin(plan);
                        }
                        self.current = Current::Rows(described);
                        Ok(Step::Default)
                    }
                    _ => Err(lost("an unexpected RowDescription")),
                },
            },
            b'n' => match event {
                Event::Done(Entry { expect: Expect::DescribeStatement, .. }) => Ok(Step::Default),
                Event::Done(Entry { expect: Expect::DescribePortal { portal, swallow, .. }, .. }) => {
                    self.remember(portal.clone(), Described::default());
                    Ok(if *swallow { Step::Done } else { Step::Default })
                }
                _ => Err(lost("an unexpected NoData")),
            },
            b'3' => {
                if let Event::Done(Entry { expect: Expect::ClosePortal(portal), .. }) = event {
                    self.portals.remove(portal);
                }
                Ok(Step::Default)
            }
            b'H' => {
                let info = match front {
                    Some(Expect::Execute { info, .. } | Expect::Query { info, .. }) => info.clone(),
                    _ => return Err(lost("an unexpected COPY")),
                };
                self.copy_read = info.subject_relations.clone().filter(|_| self.accounting.is_some());
                if !self.masking {
                    // Nothing to mask: COPY's rows pass as they are (binary too).
                    return Ok(Step::Default);
                }
                if body.first() != Some(&0) {
                    return Err(GateError::fatal(sqlstate::FEATURE_NOT_SUPPORTED,
                        "binary COPY output cannot be checked for PHI by phigate; the session is closed")
                        .with_hint("Use COPY in text or CSV format."));
                }
                if let Some(cols) = &info.copy_columns {
                    // The statement is a text COPY with no options (the control plane checked),
                    // so the data is tab-separated text with one field per planned column.
                    let n = copy::copy_out_columns(body).map_err(|e| e.to_gate_error().into_fatal())?;
                    if n != cols.len() {
                        return Err(lost("a COPY with another column count than planned"));
                    }
                    let plan = self.copy_plan(state, cols);
                    self.current = Current::CopyPlan(Arc::new(plan));
                    return Ok(Step::Default);
                }
                if info.protected && !info.rewritten {
                    return Err(GateError::fatal(sqlstate::INSUFFICIENT_PRIVILEGE,
                        "this COPY reads protected data that was not masked at the source; the session is closed")
                        .with_hint("Tell the gateway operator; the statement is in the gateway's events."));
                }
                self.current = Current::CopyScan;
                Ok(Step::Default)
            }
            b'S' => {
                self.parameter_status(body);
                Ok(Step::Default)
            }
            // The end of a result: the next rows need a description of their own.
            b'C' | b'I' | b's' | b'E' | b'Z' => {
                self.current = Current::None;
                self.copy_read = None;
                Ok(Step::Default)
            }
            _ => Ok(Step::Default),
        }
    }

    fn classify(&self, state: &MaskingState, oid: u32, attnum: i16) -> Classified {
        match state.targets.get(&self.target).and_then(|r| r.rules.get(&(oid, attnum))) {
            Some(rule) if self.clear.iter().any(|k| **k == *rule.kind) => Classified::Clear,
            Some(rule) => Classified::Masked(rule.clone()),
            None => Classified::No,
        }
    }

    fn copy_plan(&self, state: &MaskingState, cols: &[(u32, i16, u32)]) -> MaskPlan {
        let mut plan = MaskPlan::for_copy(cols.iter().map(|&(oid, attnum, ty)| (self.classify(state, oid, attnum), ty)), state.ctx.clone());
        plan.date_style = self.date_style;
        plan
    }

    fn remember(&mut self, portal: Vec<u8>, plan: Described) {
        if self.portals.len() >= MAX_PORTAL_PLANS && !self.portals.contains_key(&portal) {
            // Forgetting fails closed: rows of a forgotten portal end the session.
            self.portals.clear();
        }
        self.portals.insert(portal, plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::pipeline::Pipeline;
    use bytes::BufMut;
    use std::time::Instant;

    fn state() -> MaskingState {
        MaskingState::from_json(r#"{"pseudonym_key_hex":"00","targets":{"ehr":{"rules":[[500,1,"ssn","redact"]]}}}"#, Default::default()).unwrap()
    }

    fn guard(clear: &[&str]) -> RowGuard {
        let identity = Identity {
            subject: "a".into(),
            groups: vec![],
            class: "c".into(),
            db_role: None,
            expires_at: None,
            masked: true,
            clear_kinds: clear.iter().map(|s| s.to_string()).collect(),
            roles: vec![],
            credential: serde_json::Value::Null,
            max_rows: None,
        };
        RowGuard::new(&identity, "ehr")
    }

    fn message(tag: u8, body: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        crate::protocol::messages::put_message(&mut b, tag, |o| o.put_slice(body));
        b.freeze()
    }

    /// RowDescription of one text column from table 500, attnum 1.
    fn rd() -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_slice(b"ssn\0");
        b.put_u32(500);
        b.put_i16(1);
        b.put_u32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
        message(b'T', &b)
    }

    fn row(v: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_i32(v.len() as i32);
        b.put_slice(v);
        message(b'D', &b)
    }

    /// Feeds messages through a pipeline and the guard; returns what the client gets (Default
    /// steps pass the message as is).
    fn feed(g: &mut RowGuard, p: &mut Pipeline, msgs: &[Bytes]) -> Result<Vec<u8>, GateError> {
        let st = state();
        let mut out = BytesMut::new();
        for m in msgs {
            let event = p.step(m[0]).map_err(|l| lost(l.0))?;
            if let Step::Default = g.step(m[0], m, &event, p.front(), &st, &mut out)? {
                out.extend_from_slice(m);
            }
        }
        Ok(out.to_vec())
    }

    fn pipeline(expected: Vec<Expect>) -> Pipeline {
        let mut p = Pipeline::new(true);
        p.absorb(&mut expected.into_iter().map(|expect| Entry { expect, refusal: None, copy_ends: 0 }).collect());
        p
    }

    fn query(info: StmtInfo) -> Expect {
        Expect::Query { info, sent: Instant::now(), stmt: 0, cap: None }
    }

    fn sync() -> Expect {
        Expect::Sync { sent: Instant::now() }
    }

    #[test]
    fn swallowed_describe_masks_rows_and_disappears() {
        let mut g = guard(&[]);
        let info = StmtInfo::default();
        let mut q = pipeline(vec![
            Expect::Ack(b'2'),
            Expect::DescribePortal { portal: vec![], info: info.clone(), swallow: true },
            Expect::Execute { portal: vec![], info, stmt: 0, sent: Instant::now(), cap: None },
            sync(),
        ]);
        let z = message(b'Z', b"I");
        let out = feed(&mut g, &mut q, &[message(b'2', b""), rd(), row(b"123-45-6789"), message(b'C', b"SELECT 1\0"), z.clone()]).unwrap();
        let expected: Vec<u8> = [message(b'2', b""), row(b"***"), message(b'C', b"SELECT 1\0"), z].concat();
        assert_eq!(out, expected);
        assert!(q.front().is_none());
    }

    #[test]
    fn an_error_skips_to_sync_and_a_clear_kind_passes() {
        let mut g = guard(&["ssn"]);
        let info = StmtInfo::default();
        let mut q = pipeline(vec![
            Expect::Ack(b'1'),
            Expect::Ack(b'2'),
            Expect::Execute { portal: b"p".to_vec(), info: info.clone(), stmt: 0, sent: Instant::now(), cap: None },
            sync(),
            query(info),
        ]);
        let err = message(b'E', b"SERROR\0C42601\0Mx\0\0");
        feed(&mut g, &mut q, &[err, message(b'Z', b"I")]).unwrap();
        assert!(matches!(q.front(), Some(Expect::Query { .. })));
        let out = feed(&mut g, &mut q, &[rd(), row(b"123-45-6789")]).unwrap();
        assert!(out.ends_with(&row(b"123-45-6789")), "a kind seen in clear is neither masked nor scanned");
    }

    #[test]
    fn a_plain_read_shows_only_the_tables_it_was_allowed() {
        let mut g = guard(&["ssn"]);
        let only_600: Arc<[u32]> = Arc::from(vec![600u32]);
        let info = StmtInfo { protected: true, rewritten: false, origins: Some(only_600), copy_columns: None, notices: None, subject_relations: None };
        let mut q = pipeline(vec![query(info)]);
        // Table 500 is not in the list (say, recreated since the catalog was read): redacted
        // even for a kind seen in clear.
        let out = feed(&mut g, &mut q, &[rd(), row(b"123-45-6789")]).unwrap();
        assert!(out.ends_with(&row(b"***")));
    }

    #[test]
    fn a_text_copy_is_masked_by_the_planned_columns() {
        let mut g = guard(&[]);
        let cols: Arc<[(u32, i16, u32)]> = Arc::from(vec![(500u32, 1i16, 25u32), (600, 1, 25)]);
        let info = StmtInfo { protected: true, rewritten: false, origins: None, copy_columns: Some(cols), notices: None, subject_relations: None };
        let mut q = pipeline(vec![query(info)]);
        let copy_out = message(b'H', &[0, 0, 2, 0, 0, 0, 0]);
        let data = message(b'd', b"123-45-6789\tcall 555-123-4567\n");
        let out = feed(&mut g, &mut q, &[copy_out.clone(), data]).unwrap();
        let expected: Vec<u8> = [copy_out, message(b'd', b"***\tcall [PHONE]\n")].concat();
        assert_eq!(out, expected, "classified column redacted, the other scanned");
        // A COPY with another shape than planned is not guessed at.
        let cols: Arc<[(u32, i16, u32)]> = Arc::from(vec![(500u32, 1i16, 25u32)]);
        let info = StmtInfo { protected: true, rewritten: false, origins: None, copy_columns: Some(cols), notices: None, subject_relations: None };
        let mut q = pipeline(vec![query(info)]);
        assert!(feed(&mut g, &mut q, &[message(b'H', &[0, 0, 2, 0, 0, 0, 0])]).unwrap_err().is_fatal());
    }

    #[test]
    fn rows_nobody_described_end_the_session() {
        let mut g = guard(&[]);
        let mut q = pipeline(vec![Expect::Execute { portal: b"never".to_vec(), info: StmtInfo::default(), stmt: 0, sent: Instant::now(), cap: None }, sync()]);
        let e = feed(&mut g, &mut q, &[row(b"123-45-6789")]).unwrap_err();
        assert!(e.is_fatal());
        let mut q = pipeline(vec![sync()]);
        assert!(feed(&mut g, &mut q, &[rd()]).unwrap_err().is_fatal(), "a RowDescription nobody asked for");
    }
}
