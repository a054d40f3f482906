//! What the writer thread tells everyone else: whether the trail is failing (and why), how far
//! it got, and its counters; sessions read `failing` on every statement, so it is one atomic.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Status {
    failing: AtomicBool,
    /// (reason word, errno text) while failing.
    reason: Mutex<Option<(String, String)>>,
    pub next_seq: AtomicU64,
    pub checkpoint_size: AtomicU64,
    /// When the last checkpoint was written, µs since the epoch (0: none since start).
    pub checkpoint_us: AtomicI64,
    pub pending: AtomicU64,
    pub lost: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Float values producers sent, written as strings.
    pub float_values: AtomicU64,
    /// Bodies that were not JSON objects, replaced by bad_record records.
    pub bad_records: AtomicU64,
    /// Checkpoint copies (checkpoint_copy_dir) that could not be written.
    pub publish_errors: AtomicU64,
    pub closed: AtomicBool,
}

/// A copy of the status for the control plane.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub failing: Option<(String, String)>,
    pub next_seq: u64,
    pub checkpoint_size: u64,
    pub checkpoint_us: i64,
    pub pending: u64,
    pub lost: u64,
    pub bytes_written: u64,
    pub float_values: u64,
    pub bad_records: u64,
    pub publish_errors: u64,
    pub closed: bool,
}

impl Status {
    pub fn set_failing(&self, why: Option<(String, String)>) {
        let failing = why.is_some();
        *self.reason.lock() = why;
        self.failing.store(failing, Ordering::Release);
    }

    /// The reason word while failing (the hot path's check is one relaxed load).
    pub fn failing_reason(&self) -> Option<String> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.reason.lock().as_ref().map(|(r, _)| r.clone())
    }

    pub fn snapshot(&self) -> Snapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            failing: if self.failing.load(Ordering::Acquire) { self.reason.lock().clone() } else { None },
            next_seq: r(&self.next_seq),
            checkpoint_size: r(&self.checkpoint_size),
            checkpoint_us: self.checkpoint_us.load(Ordering::Relaxed),
            pending: r(&self.pending),
            lost: r(&self.lost),
            bytes_written: r(&self.bytes_written),
            float_values: r(&self.float_values),
            bad_records: r(&self.bad_records),
            publish_errors: r(&self.publish_errors),
            closed: self.closed.load(Ordering::Acquire),
        }
    }
}
