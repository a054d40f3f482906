//! max_rows: the hard cap on rows per result. Decides, row by row, which rows of a capped
//! Execute or Query reach the client, counting across Executes of one portal and across the
//! FETCHes of one SQL-level cursor; remembers the statements it cut so their next execution can
//! ask for an approval that lifts the cap.
//!
//! The upstream→client half owns one `RowCounter` per session and feeds it each DataRow of a
//! capped entry and each end of a result; everything else about a cut (the error, the request
//! to the control plane, the cancel upstream, transaction state) is the relay's (cut.rs).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// SQL-level cursors a capped session may have tracked at once; a DECLARE beyond is refused
/// (forgetting a live cursor's count would let its FETCHes start over).
pub const MAX_TRACKED_CURSORS: usize = 1024;

/// Statements remembered as cut per session (their next execution asks for an approval).
const MAX_CUT_STATEMENTS: usize = 64;

/// What a statement does to a SQL-level cursor, as the decision names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorOp {
    /// DECLARE: the cursor's count starts at 0. `holdable`: WITH HOLD, it outlives its
    /// transaction.
    Declare { holdable: bool },
    /// FETCH: its rows count against the cursor.
    Fetch,
    /// MOVE sends no rows: nothing is counted (the cap bounds rows sent, not rows skipped).
    Move,
    /// CLOSE: the count is forgotten.
    Close,
}

impl CursorOp {
    /// The decision's `cursor_op`; `sql` tells a holdable DECLARE.
    pub fn from_decision(op: &str, sql: &[u8]) -> Option<CursorOp> {
        Some(match op {
            "declare" => CursorOp::Declare { holdable: declares_holdable(sql) },
            "fetch" => CursorOp::Fetch,
            "move" => CursorOp::Move,
            "close" => CursorOp::Close,
            _ => return None,
        })
    }
}

/// Whether a DECLARE says WITH HOLD before its FOR, read from its bare words only (a quoted
/// "for", a comment or a string cannot end the head early). Erring towards "holdable" only
/// keeps a count longer (memory), never lets a cursor start over: text that cannot be lexed
/// counts as holdable.
pub fn declares_holdable(sql: &[u8]) -> bool {
    let (mut previous_with, mut holdable) = (false, false);
    let lexed = crate::normalize::bare_words(sql, |w| {
        if w.eq_ignore_ascii_case(b"for") {
            return false;
        }
        holdable |= previous_with && w.eq_ignore_ascii_case(b"hold");
        previous_with = w.eq_ignore_ascii_case(b"with");
        true
    });
    holdable || !lexed
}

/// What the `max_rows_exceeded` request says of the statement that was cut.
#[derive(Debug)]
pub struct CutReport {
    /// The statement record's number.
    pub stmt: u64,
    pub protocol: &'static str,
    /// The statement as the client sent it (with literals: only approvers see it).
    pub sql: Bytes,
    /// Keyed hashes of its literals (JSON).
    pub literal_hashes: Arc<[u8]>,
    /// Keyed hashes of the bound parameters (JSON), extended protocol only.
    pub parameter_hashes: Option<Arc<[u8]>>,
    /// The Bind message's body, to show approvers the values (extended protocol only).
    pub bind: Option<Bytes>,
}

/// The cap of one Execute or Query entry and what it counts against.
#[derive(Debug)]
pub struct RowCap {
    pub max: u64,
    /// Rows the portal sent in earlier Executes (a new Bind starts a new counter).
    pub portal: Option<Arc<AtomicU64>>,
    /// The SQL-level cursor the statement works on.
    pub cursor: Option<(Arc<str>, CursorOp)>,
    pub report: Arc<CutReport>,
}

/// What to do with one DataRow of a capped result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowVerdict {
    Send,
    /// The first row beyond the cap: the result is cut here (the caller starts the cut).
    Cut,
}

