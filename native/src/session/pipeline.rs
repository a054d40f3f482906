//! What PostgreSQL owes a session: for every message the relay sent upstream, the response it
//! will get, in order, following PostgreSQL's own message loop.
//!
//! The client→upstream half records an `Entry` for each message and publishes it before the
//! message is written upstream; the upstream→client half absorbs what was published each time it
//! reads, then feeds every upstream message's tag to `Pipeline::step`, which says what that
//! message answers. Publishing before writing makes this exact whatever the timing of the two
//! halves: when a response is read, the entry of the message that caused it is already here, even
//! if the client half is still waiting for a decision about a later message.
//!
//! PostgreSQL's rules that shape the responses:
//! - An error in an extended-protocol message (Parse, Bind, Describe, Execute, Close) makes the
//!   server ignore every message up to the next Sync, a simple Query included. Entries that turn
//!   out to be skipped are dropped as soon as they are known, including ones published after the
//!   error arrived. An error in a simple Query, or at Sync (a failed commit), skips nothing.
//! - COPY FROM STDIN reads the client's messages after its statement: CopyData, then CopyDone or
//!   CopyFail; a Sync or Flush among them is read and ignored (libpq sends one after the Execute).
//!   Another message ends the COPY with an error. Entries carry how many CopyDone/CopyFail the
//!   client had sent before them, which tells the messages a COPY read from those after it.
//! - ParameterStatus, NoticeResponse and NotificationResponse can come at any time.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::cache::Notice;
pub use crate::session::rowcap::RowCap;

/// What the control plane said of a statement, as far as layer 2 cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StmtInfo {
    /// It reads a protected relation.
    pub protected: bool,
    /// Layer 1 rewrote it: computed columns derive from masked values only.
    pub rewritten: bool,
    /// A plain read left to layer 2: the only table OIDs its columns may come from.
    pub origins: Option<Arc<[u32]>>,
    /// A text COPY of such a read: each output column's (table OID, attnum, type OID).
    pub copy_columns: Option<Arc<[(u32, i16, u32)]>>,
    /// Notices the client gets right before the result (taken when it starts).
    pub notices: Option<Arc<[Notice]>>,
    /// `[phi.subjects]` relations it reads (accounting of disclosures).
    pub subject_relations: Option<Arc<[Arc<str>]>>,
}

/// The response expected for one message sent upstream. Portal names and statement facts are
/// only filled in for masked sessions (layer 2 needs them); others carry empty values.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete, BindComplete or CloseComplete (by tag).
    Ack(u8),
    /// CloseComplete for a portal: its plan is dropped.
    ClosePortal(Vec<u8>),
    /// ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// RowDescription or NoData for a portal; `swallow` when the gateway injected the Describe.
    DescribePortal { portal: Vec<u8>, info: StmtInfo, swallow: bool },
    /// DataRows or COPY, then CommandComplete, EmptyQueryResponse or PortalSuspended. `stmt`:
    /// the number of its statement record (0: none, e.g. a portal the gateway does not know).
    /// `cap`: the max_rows cap of this execution (None: no cap, nothing is counted).
    Execute { portal: Vec<u8>, info: StmtInfo, stmt: u64, sent: Instant, cap: Option<Box<RowCap>> },
    /// ReadyForQuery.
    Sync { sent: Instant },
    /// A simple Query: any number of results, then ReadyForQuery.
    Query { info: StmtInfo, sent: Instant, stmt: u64, cap: Option<Box<RowCap>> },
}

/// A refusal standing in for the client's message upstream: a marker statement that fails to
/// parse (or a Bind naming it), whose error the gateway replaces by its own.
#[derive(Debug)]
pub struct Refusal {
    pub marker: u64,
    /// The ErrorResponse the client gets instead of the marker's.
    pub response: Bytes,
    /// The statement record the refusal answers (0: none).
    pub stmt: u64,
}

