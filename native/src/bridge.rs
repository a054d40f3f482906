//! The bridge between planes: the data plane asks (authenticate, decide) and awaits an answer the
//! control plane gives through the request's handle, possibly much later. A socketpair becomes
//! readable when something is pending, so the Python loop sleeps until then and drains
//! everything with one call. Events (audit records) go to the audit trail's writer; only an
//! engine without a trail (embedding, unit tests) queues them as JSON lines for take_events().

use parking_lot::Mutex;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

use crate::audit::{Durable, Trail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Authenticate,
    Decide,
    /// A result was cut at max_rows (fire and forget): the control plane records it as a
    /// request an approver may approve.
    MaxRowsExceeded,
    /// A statement whose decision needs approval is about to run: run, deny or hold it?
    Approval,
    /// A held statement waits for a person's decision (answered when one is made).
    AwaitApproval,
    /// A held statement's request is withdrawn (cancel, disconnect, session end, timeout);
    /// fire and forget.
    Withdraw,
}

impl RequestKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RequestKind::Authenticate => "authenticate",
            RequestKind::Decide => "decide",
            RequestKind::MaxRowsExceeded => "max_rows_exceeded",
            RequestKind::Approval => "approval",
            RequestKind::AwaitApproval => "await_approval",
            RequestKind::Withdraw => "withdraw",
        }
    }
}

/// A question waiting for the control plane. Dropping it unanswered makes the asker fail closed.
pub struct PendingRequest {
    pub id: u64,
    pub kind: RequestKind,
    pub payload: Value,
    pub reply: oneshot::Sender<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    /// No answer within the timeout.
    TimedOut,
    /// The control plane dropped the request (shutdown, crash in a handler).
    Dropped,
}

pub struct Bridge {
    queue: Mutex<Vec<PendingRequest>>,
    events: Mutex<Vec<u8>>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    signaled: AtomicBool,
    next_id: AtomicU64,
    event_backlog_wakeup: usize,
    pub timed_out: AtomicU64,
    /// Where events go; None only for engines built without an `audit` config.
    pub trail: Option<Arc<Trail>>,
}

impl Bridge {
    pub fn new(event_backlog_wakeup: usize) -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Bridge {
            queue: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
            wake_tx,
            wake_rx,
            signaled: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            event_backlog_wakeup: event_backlog_wakeup.max(1) * 200,
            timed_out: AtomicU64::new(0),
            trail: None,
        })
    }

    pub fn wakeup_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.wake_rx.as_raw_fd()
    }

    fn signal(&self) {
        if !self.signaled.swap(true, Ordering::AcqRel) {
            // A full socket buffer means a wakeup is already pending: ignoring the error is right.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    /// Asks the control plane and waits for the answer, failing closed after `timeout`.
    pub async fn ask(&self, kind: RequestKind, payload: Value, timeout: Duration) -> Result<Value, AskError> {
        let (tx, rx) = oneshot::channel();
        self.push(kind, payload, tx);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(AskError::Dropped),
            Err(_) => {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(AskError::TimedOut)
            }
        }
    }

    /// Asks the control plane without a deadline: the caller waits on the receiver as long as
    /// it decides (an error means the control plane dropped the request).
    pub fn ask_later(&self, kind: RequestKind, payload: Value) -> oneshot::Receiver<Value> {
        let (tx, rx) = oneshot::channel();
        self.push(kind, payload, tx);
        rx
    }

    /// Tells the control plane something; nobody waits for the answer (it may be dropped).
    pub fn tell(&self, kind: RequestKind, payload: Value) {
        let (tx, _) = oneshot::channel();
        self.push(kind, payload, tx);
    }

    fn push(&self, kind: RequestKind, payload: Value, reply: oneshot::Sender<Value>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.queue.lock().push(PendingRequest { id, kind, payload, reply });
        self.signal();
    }

    pub fn pending(&self) -> usize {
        self.queue.lock().len()
    }

    /// Takes every pending request and clears the wakeup. The order is what makes it safe:
    /// drain the socket, then clear the flag, then take the queue. A request pushed before the
    /// flag is cleared sees it set and writes nothing, but the take that follows gets it; one
    /// pushed after writes a byte. Clearing before draining would let the drain eat the byte of
    /// a request pushed in between, leaving the flag set with no byte pending: every later
    /// request would hang.
    pub fn take_requests(&self) -> Vec<PendingRequest> {
        let mut sink = [0u8; 256];
        while let Ok(n) = (&self.wake_rx).read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        self.signaled.store(false, Ordering::Release);
        std::mem::take(&mut *self.queue.lock())
    }

    /// Appends one event (already a JSON object) as a record.
    pub fn emit(&self, event: &Value) {
        // serde_json cannot fail on a Value.
        let line = serde_json::to_vec(event).unwrap_or_default();
        self.emit_line(&line);
    }

    /// Appends one pre-serialized JSON object (without newline); the hot path for per-statement
    /// events, which are formatted without building a Value tree. The trail's writer makes it
    /// canonical on its own thread.
    pub fn emit_line(&self, line: &[u8]) {
        if let Some(trail) = &self.trail {
            return trail.append(line);
        }
        let mut ev = self.events.lock();
        ev.extend_from_slice(line);
        ev.push(b'\n');
        let big = ev.len() >= self.event_backlog_wakeup;
        drop(ev);
        if big {
            self.signal();
        }
    }

    /// A statement's record: with `sync = "write"` or `"statement"` what resolves once it is
    /// written or on disk (the statement must not go upstream before), else None (appended
    /// like any event).
    pub fn emit_statement(&self, line: Vec<u8>) -> Option<Durable> {
        match &self.trail {
            // Statement records are formatted canonically by hand (events.rs tests check it).
            Some(trail) if trail.sync_mode().statements_wait() => Some(trail.append_durable(&line, true)),
            _ => {
                self.emit_canonical(line);
                None
            }
        }
    }

    /// Appends a record its producer formats canonically (sorted keys, no whitespace, no
    /// floats: the statement and result records of events.rs, whose tests check it), so the
    /// trail's writer need not parse and re-serialize it.
    pub fn emit_canonical(&self, line: Vec<u8>) {
        match &self.trail {
            Some(trail) => trail.append_canonical(&line),
            None => self.emit_line(&line),
        }
    }

    /// Why the audit trail cannot write now (new statements are refused meanwhile).
    pub fn audit_failing(&self) -> Option<String> {
        self.trail.as_ref().and_then(|t| t.failing())
    }

    pub fn take_events(&self) -> Vec<u8> {
        std::mem::take(&mut *self.events.lock())
    }
}