/// The result being counted.
#[derive(Debug)]
struct Run {
    sent: u64,
    portal: Option<Arc<AtomicU64>>,
    cursor: Option<Arc<str>>,
}

/// A tracked SQL-level cursor: rows its FETCHes sent so far.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    sent: u64,
    holdable: bool,
}

/// Row counts of a capped session, as the upstream→client half sees results end.
#[derive(Debug, Default)]
pub struct RowCounter {
    run: Option<Run>,
    cursors: HashMap<Arc<str>, Cursor>,
}

impl RowCounter {
    /// One DataRow of the result `cap` belongs to.
    pub fn row(&mut self, cap: &RowCap) -> RowVerdict {
        let run = self.run.get_or_insert_with(|| {
            let cursor = cap.cursor.as_ref().filter(|(_, op)| *op == CursorOp::Fetch).map(|(n, _)| n.clone());
            let sent = match (&cursor, &cap.portal) {
                (Some(name), _) => self.cursors.get(name).map_or(0, |c| c.sent),
                (None, Some(p)) => p.load(Ordering::Relaxed),
                (None, None) => 0,
            };
            Run { sent, portal: cap.portal.clone(), cursor }
        });
        if run.sent >= cap.max {
            return RowVerdict::Cut;
        }
        run.sent += 1;
        RowVerdict::Send
    }

    /// A result ended (CommandComplete, PortalSuspended, EmptyQueryResponse or an error):
    /// its count goes back to its portal or cursor. `completed`: the CommandComplete's tag,
    /// which tells a DECLARE or CLOSE that took effect.
    pub fn result_end(&mut self, cap: Option<&RowCap>, completed: Option<&[u8]>) {
        if let Some(run) = self.run.take() {
            if let Some(p) = &run.portal {
                p.store(run.sent, Ordering::Relaxed);
            }
            if let Some(name) = run.cursor {
                let holdable = self.cursors.get(&name).is_some_and(|c| c.holdable);
                self.track(name, Cursor { sent: run.sent, holdable });
            }
        }
        let (Some(cap), Some(tag)) = (cap, completed) else { return };
        if tag.starts_with(b"CLOSE CURSOR ALL") {
            self.cursors.clear();
            return;
        }
        match &cap.cursor {
            Some((name, CursorOp::Declare { holdable })) if tag.starts_with(b"DECLARE CURSOR") => {
                self.track(name.clone(), Cursor { sent: 0, holdable: *holdable });
            }
            Some((name, CursorOp::Close)) if tag.starts_with(b"CLOSE CURSOR") => {
                self.cursors.remove(name);
            }
            _ => {}
        }
    }

    fn track(&mut self, name: Arc<str>, c: Cursor) {
        // Past the bound a cursor is still counted (the client half refuses new DECLAREs).
        self.cursors.insert(name, c);
    }

    /// ReadyForQuery: outside a transaction block only holdable cursors are still open.
    pub fn ready(&mut self, status: u8) {
        self.run = None;
        if status == b'I' && !self.cursors.is_empty() {
            self.cursors.retain(|_, c| c.holdable);
        }
    }

    /// Cursors tracked now.
    pub fn cursors(&self) -> usize {
        self.cursors.len()
    }
}

/// The statements of a session that were cut, by a keyed hash of their text: the next execution
/// of one asks the control plane for an approval that lifts the cap. Bounded; the oldest go.
pub struct CutStatements {
    keys: VecDeque<u64>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for CutStatements {
    fn default() -> Self {
        CutStatements { keys: VecDeque::with_capacity(4), hasher: std::collections::hash_map::RandomState::new() }
    }
}

impl CutStatements {
    pub fn remember(&mut self, sql: &[u8]) {
        let k = self.hasher.hash_one(sql);
        if self.keys.contains(&k) {
            return;
        }
        if self.keys.len() >= MAX_CUT_STATEMENTS {
            self.keys.pop_front();
        }
        self.keys.push_back(k);
    }