/// One message sent upstream.
#[derive(Debug)]
pub struct Entry {
    pub expect: Expect,
    pub refusal: Option<Box<Refusal>>,
    /// CopyDone/CopyFail messages the client had sent before this message.
    pub copy_ends: u32,
}

impl Entry {
    /// The statement record whose result this message's answer is (0: none).
    pub fn stmt(&self) -> u64 {
        match &self.expect {
            Expect::Execute { stmt, .. } | Expect::Query { stmt, .. } if *stmt > 0 => *stmt,
            _ => self.refusal.as_ref().map_or(0, |r| r.stmt),
        }
    }
}

/// What one upstream message means for the pipeline.
#[derive(Debug)]
pub enum Event {
    /// An asynchronous message, or part of the front entry's response (which stays in front).
    Ongoing,
    /// The front entry's response is complete.
    Done(Entry),
    /// An ErrorResponse; `refusal` when the failing message was a refusal marker, `failed` the
    /// extended-protocol message that failed (None for a Query's or Sync's error, whose entry
    /// stays until ReadyForQuery, and for an unsolicited error such as a FATAL shutdown).
    Error { refusal: Option<Box<Refusal>>, failed: Option<Expect> },
    /// ReadyForQuery ended the cycle that started when its Sync or Query was sent; the
    /// Query's statement record (0 for a Sync).
    Ready(Instant, u64),
}

/// A response the pipeline cannot place: PostgreSQL and the gateway disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost(pub &'static str);

#[derive(Debug)]
enum Mode {
    Normal,
    /// After an error in an extended-protocol message: everything up to Sync is ignored.
    Skipping,
    /// COPY FROM STDIN started by this Query or Execute is reading the client's messages.
    CopyIn(Entry),
}

/// The upstream→client half's view of what PostgreSQL still owes.
#[derive(Debug)]
pub struct Pipeline {
    queue: VecDeque<Entry>,
    mode: Mode,
    /// Fail rather than guess where PostgreSQL's reading stopped (masked sessions: a wrong guess
    /// would attribute rows to the wrong statement).
    strict: bool,
    /// Entries that left (answered, skipped, or read by a COPY), and refusals among them.
    released: u64,
    released_refusals: u64,
    /// Statement records whose messages the server skipped or never answered: their results
    /// say so. The upstream half takes them after every step.
    pub skipped: Vec<u64>,
    /// Some entry had a max_rows cap: the upstream half counts rows from then on.
    pub capped: bool,
}

impl Pipeline {
    pub fn new(strict: bool) -> Self {
        Pipeline { queue: VecDeque::new(), mode: Mode::Normal, strict, released: 0, released_refusals: 0, skipped: Vec::new(), capped: false }
    }

    /// Releases an entry that gets no answer of its own.
    fn drop_unanswered(&mut self, e: Entry) {
        let stmt = e.stmt();
        if stmt > 0 {
            self.skipped.push(stmt);
        }
        self.release(e);
    }

    /// Takes the entries the client half published (in order) and drops what is already known
    /// to be skipped.
    pub fn absorb(&mut self, published: &mut Vec<Entry>) {
        if !self.capped {
            self.capped = published.iter().any(|e| matches!(e.expect, Expect::Execute { cap: Some(_), .. } | Expect::Query { cap: Some(_), .. }));
        }
        self.queue.extend(published.drain(..));
        self.settle();
    }

    /// The entry whose response is (or comes) next.
    pub fn front(&self) -> Option<&Expect> {
        self.queue.front().map(|e| &e.expect)
    }

    /// Entries and refusals that have left the pipeline so far.
    pub fn released(&self) -> (u64, u64) {
        (self.released, self.released_refusals)
    }

    /// True while a COPY FROM STDIN waits for the client's data.
    pub fn in_copy(&self) -> bool {
        matches!(self.mode, Mode::CopyIn(_))
    }

    fn release(&mut self, e: Entry) -> Entry {
        self.released += 1;
        if e.refusal.is_some() {
            self.released_refusals += 1;
        }
        e
    }

