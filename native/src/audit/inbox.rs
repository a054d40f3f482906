//! Records on their way from sessions to the writer thread. A session copies each record's
//! bytes into one shared buffer under a short lock; the writer swaps the whole buffer out per
//! batch and hands back the one it emptied. No allocation and no cross-thread free per record
//! (a channel of one Vec per record cost the hot path both), and records keep their order.

use parking_lot::{Condvar, Mutex};
use std::ops::Range;
use std::sync::mpsc;
use std::time::Duration;

/// The answer a session awaiting its record's durability gets: Err names why it is not durable.
pub type Done = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Buffer memory a batch keeps between batches: a few seconds of records at full load.
const KEEP_BYTES: usize = 16 << 20;

/// Records in arrival order: their bodies back to back, where each ends, and who awaits which.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    /// (record index, its waiter), by index.
    done: Vec<(usize, Done)>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn push(&mut self, body: &[u8], done: Option<Done>) {
        self.bytes.extend_from_slice(body);
        if let Some(d) = done {
            self.done.push((self.ends.len(), d));
        }
        self.ends.push(self.bytes.len());
    }

    /// Record `i`'s body.
    pub fn body(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// The waiters of the records in `range`, taken out.
    pub fn take_done(&mut self, range: Range<usize>) -> Vec<Done> {
        if self.done.is_empty() {
            return Vec::new();
        }
        let (mut taken, mut kept) = (Vec::new(), Vec::new());
        for (i, d) in self.done.drain(..) {
            if range.contains(&i) {
                taken.push(d);
            } else {
                kept.push((i, d));
            }
        }
        self.done = kept;
        taken
    }

    /// Bytes of all bodies (for sizing a write buffer).
    pub fn body_bytes(&self, range: Range<usize>) -> usize {
        if range.is_empty() {
            return 0;
        }
        let start = if range.start == 0 { 0 } else { self.ends[range.start - 1] };
        self.ends[range.end - 1] - start
    }

    /// Empties the batch, keeping its memory for the next one (unless a backlog made it
    /// large: then it gives the memory back).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.done.clear();
        if self.bytes.capacity() > KEEP_BYTES {
            self.bytes.shrink_to(KEEP_BYTES);
            self.ends.shrink_to(KEEP_BYTES / 256);
        }
    }
}

struct State {
    batch: Batch,
    /// A session awaits a record of this batch: the writer must not linger gathering more.
    urgent: bool,
    close: Option<mpsc::Sender<()>>,
    closed: bool,
}

/// The shared buffer and the writer's wake-up.
pub struct Inbox {
    state: Mutex<State>,
    ready: Condvar,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox { state: Mutex::new(State { batch: Batch::default(), urgent: false, close: None, closed: false }), ready: Condvar::new() }
    }
}

impl Inbox {
    /// Appends a record; false once the trail is closed (the record is lost).
    pub fn push(&self, body: &[u8], done: Option<Done>) -> bool {
        let mut s = self.state.lock();
        if s.closed {
            return false;
        }
        // Wake the writer only when it may be waiting: for the first record of a batch, or for
        // one a session awaits (then at once). Otherwise it is busy or gathering.
        let wake = s.batch.is_empty() || (done.is_some() && !s.urgent);
        s.urgent |= done.is_some();
        s.batch.push(body, done);
        drop(s);
        if wake {
            self.ready.notify_one();
        }
        true
    }

    /// Asks the writer to close the trail; false if it already was.
    pub fn close(&self, reply: mpsc::Sender<()>) -> bool {
        let mut s = self.state.lock();
        if s.closed {
            return false;
        }
        s.closed = true;
        s.close = Some(reply);
        drop(s);
        self.ready.notify_one();
        true
    }

    /// The writer thread ended without a close (it panicked): later records count as lost
    /// instead of piling up here.
    /// Sessions awaiting a record in the batch are answered (the record is not durable, so
    /// their statements must not go upstream), and a close request waiting here is released.
    pub fn shut(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        let n = s.batch.len();
        for d in s.batch.take_done(0..n) {
            let _ = d.send(Err("the audit trail's writer stopped".into()));
        }
        // Dropping the reply sender ends Trail::close's wait.
        s.close = None;
    }

    /// Writer: waits until a record or a close request is there, at most `timeout`. Returns
    /// whether records wait, and whether one of them is awaited by a session or a close is
    /// asked (no time to gather more).
    pub fn wait(&self, timeout: Duration) -> (bool, bool) {
        let mut s = self.state.lock();
        if s.batch.is_empty() && s.close.is_none() && !timeout.is_zero() {
            self.ready.wait_for(&mut s, timeout);
        }
        (!s.batch.is_empty(), s.urgent || s.close.is_some())
    }

    /// Writer: swaps the waiting records into `into` (which must be empty) and takes the close
    /// request, if any.
    pub fn take(&self, into: &mut Batch) -> Option<mpsc::Sender<()>> {
        debug_assert!(into.is_empty());
        let mut s = self.state.lock();
        std::mem::swap(&mut s.batch, into);
        s.urgent = false;
        s.close.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_bodies_in_order_and_hands_out_waiters_by_range() {
        let mut b = Batch::default();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        b.push(b"{\"a\":1}", None);
        b.push(b"{\"b\":2}", Some(tx));
        b.push(b"{\"c\":3}", None);
        assert_eq!((b.len(), b.body(0), b.body(1), b.body(2)), (3, &b"{\"a\":1}"[..], &b"{\"b\":2}"[..], &b"{\"c\":3}"[..]));
        assert_eq!((b.body_bytes(0..3), b.body_bytes(1..2)), (21, 7));
        assert!(b.take_done(0..1).is_empty());
        assert_eq!(b.take_done(1..3).len(), 1);
        assert!(b.take_done(0..3).is_empty(), "taken once");
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn a_writer_that_stopped_answers_waiters_and_releases_close() {
        let inbox = Inbox::default();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        assert!(inbox.push(b"{}", Some(tx)));
        let (reply, replied) = mpsc::channel();
        assert!(inbox.close(reply));
        inbox.shut();
        assert!(matches!(rx.try_recv(), Ok(Err(_))), "the waiter learns its record is not durable");
        assert!(replied.recv().is_err(), "Trail::close stops waiting");
        assert!(!inbox.push(b"{}", None));
    }

    #[test]
    fn pushes_after_close_are_refused_and_the_writer_swaps_buffers() {
        let inbox = Inbox::default();
        assert!(inbox.push(b"{}", None));
        let mut mine = Batch::default();
        let (tx, _rx) = mpsc::channel();
        assert!(inbox.close(tx));
        assert!(!inbox.push(b"{}", None), "closed");
        assert_eq!(inbox.wait(Duration::ZERO), (true, true), "a close request does not wait");
        assert!(inbox.take(&mut mine).is_some(), "the close request");
        assert_eq!(mine.len(), 1);
    }
}
