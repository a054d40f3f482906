//! Property test of the pipeline and the row guard against a model of PostgreSQL's responses.
//!
//! Arbitrary sequences of Parse, Bind, Describe, Execute, Close, Sync, Query and Flush (some
//! failing, some refused by the gateway) go through a mirror of the client half's bookkeeping
//! for a masked session; the model answers them the way PostgreSQL's message loop does (an error
//! in an extended message skips to Sync, a Query included; a Query drops the unnamed statement
//! and ends the implicit transaction). The three actors — the client half publishing and
//! flushing (its decisions taking any time), the server answering one message at a time, the
//! upstream half reading answers — run in any order causality allows. Every answer must be
//! placed, every row masked with its own statement's plan, and the client must get exactly what
//! PostgreSQL sent, minus the gateway's injected Describes, with refusals swapped in, and each
//! Execute's and Query's notice right before the first message of its own result.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::cache::Notice;
use crate::session::Identity;
use crate::masking::rules::MaskingState;
use crate::protocol::messages::put_message;
use crate::session::pipeline::{Entry, Event, Expect, Pipeline, Refusal, StmtInfo};
use crate::masking::rowguard::{RowGuard, Step};

/// Statement shapes: `s` reads table 1000+s (column 1 is classified for odd `s`), or returns no
/// rows at all (an INSERT, say).
fn has_rows(s: u32) -> bool {
    s % 3 != 2
}
fn columns(s: u32) -> usize {
    1 + (s % 3) as usize
}
fn row_count(s: u32) -> u32 {
    1 + s % 3
}

#[derive(Debug, Clone)]
enum Op {
    Parse { name: u8, s: u32, fail: bool, refused: bool },
    Bind { portal: u8, name: u8, fail: bool },
    DescribeStatement(u8),
    DescribePortal(u8),
    Execute { portal: u8, max_rows: u32, fail: bool },
    CloseStatement(u8),
    ClosePortal(u8),
    Sync { commit_fails: bool },
    Query { statements: Vec<u32>, fail_at: Option<usize>, refused: bool },
    Flush,
}

/// What the server receives.
#[derive(Debug, Clone)]
enum Up {
    Parse { name: Vec<u8>, s: u32, fail: bool },
    ParseMarker(u64),
    Bind { portal: Vec<u8>, name: Vec<u8>, fail: bool },
    BindMarker(u64),
    DescribeStatement(Vec<u8>),
    DescribePortal { portal: Vec<u8>, injected: bool },
    /// `notice`: the number of the notice its entry carries.
    Execute { portal: Vec<u8>, max_rows: u32, fail: bool, notice: u64 },
    CloseStatement(Vec<u8>),
    ClosePortal(Vec<u8>),
    Sync { commit_fails: bool },
    Query { statements: Vec<u32>, fail_at: Option<usize>, notice: u64 },
    QueryMarker(u64),
    Flush,
}

/// Why the server sent a message: what the client must get for it.
#[derive(Debug, Clone)]
enum Truth {
    Plain,
    /// Answer to a Describe the gateway injected: the client never sees it.
    Injected,
    /// Row `n` of statement `s`, from this portal (None: a simple Query's).
    Row { s: u32, n: u32, portal: Option<Vec<u8>> },
    /// The error of refusal marker n.
    Marker(u64),
}

fn name(i: u8) -> Vec<u8> {
    if i == 0 {
        Vec::new()
    } else {
        format!("n{i}").into_bytes()
    }
}

fn msg(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    put_message(&mut b, tag, |o| o.put_slice(body));
    b.freeze()
}

fn error(text: &str) -> Bytes {
    msg(b'E', format!("SERROR\0C42601\0M{text}\0\0").as_bytes())
}

fn row_description(s: u32) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(columns(s) as i16);
    for c in 0..columns(s) {
        b.put_slice(format!("c{c}\0").as_bytes());
        b.put_u32(1000 + s);
        b.put_i16(c as i16 + 1);
        b.put_u32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
    }
    msg(b'T', &b)
}

fn data_row(values: &[Vec<u8>]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        b.put_i32(v.len() as i32);
        b.put_slice(v);
    }
    msg(b'D', &b)
}

fn values(s: u32, n: u32) -> Vec<Vec<u8>> {
    (0..columns(s)).map(|c| format!("v{s}r{n}c{c}").into_bytes()).collect()
}

/// The row as a masked client gets it: column 1 of an odd statement is redacted.
fn masked_row(s: u32, n: u32) -> Bytes {
    let mut v = values(s, n);
    if s % 2 == 1 {
        v[0] = b"***".to_vec();
    }
    data_row(&v)
}