    fn pop(&mut self) -> Entry {
        let e = self.queue.pop_front().expect("front checked by the caller");
        self.release(e)
    }

    fn take_refusal(&mut self, e: &mut Entry) -> Option<Box<Refusal>> {
        let r = e.refusal.take();
        if r.is_some() {
            self.released_refusals += 1;
        }
        r
    }

    /// While skipping, every entry before the next Sync is a message PostgreSQL ignores.
    fn settle(&mut self) {
        if !matches!(self.mode, Mode::Skipping) {
            return;
        }
        while self.queue.front().is_some_and(|e| !matches!(e.expect, Expect::Sync { .. })) {
            let e = self.queue.pop_front().expect("front checked");
            self.drop_unanswered(e);
        }
    }

    /// The notices of the front Execute or Query, taken when `tag` (not yet stepped) starts
    /// its result: the first message answering it that is not an ErrorResponse (a statement
    /// failing before it has a result gets none; notices of later statements of a Query, or
    /// of a later Execute, wait for their own result).
    pub fn take_notices(&mut self, tag: u8) -> Option<Arc<[Notice]>> {
        if !matches!(self.mode, Mode::Normal) || !matches!(tag, b'T' | b'D' | b'C' | b'I' | b'G' | b'H' | b's') {
            return None;
        }
        match &mut self.queue.front_mut()?.expect {
            Expect::Execute { info, .. } | Expect::Query { info, .. } => info.notices.take(),
            _ => None,
        }
    }

    /// Sees one upstream message (by tag) and says what it answers.
    pub fn step(&mut self, tag: u8) -> Result<Event, Lost> {
        if matches!(tag, b'N' | b'S' | b'A') {
            return Ok(Event::Ongoing);
        }
        match self.mode {
            Mode::CopyIn(_) => self.step_copy_in(tag),
            Mode::Skipping => match tag {
                b'Z' => match self.front() {
                    Some(Expect::Sync { .. }) => {
                        self.mode = Mode::Normal;
                        let Expect::Sync { sent } = self.pop().expect else { unreachable!() };
                        Ok(Event::Ready(sent, 0))
                    }
                    _ => Err(Lost("a ReadyForQuery with no Sync to answer")),
                },
                // Only a FATAL error (the server shutting down) can come while skipping.
                b'E' => Ok(Event::Error { refusal: None, failed: None }),
                _ => Err(Lost("a result for a message the server skipped")),
            },
            Mode::Normal => self.step_normal(tag),
        }
    }