/// A record's `ts`: RFC 3339 UTC with microseconds.
pub fn now_ts() -> String {
    crate::audit::time::now_ts()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ask_answer_and_timeout() {
        let b = std::sync::Arc::new(Bridge::new(10).unwrap());
        let b2 = b.clone();
        let h = tokio::spawn(async move { b2.ask(RequestKind::Decide, Value::Null, Duration::from_secs(5)).await });
        let reqs = loop {
            let r = b.take_requests();
            if !r.is_empty() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(reqs.len(), 1);
        for r in reqs {
            r.reply.send(serde_json::json!({"ok": true})).unwrap();
        }
        assert_eq!(h.await.unwrap().unwrap()["ok"], true);
        let r = b.ask(RequestKind::Decide, Value::Null, Duration::from_millis(20)).await;
        assert_eq!(r, Err(AskError::TimedOut));
        assert_eq!(b.timed_out.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn wakeup_is_never_lost_under_concurrent_pushes() {
        // Regression: clearing the flag before draining the socket let a concurrent push's byte
        // be eaten, leaving the flag set and no byte pending; the control plane then slept
        // forever while work piled up.
        let b = std::sync::Arc::new(Bridge::new(1).unwrap()); // wake on every ~200 bytes
        const N: usize = 20_000;
        let producer = {
            let b = b.clone();
            std::thread::spawn(move || {
                let line = vec![b'x'; 300];
                for i in 0..N {
                    b.emit_line(&line);
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut consumed = 0;
        while consumed < N {
            let mut pfd = libc::pollfd { fd: b.wakeup_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, 2000) };
            assert!(ready > 0, "wakeup lost: {consumed} of {N} events consumed, the rest never signaled");
            let _ = b.take_requests();
            consumed += b.take_events().iter().filter(|&&c| c == b'\n').count();
        }
        producer.join().unwrap();
    }

    #[test]
    fn events_are_json_lines() {
        let b = Bridge::new(10).unwrap();
        b.emit(&serde_json::json!({"event": "x"}));
        b.emit(&serde_json::json!({"event": "y"}));
        assert_eq!(b.take_events(), b"{\"event\":\"x\"}\n{\"event\":\"y\"}\n");
        assert!(b.take_events().is_empty());
    }
}