/// The notice the gateway writes before the result of the message that carries notice `n`.
fn notice_message(n: u64) -> Bytes {
    msg(b'N', format!("SNOTICE\0C01M01\0Mnotice {n}\0\0").as_bytes())
}

/// The first message of a result: what a notice goes before (an error or the ReadyForQuery
/// of a failed statement is not one).
fn starts_result(tag: u8) -> bool {
    matches!(tag, b'T' | b'D' | b'C' | b'I' | b's')
}

fn refusal_response(n: u64) -> Bytes {
    msg(b'E', format!("SERROR\0C42501\0Mrefused {n}\0\0").as_bytes())
}

struct Portal {
    s: u32,
    remaining: u32,
}

/// PostgreSQL's message loop, as far as response shapes go.
#[derive(Default)]
struct Server {
    statements: HashMap<Vec<u8>, u32>,
    portals: HashMap<Vec<u8>, Portal>,
    skipping: bool,
}

impl Server {
    /// The answer to `up`, each message with the notice the client must get right before it.
    fn answer_noted(&mut self, up: Up) -> Vec<(Bytes, Truth, Option<u64>)> {
        let notice = match up {
            Up::Execute { notice, .. } | Up::Query { notice, .. } => Some(notice),
            _ => None,
        };
        let mut out: Vec<_> = self.answer(up).into_iter().map(|(m, t)| (m, t, None)).collect();
        if let Some(first) = out.iter_mut().find(|(m, ..)| starts_result(m[0])) {
            first.2 = notice;
        }
        out
    }

    fn answer(&mut self, up: Up) -> Vec<(Bytes, Truth)> {
        if self.skipping && !matches!(up, Up::Sync { .. }) {
            return vec![];
        }
        let plain = |b: Bytes| (b, Truth::Plain);
        let mut out = vec![];
        macro_rules! fail {
            ($truth:expr) => {{
                self.skipping = true;
                out.push((error("failed"), $truth));
                return out;
            }};
        }
        match up {
            Up::Parse { name, s, fail } => {
                if fail || (!name.is_empty() && self.statements.contains_key(&name)) {
                    fail!(Truth::Plain);
                }
                self.statements.insert(name, s);
                out.push(plain(msg(b'1', b"")));
            }
            Up::ParseMarker(n) | Up::BindMarker(n) => fail!(Truth::Marker(n)),
            Up::Bind { portal, name, fail } => {
                let Some(&s) = self.statements.get(&name) else { fail!(Truth::Plain) };
                if fail || (!portal.is_empty() && self.portals.contains_key(&portal)) {
                    fail!(Truth::Plain);
                }
                self.portals.insert(portal, Portal { s, remaining: row_count(s) });
                out.push(plain(msg(b'2', b"")));
            }
            Up::DescribeStatement(name) => {
                let Some(&s) = self.statements.get(&name) else { fail!(Truth::Plain) };
                out.push(plain(msg(b't', &[0, 0])));
                out.push(plain(if has_rows(s) { row_description(s) } else { msg(b'n', b"") }));
            }
            Up::DescribePortal { portal, injected } => {
                let Some(p) = self.portals.get(&portal) else { fail!(Truth::Plain) };
                let m = if has_rows(p.s) { row_description(p.s) } else { msg(b'n', b"") };
                out.push((m, if injected { Truth::Injected } else { Truth::Plain }));
            }
            Up::Execute { portal, max_rows, fail, .. } => {
                let Some(p) = self.portals.get_mut(&portal) else { fail!(Truth::Plain) };
                let s = p.s;
                if !has_rows(s) {
                    if fail {
                        fail!(Truth::Plain);
                    }
                    out.push(plain(msg(b'C', b"INSERT 0 1\0")));
                    return out;
                }
                let take = if max_rows == 0 { p.remaining } else { max_rows.min(p.remaining) };
                let first = row_count(s) - p.remaining;
                let sent = if fail { take.min(1) } else { take };
                for n in first..first + sent {
                    out.push((data_row(&values(s, n)), Truth::Row { s, n, portal: Some(portal.clone()) }));
                }
                p.remaining -= sent;
                if fail {
                    fail!(Truth::Plain);
                }
                out.push(plain(if max_rows > 0 && p.remaining > 0 { msg(b's', b"") } else { msg(b'C', b"SELECT 1\0") }));
            }
            Up::CloseStatement(name) => {
                self.statements.remove(&name);
                out.push(plain(msg(b'3', b"")));
            }
            Up::ClosePortal(portal) => {
                self.portals.remove(&portal);
                out.push(plain(msg(b'3', b"")));
            }
            Up::Sync { commit_fails } => {
                // The implicit transaction ends, and its portals with it.
                self.skipping = false;
                self.portals.clear();
                if commit_fails {
                    out.push(plain(error("commit failed")));
                }
                out.push(plain(msg(b'Z', b"I")));
            }
            Up::Query { statements, fail_at, .. } => {
                self.statements.remove(&Vec::new());
                self.portals.clear();
                for (i, s) in statements.into_iter().enumerate() {
                    if fail_at == Some(i) {
                        out.push(plain(error("query failed")));
                        break;
                    }
                    if has_rows(s) {
                        out.push(plain(row_description(s)));
                        for n in 0..row_count(s) {
                            out.push((data_row(&values(s, n)), Truth::Row { s, n, portal: None }));
                        }
                        out.push(plain(msg(b'C', b"SELECT 1\0")));
                    } else {
                        out.push(plain(msg(b'C', b"INSERT 0 1\0")));
                    }
                }
                out.push(plain(msg(b'Z', b"I")));
            }
            Up::QueryMarker(n) => {
                out.push((error(&format!("marker {n}")), Truth::Marker(n)));
                out.push(plain(msg(b'Z', b"I")));
            }
            Up::Flush => {}
        }
        out
    }
}