    fn step_normal(&mut self, tag: u8) -> Result<Event, Lost> {
        let front = self.queue.front().map(|e| &e.expect);
        match tag {
            b'1' | b'2' | b'3' => match front {
                Some(Expect::Ack(t)) if *t == tag => Ok(Event::Done(self.pop())),
                Some(Expect::ClosePortal(_)) if tag == b'3' => Ok(Event::Done(self.pop())),
                _ => Err(Lost("an unexpected completion message")),
            },
            b't' => match front {
                Some(Expect::DescribeStatement) => Ok(Event::Ongoing),
                _ => Err(Lost("an unexpected ParameterDescription")),
            },
            b'T' => match front {
                Some(Expect::Query { .. }) => Ok(Event::Ongoing),
                Some(Expect::DescribeStatement | Expect::DescribePortal { .. }) => Ok(Event::Done(self.pop())),
                _ => Err(Lost("an unexpected RowDescription")),
            },
            b'n' => match front {
                Some(Expect::DescribeStatement | Expect::DescribePortal { .. }) => Ok(Event::Done(self.pop())),
                _ => Err(Lost("an unexpected NoData")),
            },
            b'D' | b'H' | b'd' | b'c' => match front {
                Some(Expect::Execute { .. } | Expect::Query { .. }) => Ok(Event::Ongoing),
                _ => Err(Lost("rows or COPY data nobody asked for")),
            },
            b'C' | b'I' => match front {
                Some(Expect::Execute { .. }) => Ok(Event::Done(self.pop())),
                Some(Expect::Query { .. }) => Ok(Event::Ongoing),
                _ => Err(Lost("an unexpected command completion")),
            },
            b's' => match front {
                Some(Expect::Execute { .. }) => Ok(Event::Done(self.pop())),
                _ => Err(Lost("an unexpected PortalSuspended")),
            },
            b'G' => match front {
                Some(Expect::Execute { .. } | Expect::Query { .. }) => {
                    let owner = self.queue.pop_front().expect("front checked");
                    self.mode = Mode::CopyIn(owner);
                    Ok(Event::Ongoing)
                }
                _ => Err(Lost("an unexpected COPY FROM STDIN")),
            },
            b'E' => match front {
                None | Some(Expect::Sync { .. }) => Ok(Event::Error { refusal: None, failed: None }),
                Some(Expect::Query { .. }) => {
                    let mut e = self.queue.pop_front().expect("front checked");
                    let refusal = self.take_refusal(&mut e);
                    self.queue.push_front(e);
                    Ok(Event::Error { refusal, failed: None })
                }
                Some(_) => {
                    let mut e = self.queue.pop_front().expect("front checked");
                    let refusal = self.take_refusal(&mut e);
                    let e = self.release(e);
                    self.mode = Mode::Skipping;
                    self.settle();
                    Ok(Event::Error { refusal, failed: Some(e.expect) })
                }
            },
            b'Z' => match front {
                Some(Expect::Sync { .. } | Expect::Query { .. }) => match self.pop().expect {
                    Expect::Sync { sent } => Ok(Event::Ready(sent, 0)),
                    Expect::Query { sent, stmt, .. } => Ok(Event::Ready(sent, stmt)),
                    _ => unreachable!(),
                },
                _ => Err(Lost("an unexpected ReadyForQuery")),
            },
            _ => Ok(Event::Ongoing),
        }
    }

    fn step_copy_in(&mut self, tag: u8) -> Result<Event, Lost> {
        let Mode::CopyIn(owner) = &self.mode else { unreachable!() };
        let zone = owner.copy_ends;
        let in_zone = |e: &Entry| e.copy_ends == zone;
        match tag {
            b'C' => {
                // CopyDone was read: the Syncs sent before it were read and ignored.
                while let Some(e) = self.queue.front().filter(|e| in_zone(e)) {
                    if !matches!(e.expect, Expect::Sync { .. }) {
                        return Err(Lost("a COPY that completed over a message sent inside its data"));
                    }
                    self.pop();
                }
                let Mode::CopyIn(owner) = std::mem::replace(&mut self.mode, Mode::Normal) else { unreachable!() };
                Ok(match owner.expect {
                    // A Query goes on (more statements, then ReadyForQuery).
                    Expect::Query { .. } => {
                        self.queue.push_front(owner);
                        Event::Ongoing
                    }
                    _ => Event::Done(self.release(owner)),
                })
            }
            b'E' => {
                // The COPY failed. Where in the client's messages the server stopped reading is
                // unknown when some were pipelined inside the COPY's data (an error before its
                // first read, or one in the data). Masked sessions do not guess.
                if self.queue.front().is_some_and(in_zone) {
                    if self.strict {
                        return Err(Lost("a COPY that failed with messages pipelined inside its data"));
                    }
                    // Guess that the COPY read them: Syncs ignored, the first other message ended it.
                    while self.queue.front().is_some_and(|e| in_zone(e) && matches!(e.expect, Expect::Sync { .. })) {
                        self.pop();
                    }
                    if self.queue.front().is_some_and(in_zone) {
                        let e = self.queue.pop_front().expect("front checked");
                        self.drop_unanswered(e);
                    }
                }
                let Mode::CopyIn(owner) = std::mem::replace(&mut self.mode, Mode::Normal) else { unreachable!() };
                Ok(match owner.expect {
                    Expect::Query { .. } => {
                        self.queue.push_front(owner);
                        Event::Error { refusal: None, failed: None }
                    }
                    _ => {
                        let owner = self.release(owner);
                        self.mode = Mode::Skipping;
                        self.settle();
                        Event::Error { refusal: None, failed: Some(owner.expect) }
                    }
                })
            }
            _ => Err(Lost("a result while COPY FROM STDIN reads data")),
        }
    }