    pub fn was_cut(&self, sql: &[u8]) -> bool {
        !self.keys.is_empty() && self.keys.contains(&self.hasher.hash_one(sql))
    }
}

/// The bound parameters as approvers see them (see `relay::hold::bound_values`); None when the
/// body is not a valid Bind.
pub fn bind_parameters(body: &[u8]) -> Option<serde_json::Value> {
    crate::protocol::messages::extended::bind(body).ok().map(|b| crate::session::relay::bound_values(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(max: u64, portal: Option<Arc<AtomicU64>>, cursor: Option<(&str, CursorOp)>) -> RowCap {
        let report = Arc::new(CutReport { stmt: 1, protocol: "simple", sql: Bytes::new(), literal_hashes: Arc::from(&b"[]"[..]), parameter_hashes: None, bind: None });
        RowCap { max, portal, cursor: cursor.map(|(n, op)| (Arc::from(n), op)), report }
    }

    fn rows(c: &mut RowCounter, cap: &RowCap, n: usize) -> Vec<RowVerdict> {
        (0..n).map(|_| c.row(cap)).collect()
    }

    #[test]
    fn a_result_is_cut_at_the_first_row_beyond_the_cap() {
        let mut c = RowCounter::default();
        let q = cap(3, None, None);
        assert_eq!(rows(&mut c, &q, 4), [RowVerdict::Send, RowVerdict::Send, RowVerdict::Send, RowVerdict::Cut]);
        c.result_end(Some(&q), None);
        // The next result of the same Query starts over.
        assert_eq!(rows(&mut c, &q, 3), [RowVerdict::Send; 3]);
        c.result_end(Some(&q), Some(b"SELECT 3"));
        assert_eq!(c.row(&q), RowVerdict::Send);
    }

    #[test]
    fn a_portal_counts_across_its_executes_and_a_new_bind_starts_over() {
        let mut c = RowCounter::default();
        let portal = Arc::new(AtomicU64::new(0));
        let e = cap(5, Some(portal.clone()), None);
        assert_eq!(rows(&mut c, &e, 3), [RowVerdict::Send; 3]);
        c.result_end(Some(&e), None); // PortalSuspended
        assert_eq!(rows(&mut c, &e, 3), [RowVerdict::Send, RowVerdict::Send, RowVerdict::Cut]);
        c.result_end(Some(&e), None);
        assert_eq!(portal.load(Ordering::Relaxed), 5);
        let rebound = cap(5, Some(Arc::new(AtomicU64::new(0))), None);
        assert_eq!(rows(&mut c, &rebound, 5), [RowVerdict::Send; 5]);
    }

    #[test]
    fn fetches_count_across_a_cursors_life() {
        let mut c = RowCounter::default();
        let declare = cap(4, None, Some(("c", CursorOp::Declare { holdable: false })));
        let fetch = cap(4, None, Some(("c", CursorOp::Fetch)));
        let close = cap(4, None, Some(("c", CursorOp::Close)));
        c.result_end(Some(&declare), Some(b"DECLARE CURSOR"));
        assert_eq!(rows(&mut c, &fetch, 3), [RowVerdict::Send; 3]);
        c.result_end(Some(&fetch), Some(b"FETCH 3"));
        // MOVE sends nothing and counts nothing.
        c.result_end(Some(&cap(4, None, Some(("c", CursorOp::Move)))), Some(b"MOVE 10"));
        assert_eq!(rows(&mut c, &fetch, 2), [RowVerdict::Send, RowVerdict::Cut]);
        c.result_end(Some(&fetch), None);
        // DECLARE again resets; CLOSE forgets.
        c.result_end(Some(&declare), Some(b"DECLARE CURSOR"));
        assert_eq!(rows(&mut c, &fetch, 4), [RowVerdict::Send; 4]);
        c.result_end(Some(&fetch), Some(b"FETCH 4"));
        c.result_end(Some(&close), Some(b"CLOSE CURSOR"));
        assert_eq!(c.cursors(), 0);
    }

    #[test]
    fn a_failed_declare_resets_nothing() {
        let mut c = RowCounter::default();
        let fetch = cap(2, None, Some(("c", CursorOp::Fetch)));
        c.result_end(Some(&cap(2, None, Some(("c", CursorOp::Declare { holdable: true })))), Some(b"DECLARE CURSOR"));
        assert_eq!(rows(&mut c, &fetch, 2), [RowVerdict::Send; 2]);
        c.result_end(Some(&fetch), Some(b"FETCH 2"));
        // A DECLARE whose result is an error (no CommandComplete) keeps the count.
        c.result_end(Some(&cap(2, None, Some(("c", CursorOp::Declare { holdable: true })))), None);
        assert_eq!(c.row(&fetch), RowVerdict::Cut);
    }

    #[test]
    fn a_transaction_end_forgets_cursors_without_hold() {
        let mut c = RowCounter::default();
        c.result_end(Some(&cap(2, None, Some(("a", CursorOp::Declare { holdable: false })))), Some(b"DECLARE CURSOR"));
        c.result_end(Some(&cap(2, None, Some(("h", CursorOp::Declare { holdable: true })))), Some(b"DECLARE CURSOR"));
        c.ready(b'T');
        assert_eq!(c.cursors(), 2);
        c.ready(b'I');
        assert_eq!(c.cursors(), 1);
        c.result_end(None, Some(b"CLOSE CURSOR ALL"));
        c.result_end(Some(&cap(2, None, None)), Some(b"CLOSE CURSOR ALL"));
        assert_eq!(c.cursors(), 0);
    }

    #[test]
    fn with_hold_is_read_before_for() {
        assert!(declares_holdable(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1"));
        assert!(declares_holdable(b"declare c no scroll cursor with  hold for select 1"));
        assert!(!declares_holdable(b"DECLARE \"c\" CURSOR WITHOUT HOLD FOR SELECT 1"));
        assert!(!declares_holdable(b"DECLARE c CURSOR FOR SELECT 'with hold'"));
    }

    #[test]
    fn a_quoted_for_or_a_comment_does_not_hide_with_hold() {
        assert!(declares_holdable(b"DECLARE \"for\" CURSOR WITH HOLD FOR SELECT 1"));
        assert!(declares_holdable(b"DECLARE c /*for*/ CURSOR WITH HOLD FOR SELECT 1"));
        assert!(declares_holdable(b"DECLARE c -- for\n CURSOR WITH HOLD FOR SELECT 1"));
        // Unlexable text errs towards holdable.
        assert!(declares_holdable(b"DECLARE c /* CURSOR FOR SELECT 1"));
    }

    #[test]
    fn cut_statements_are_remembered_bounded() {
        let mut s = CutStatements::default();
        assert!(!s.was_cut(b"select 1"));
        s.remember(b"select 1");
        s.remember(b"select 1");
        assert!(s.was_cut(b"select 1"));
        assert!(!s.was_cut(b"select 2"));
        for i in 0..MAX_CUT_STATEMENTS {
            s.remember(format!("select {}", i + 10).as_bytes());
        }
        assert!(!s.was_cut(b"select 1"), "the oldest is forgotten");
        assert_eq!(s.keys.len(), MAX_CUT_STATEMENTS);
    }

    #[test]
    fn bind_values_are_shown_to_approvers() {
        // portal "", statement "", 1 format (text), 3 parameters: 'ab', NULL, 0xff; 0 result formats.
        let mut body = vec![0, 0, 0, 1, 0, 0, 0, 3];
        body.extend_from_slice(&[0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0xff, 0, 0]);
        let v = bind_parameters(&body).unwrap();
        assert_eq!(v, serde_json::json!([{"format": 0, "value": "ab"}, null, {"format": 0, "hex": "ff"}]));
        assert!(bind_parameters(b"\0").is_none());
    }
}