/// The client half's bookkeeping for a masked session (relay.rs), reduced to what the entries
/// depend on: which statements it let through, which portals are described in this cycle.
#[derive(Default)]
struct Client {
    known: HashSet<Vec<u8>>,
    described: HashSet<Vec<u8>>,
    next_marker: u64,
    next_notice: u64,
}

impl Client {
    fn send(&mut self, op: Op, units: &mut Vec<(Up, Option<Entry>)>) {
        let entry = |expect| Some(Entry { expect, refusal: None, copy_ends: 0 });
        let refused = |expect, c: &mut Client| {
            c.next_marker += 1;
            let n = c.next_marker;
            (n, Some(Entry { expect, refusal: Some(Box::new(Refusal { marker: n, response: refusal_response(n), stmt: 0 })), copy_ends: 0 }))
        };
        let info = StmtInfo::default;
        // Every Execute and Query the gateway lets through carries a notice of its own.
        let noted = |c: &mut Client| {
            c.next_notice += 1;
            let n = c.next_notice;
            let notices: std::sync::Arc<[Notice]> = vec![Notice { key: None, message: notice_message(n) }].into();
            (n, StmtInfo { notices: Some(notices), ..StmtInfo::default() })
        };
        match op {
            Op::Parse { name: i, s, fail, refused: true } => {
                let _ = (s, fail);
                self.known.remove(&name(i));
                let (n, e) = refused(Expect::Ack(b'1'), self);
                units.push((Up::ParseMarker(n), e));
            }
            Op::Parse { name: i, s, fail, refused: false } => {
                self.known.insert(name(i));
                units.push((Up::Parse { name: name(i), s, fail }, entry(Expect::Ack(b'1'))));
            }
            Op::Bind { portal, name: i, fail } => {
                self.described.remove(&name(portal));
                if self.known.contains(&name(i)) {
                    units.push((Up::Bind { portal: name(portal), name: name(i), fail }, entry(Expect::Ack(b'2'))));
                } else {
                    let (n, e) = refused(Expect::Ack(b'2'), self);
                    units.push((Up::BindMarker(n), e));
                }
            }
            Op::DescribeStatement(i) => units.push((Up::DescribeStatement(name(i)), entry(Expect::DescribeStatement))),
            Op::DescribePortal(p) => {
                self.described.insert(name(p));
                let e = entry(Expect::DescribePortal { portal: name(p), info: info(), swallow: false });
                units.push((Up::DescribePortal { portal: name(p), injected: false }, e));
            }
            Op::Execute { portal, max_rows, fail } => {
                if self.described.insert(name(portal)) {
                    let e = entry(Expect::DescribePortal { portal: name(portal), info: info(), swallow: true });
                    units.push((Up::DescribePortal { portal: name(portal), injected: true }, e));
                }
                let (notice, info) = noted(self);
                let e = entry(Expect::Execute { portal: name(portal), info, stmt: 0, sent: Instant::now(), cap: None });
                units.push((Up::Execute { portal: name(portal), max_rows, fail, notice }, e));
            }
            Op::CloseStatement(i) => {
                self.known.remove(&name(i));
                units.push((Up::CloseStatement(name(i)), entry(Expect::Ack(b'3'))));
            }
            Op::ClosePortal(p) => {
                self.described.remove(&name(p));
                units.push((Up::ClosePortal(name(p)), entry(Expect::ClosePortal(name(p)))));
            }
            Op::Sync { commit_fails } => {
                self.described.clear();
                units.push((Up::Sync { commit_fails }, entry(Expect::Sync { sent: Instant::now() })));
            }
            Op::Query { statements, fail_at, refused: r } => {
                self.described.clear();
                if r {
                    let expect = Expect::Query { info: info(), sent: Instant::now(), stmt: 0, cap: None };
                    let (n, e) = refused(expect, self);
                    units.push((Up::QueryMarker(n), e));
                } else {
                    let (notice, info) = noted(self);
                    let expect = Expect::Query { info, sent: Instant::now(), stmt: 0, cap: None };
                    units.push((Up::Query { statements, fail_at, notice }, entry(expect)));
                }
            }
            Op::Flush => units.push((Up::Flush, None)),
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0u8..3;
    prop_oneof![
        4 => (n.clone(), 0..6u32, prop::bool::weighted(0.15), prop::bool::weighted(0.1))
            .prop_map(|(name, s, fail, refused)| Op::Parse { name, s, fail, refused }),
        4 => (n.clone(), n.clone(), prop::bool::weighted(0.1)).prop_map(|(portal, name, fail)| Op::Bind { portal, name, fail }),
        1 => n.clone().prop_map(Op::DescribeStatement),
        2 => n.clone().prop_map(Op::DescribePortal),
        4 => (n.clone(), 0..3u32, prop::bool::weighted(0.1)).prop_map(|(portal, max_rows, fail)| Op::Execute { portal, max_rows, fail }),
        1 => n.clone().prop_map(Op::CloseStatement),
        1 => n.prop_map(Op::ClosePortal),
        3 => prop::bool::weighted(0.1).prop_map(|commit_fails| Op::Sync { commit_fails }),
        2 => (prop::collection::vec(0..6u32, 1..3), prop::option::weighted(0.2, 0..2usize), prop::bool::weighted(0.2))
            .prop_map(|(statements, fail_at, refused)| Op::Query { statements, fail_at, refused }),
        1 => Just(Op::Flush),
    ]
}

fn masked_identity() -> Identity {
    Identity {
        subject: "a".into(),
        groups: vec![],
        class: "c".into(),
        db_role: None,
        expires_at: None,
        masked: true,
        clear_kinds: vec![],
        roles: vec![],
        credential: serde_json::Value::Null,
        max_rows: None,
    }
}

/// Runs one interleaving; returns an error message on the first divergence.
fn run(ops: Vec<Op>, schedule: Vec<u8>) -> Result<(), String> {
    let state = MaskingState::from_json(
        r#"{"pseudonym_key_hex":"00","targets":{"ehr":{"rules":[[1001,1,"k","redact"],[1003,1,"k","redact"],[1005,1,"k","redact"]]}}}"#,
        Default::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut client = Client::default();
    let mut server = Server::default();
    let mut pipeline = Pipeline::new(true);
    let mut guard = RowGuard::new(&masked_identity(), "ehr");
    let mut ops: VecDeque<Op> = ops.into();
    // The client half's outbox, what it published, what the server has to read.
    let mut outbox: Vec<(Up, Option<Entry>)> = vec![];
    let mut published: Vec<Entry> = vec![];
    let mut server_input: VecDeque<Up> = VecDeque::new();
    let mut wire: VecDeque<(Bytes, Truth, Option<u64>)> = VecDeque::new();
    let (mut total, mut total_refusals) = (0u64, 0u64);
    let mut got = BytesMut::new();
    let mut want = BytesMut::new();

    let mut flush = |outbox: &mut Vec<(Up, Option<Entry>)>, published: &mut Vec<Entry>, input: &mut VecDeque<Up>| {
        for (up, entry) in outbox.drain(..) {
            if let Some(e) = entry {
                total += 1;
                total_refusals += e.refusal.is_some() as u64;
                published.push(e);
            }
            input.push_back(up);
        }
    };
    let mut read = |n: usize,
                    wire: &mut VecDeque<(Bytes, Truth, Option<u64>)>,
                    published: &mut Vec<Entry>,
                    pipeline: &mut Pipeline,
                    got: &mut BytesMut,
                    want: &mut BytesMut|
     -> Result<(), String> {
        pipeline.absorb(published);
        for _ in 0..n {
            let Some((m, truth, notice)) = wire.pop_front() else { break };
            let tag = m[0];
            if let Some(n) = notice {
                want.extend_from_slice(&notice_message(n));
            }
            if let Some(due) = pipeline.take_notices(tag) {
                for n in due.iter() {
                    got.extend_from_slice(&n.message);
                }
            }
            let event = pipeline.step(tag).map_err(|l| format!("pipeline lost: {} at {:?} ({truth:?})", l.0, tag as char))?;
            match &truth {
                Truth::Plain => want.extend_from_slice(&m),
                Truth::Injected => {}
                Truth::Row { s, n, portal } => {
                    let attributed = match (pipeline.front(), portal) {
                        (Some(Expect::Execute { portal: p, .. }), Some(q)) => p == q,
                        (Some(Expect::Query { .. }), None) => true,
                        _ => false,
                    };
                    if !attributed {
                        return Err(format!("row of statement {s} (portal {portal:?}) attributed to {:?}", pipeline.front()));
                    }
                    want.extend_from_slice(&masked_row(*s, *n));
                }
                Truth::Marker(n) => want.extend_from_slice(&refusal_response(*n)),
            }
            let step = guard.step(tag, &m, &event, pipeline.front(), &state, got).map_err(|e| format!("row guard: {e} ({truth:?})"))?;
            if let Step::Default = step {
                match event {
                    Event::Error { refusal: Some(r), .. } => {
                        if !matches!(truth, Truth::Marker(n) if n == r.marker) {
                            return Err(format!("refusal {} placed on {truth:?}", r.marker));
                        }
                        got.extend_from_slice(&r.response);
                    }
                    _ => got.extend_from_slice(&m),
                }
            }
        }
        Ok(())
    };

    let mut schedule: VecDeque<u8> = schedule.into();
    loop {
        let action = match schedule.pop_front() {
            Some(a) => a % 6,
            // Finally: everything is sent (ending with a Sync), answered and read.
            None => {
                while let Some(op) = ops.pop_front() {
                    client.send(op, &mut outbox);
                }
                client.send(Op::Sync { commit_fails: false }, &mut outbox);
                flush(&mut outbox, &mut published, &mut server_input);
                while let Some(up) = server_input.pop_front() {
                    wire.extend(server.answer_noted(up));
                }
                let n = wire.len();
                read(n, &mut wire, &mut published, &mut pipeline, &mut got, &mut want)?;
                break;
            }
        };
        match action {
            // The client half takes the next message (its decision may come much later).
            0 | 1 => {
                if let Some(op) = ops.pop_front() {
                    client.send(op, &mut outbox);
                }
            }
            // It writes what it has (before awaiting a decision, or at the end of a read).
            2 => flush(&mut outbox, &mut published, &mut server_input),
            // The server answers the next message it has.
            3 => {
                if let Some(up) = server_input.pop_front() {
                    wire.extend(server.answer_noted(up));
                }
            }
            // The upstream half reads a few answers.
            4 => read(1 + (schedule.len() % 3), &mut wire, &mut published, &mut pipeline, &mut got, &mut want)?,
            // Back-pressure: the upstream half takes what was published without reading.
            _ => {
                pipeline.absorb(&mut published);
                // An asynchronous notice can come between any two messages.
                wire.push_back((msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0"), Truth::Plain, None));
            }
        }
    }
    if got != want {
        return Err("the client got other bytes than PostgreSQL sent (after masking and refusals)".into());
    }
    if pipeline.front().is_some() || pipeline.released() != (total, total_refusals) {
        return Err(format!("entries left: released {:?} of {:?}", pipeline.released(), (total, total_refusals)));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_answer_is_placed_whatever_the_timing(
        ops in prop::collection::vec(op(), 1..60),
        schedule in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Err(e) = run(ops, schedule) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The sequence from the field, with the Bind's error read while the Query's decision is in
/// flight (its entry not yet published).
#[test]
fn bind_of_an_unparsed_statement_then_query_sync_close_sync() {
    let ops = vec![
        Op::Bind { portal: 0, name: 0, fail: false },
        Op::Query { statements: vec![1], fail_at: None, refused: false },
        Op::Sync { commit_fails: false },
        Op::CloseStatement(0),
        Op::Sync { commit_fails: false },
    ];
    // Bind sent and flushed; the server fails it; the upstream half reads the error; only then
    // are Query, Sync, Close, Sync sent.
    let schedule = vec![0, 2, 3, 4, 0, 0, 0, 0, 2, 3, 3, 3, 3, 4, 4, 4, 4];
    run(ops, schedule).unwrap();
}