    /// After a `Lost` in a session that may go on (unmasked: nothing depends on attribution but
    /// refusal markers, which are checked by number, and result timings): a ReadyForQuery ends
    /// the oldest cycle; anything else is passed over.
    pub fn recover(&mut self, tag: u8) -> Option<(Instant, u64)> {
        if tag != b'Z' {
            return None;
        }
        if let Mode::CopyIn(owner) = std::mem::replace(&mut self.mode, Mode::Normal) {
            self.drop_unanswered(owner);
        }
        while let Some(e) = self.queue.pop_front() {
            match e.expect {
                Expect::Sync { sent } => {
                    self.release(e);
                    return Some((sent, 0));
                }
                Expect::Query { sent, stmt, .. } => {
                    self.release(e);
                    return Some((sent, stmt));
                }
                _ => self.drop_unanswered(e),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(expect: Expect) -> Entry {
        Entry { expect, refusal: None, copy_ends: 0 }
    }
    fn sync() -> Expect {
        Expect::Sync { sent: Instant::now() }
    }
    fn query() -> Expect {
        Expect::Query { info: StmtInfo::default(), sent: Instant::now(), stmt: 0, cap: None }
    }
    fn execute() -> Expect {
        Expect::Execute { portal: vec![], info: StmtInfo::default(), stmt: 0, sent: Instant::now(), cap: None }
    }
    fn refused(expect: Expect, marker: u64) -> Entry {
        Entry { expect, refusal: Some(Box::new(Refusal { marker, response: Bytes::new(), stmt: 0 })), copy_ends: 0 }
    }
    fn tags(p: &mut Pipeline, tags: &[u8]) -> Vec<Event> {
        tags.iter().map(|t| p.step(*t).unwrap_or_else(|l| panic!("{} at {:?}", l.0, *t as char))).collect()
    }

    /// The sequence from the field: Bind of a statement never parsed (refused), a Query, Sync,
    /// Close, Sync — with the Bind's error read before the Query was even published.
    #[test]
    fn an_error_skips_a_query_published_after_it() {
        let mut p = Pipeline::new(true);
        p.absorb(&mut vec![refused(Expect::Ack(b'2'), 1)]);
        match p.step(b'E').unwrap() {
            Event::Error { refusal: Some(r), failed: Some(Expect::Ack(b'2')) } => assert_eq!(r.marker, 1),
            other => panic!("{other:?}"),
        }
        p.absorb(&mut vec![e(query()), e(sync()), e(Expect::Ack(b'3')), e(sync())]);
        assert!(matches!(p.step(b'Z').unwrap(), Event::Ready(..)));
        assert!(matches!(p.step(b'3').unwrap(), Event::Done(_)));
        assert!(matches!(p.step(b'Z').unwrap(), Event::Ready(..)));
        assert!(p.front().is_none());
        assert_eq!(p.released(), (5, 1));
    }

    #[test]
    fn errors_in_a_query_or_at_sync_skip_nothing() {
        let mut p = Pipeline::new(true);
        p.absorb(&mut vec![refused(query(), 7), e(Expect::Ack(b'1')), e(sync())]);
        match p.step(b'E').unwrap() {
            Event::Error { refusal: Some(r), failed: None } => assert_eq!(r.marker, 7),
            other => panic!("{other:?}"),
        }
        tags(&mut p, b"Z1");
        // A commit failing at Sync: ErrorResponse, then ReadyForQuery for the same Sync.
        assert!(matches!(p.step(b'E').unwrap(), Event::Error { failed: None, .. }));
        assert!(matches!(p.step(b'Z').unwrap(), Event::Ready(..)));
        assert_eq!(p.released(), (3, 1));
    }

    #[test]
    fn skipped_refusals_are_released_before_their_sync_arrives() {
        let mut p = Pipeline::new(false);
        p.absorb(&mut vec![e(Expect::Ack(b'1'))]);
        p.step(b'E').unwrap();
        // Refused queries pipelined after the failed Parse, no Sync yet: all skipped.
        p.absorb(&mut (1..=100).map(|n| refused(query(), n)).collect());
        assert_eq!(p.released(), (101, 100));
        p.absorb(&mut vec![e(sync())]);
        tags(&mut p, b"Z");
    }

    #[test]
    fn copy_in_reads_the_syncs_inside_it() {
        // libpq's extended COPY: Execute, Sync, CopyData..., CopyDone, Sync.
        let mut p = Pipeline::new(true);
        p.absorb(&mut vec![e(Expect::Ack(b'1')), e(Expect::Ack(b'2')), e(execute()), e(sync())]);
        tags(&mut p, b"12G");
        assert!(p.in_copy());
        p.absorb(&mut vec![Entry { expect: sync(), refusal: None, copy_ends: 1 }]);
        assert!(matches!(p.step(b'C').unwrap(), Event::Done(Entry { expect: Expect::Execute { .. }, .. })));
        tags(&mut p, b"Z");
        assert!(p.front().is_none() && !p.in_copy());
        // A simple-protocol COPY inside a Query with more statements after it.
        p.absorb(&mut vec![Entry { expect: query(), refusal: None, copy_ends: 1 }]);
        tags(&mut p, b"GCTDCZ");
        // A failed simple COPY: the Query still ends with its ReadyForQuery.
        p.absorb(&mut vec![Entry { expect: query(), refusal: None, copy_ends: 1 }]);
        tags(&mut p, b"GEZ");
        assert_eq!(p.released().0, 7);
    }

    #[test]
    fn a_failed_copy_with_pipelined_syncs_is_not_guessed_at_when_strict() {
        let setup = |strict| {
            let mut p = Pipeline::new(strict);
            p.absorb(&mut vec![e(execute()), e(sync())]);
            tags(&mut p, b"G");
            p.absorb(&mut vec![Entry { expect: sync(), refusal: None, copy_ends: 1 }]);
            p
        };
        assert!(setup(true).step(b'E').is_err());
        let mut p = setup(false);
        assert!(matches!(p.step(b'E').unwrap(), Event::Error { failed: Some(Expect::Execute { .. }), .. }));
        tags(&mut p, b"Z");
    }

    #[test]
    fn recover_ends_the_oldest_cycle() {
        let mut p = Pipeline::new(false);
        p.absorb(&mut vec![e(Expect::Ack(b'1')), e(sync()), e(query())]);
        assert!(p.step(b'2').is_err());
        assert!(p.recover(b'Z').is_some());
        assert!(matches!(p.front(), Some(Expect::Query { .. })));
    }

    fn noted(expect: Expect, key: &str) -> Entry {
        let notices: Arc<[Notice]> = Arc::from(vec![Notice { key: Some(key.into()), message: Bytes::from_static(b"N") }]);
        let expect = match expect {
            Expect::Execute { portal, mut info, stmt, sent, cap } => {
                info.notices = Some(notices);
                Expect::Execute { portal, info, stmt, sent, cap }
            }
            Expect::Query { mut info, sent, stmt, cap } => {
                info.notices = Some(notices);
                Expect::Query { info, sent, stmt, cap }
            }
            other => other,
        };
        e(expect)
    }

    fn taken(p: &mut Pipeline, tag: u8) -> Option<String> {
        let n = p.take_notices(tag).map(|n| n[0].key.as_deref().unwrap_or_default().to_string());
        p.step(tag).unwrap_or_else(|l| panic!("{} at {:?}", l.0, tag as char));
        n
    }

    /// Notices go out right before the first message of their own statement's result, once;
    /// never before an error, a Describe's answer or a ReadyForQuery.
    #[test]
    fn notices_are_taken_when_their_result_starts() {
        let mut p = Pipeline::new(true);
        p.absorb(&mut vec![e(Expect::Ack(b'1')), e(Expect::Ack(b'2')), e(Expect::DescribeStatement), noted(execute(), "a"), noted(execute(), "b"), e(sync())]);
        assert_eq!(taken(&mut p, b'1'), None);
        assert_eq!(taken(&mut p, b'2'), None);
        assert_eq!(taken(&mut p, b't'), None);
        assert_eq!(taken(&mut p, b'T'), None);
        // Rows of the first Execute: its notice before the first only; a notice coming from
        // the server in between changes nothing.
        assert_eq!(taken(&mut p, b'D').as_deref(), Some("a"));
        assert_eq!(taken(&mut p, b'N'), None);
        assert_eq!(taken(&mut p, b'D'), None);
        assert_eq!(taken(&mut p, b'C'), None);
        // The second Execute has no rows (an INSERT): its notice before its CommandComplete.
        assert_eq!(taken(&mut p, b'C').as_deref(), Some("b"));
        assert_eq!(taken(&mut p, b'Z'), None);
        // A Query that fails before any result gets no notice, at the error nor at the end.
        p.absorb(&mut vec![noted(query(), "q")]);
        assert_eq!(taken(&mut p, b'E'), None);
        assert_eq!(taken(&mut p, b'Z'), None);
        // A Query whose result starts with COPY; a failing Execute skips to Sync, notice unsent.
        p.absorb(&mut vec![noted(query(), "c"), noted(execute(), "x"), noted(execute(), "y"), e(sync())]);
        assert_eq!(taken(&mut p, b'H').as_deref(), Some("c"));
        assert_eq!(taken(&mut p, b'd'), None);
        assert_eq!(taken(&mut p, b'c'), None);
        assert_eq!(taken(&mut p, b'C'), None);
        assert_eq!(taken(&mut p, b'Z'), None);
        assert_eq!(taken(&mut p, b'E'), None);
        assert_eq!(taken(&mut p, b'Z'), None);
        assert!(p.front().is_none());
    }

    use proptest::prelude::*;

    fn any_entry() -> impl Strategy<Value = Entry> {
        (0u8..8, any::<bool>(), 0u32..3).prop_map(|(k, refused, copy_ends)| {
            let expect = match k {
                0 => Expect::Ack(b'1'),
                1 => Expect::Ack(b'2'),
                2 => Expect::ClosePortal(vec![]),
                3 => Expect::DescribeStatement,
                4 => Expect::DescribePortal { portal: vec![], info: StmtInfo::default(), swallow: refused },
                5 => execute(),
                6 => sync(),
                _ => query(),
            };
            let refusal = refused.then(|| Box::new(Refusal { marker: 1, response: Bytes::new(), stmt: 0 }));
            Entry { expect, refusal, copy_ends }
        })
    }

    proptest! {
        /// Whatever a hostile or broken server sends, the pipeline answers without panicking,
        /// and never releases more than was published.
        #[test]
        fn arbitrary_answers_never_panic(
            batches in proptest::collection::vec((proptest::collection::vec(any_entry(), 0..6), proptest::collection::vec(any::<u8>(), 0..6)), 0..20),
            strict in any::<bool>(),
        ) {
            let mut p = Pipeline::new(strict);
            let mut published = 0u64;
            for (entries, tags) in batches {
                published += entries.len() as u64;
                p.absorb(&mut entries.into_iter().collect());
                for t in tags {
                    let t = b"123tTnDHdcCIsGEZNSA"[t as usize % 19];
                    if p.step(t).is_err() {
                        p.recover(t);
                    }
                    prop_assert!(p.released().0 <= published);
                }
            }
        }
    }
}
