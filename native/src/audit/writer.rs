//! The writer thread: the only code that touches the trail's files. It numbers and chains each
//! record, hashes it into the tree, writes each batch with one write(), fsyncs (group commit:
//! at most every sync_window in batch and write mode, at once for records a session awaits in
//! statement mode; in write mode those are answered as soon as write() returned), signs checkpoints, rotates segments, and when the disk fails keeps records in memory
//! and retries every second until it can write them after an `audit_failure` record.

use serde_json::json;
use std::io::{self, Write as _};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::inbox::{Batch, Inbox};
use super::merkle::{leaf_hash, push_hex, to_hex, CompactRange, Hash};
use super::note::{b64, sign_checkpoint, SignerKey};
use super::recovery::Position;
use super::publish::{replace_checkpoint_file, CommandRunner};
use super::segment::Segment;
use super::status::Status;
use super::time::{now_ts, now_us};
use super::SyncMode;

pub use super::inbox::Done;

/// How often a failing trail tries to write again.
const RETRY: Duration = Duration::from_secs(1);
/// Batch mode: after the first record of a batch, how long to let more arrive before writing,
/// so sessions rarely have to wake the writer (a futex call per record costs the hot path).
const GATHER: Duration = Duration::from_millis(2);
/// Records per write() at most (a backlog is written in several).
const MAX_WRITE: usize = 65_536;

struct Failure {
    reason: &'static str,
    detail: String,
    since_us: i64,
    since: Instant,
}

/// errno → the `reason` word records and refusals carry.
fn reason_of(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => "disk_full",
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => "not_writable",
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => "dir_missing",
        _ => "io_error",
    }
}

pub struct Settings {
    pub dir: PathBuf,
    pub origin: String,
    pub signer: SignerKey,
    pub previous: Option<SignerKey>,
    pub sync: SyncMode,
    pub sync_window: Duration,
    pub checkpoint_interval: Duration,
    pub checkpoint_every: u64,
    pub copy_dir: Option<PathBuf>,
    pub segment_max_bytes: u64,
    pub segment_max_age_us: i64,
    pub max_pending: usize,
}

pub struct Writer {
    s: Settings,
    status: Arc<Status>,
    seg: Option<Segment>,
    next_seq: u64,
    prev: Hash,
    tree: CompactRange,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    unsynced: bool,
    last_sync: Instant,
    /// Records written but not yet fsync'd whose sessions await them (statement mode).
    waiters: Vec<Done>,
    /// Records kept in memory while the trail cannot write (at most max_pending).
    pending: Batch,
    failure: Option<Failure>,
    lost: u64,
    last_retry: Instant,
    /// The next checkpoint is signed by the previous key and the new one.
    pub dual_sign: bool,
    runner: CommandRunner,
}

impl Writer {
    pub fn new(s: Settings, status: Arc<Status>, seg: Segment, at: Position, runner: CommandRunner) -> Writer {
        let Position { next_seq, prev, tree, since_checkpoint } = at;
        let now = Instant::now();
        status.next_seq.store(next_seq, Ordering::Relaxed);
        Writer {
            s, status, seg: Some(seg), next_seq, prev, tree, since_checkpoint,
            last_checkpoint: now, unsynced: false, last_sync: now - Duration::from_secs(3600), waiters: vec![],
            pending: Batch::default(), failure: None, lost: 0, last_retry: now, dual_sign: false, runner,
        }
    }

    pub fn failure_text(&self) -> Option<String> {
        self.failure.as_ref().map(|f| format!("{}: {}", f.reason, f.detail))
    }

    /// Numbers, chains and writes the records `range` of `batch` with one write(); the state
    /// moves on only if the write succeeded (a failed batch is written again, renumbered,
    /// after recovery).
    fn write_items(&mut self, batch: &mut Batch, range: Range<usize>) -> io::Result<()> {
        let Some(seg) = self.seg.as_mut() else {
            return Err(io::Error::other("no open segment"));
        };
        let mut buf = Vec::with_capacity(batch.body_bytes(range.clone()) + range.len() * 100);
        let (mut seq, mut prev, mut tree) = (self.next_seq, self.prev, self.tree.clone());
        for i in range.clone() {
            let start = buf.len();
            buf.extend_from_slice(b"{\"prev\":\"");
            push_hex(&mut buf, &prev);
            buf.extend_from_slice(b"\",\"rec\":");
            buf.extend_from_slice(batch.body(i));
            buf.extend_from_slice(b",\"seq\":");
            let _ = write!(buf, "{seq}");
            buf.push(b'}');
            prev = leaf_hash(&buf[start..]);
            tree.append(prev);
            buf.push(b'\n');
            seq += 1;
        }
        seg.write(&buf)?;
        self.since_checkpoint += seq - self.next_seq;
        (self.next_seq, self.prev, self.tree) = (seq, prev, tree);
        self.unsynced = true;
        self.status.next_seq.store(seq, Ordering::Relaxed);
        self.status.bytes_written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let awaited = batch.take_done(range);
        if self.s.sync == SyncMode::Write {
            // Handed to the kernel: a kill -9 of the gateway can no longer lose it.
            awaited.into_iter().for_each(|d| drop(d.send(Ok(()))));
        } else {
            self.waiters.extend(awaited);
        }
        Ok(())
    }

    /// Writes the records `range` of `batch` now, or keeps them while the trail is failing.
    fn submit(&mut self, batch: &mut Batch, range: Range<usize>) {
        if self.failure.is_some() {
            return self.pend(batch, range);
        }
        if let Err(e) = self.write_items(batch, range.clone()) {
            self.fail(&e);
            self.pend(batch, range);
        }
    }

    /// Writes one record the writer makes itself (checkpoint, audit_close...).
    fn submit_one(&mut self, body: &[u8]) {
        let mut one = Batch::default();
        one.push(body, None);
        self.submit(&mut one, 0..1);
    }

    /// Keeps records while failing (their waiters learn why they are not durable); past
    /// max_pending they are counted as lost.
    fn pend(&mut self, batch: &mut Batch, range: Range<usize>) {
        let why = self.failure_text().unwrap_or_default();
        for d in batch.take_done(range.clone()) {
            let _ = d.send(Err(why.clone()));
        }
        for i in range {
            if self.pending.len() < self.s.max_pending {
                self.pending.push(batch.body(i), None);
            } else {
                self.lost += 1;
            }
        }
        self.status.pending.store(self.pending.len() as u64, Ordering::Relaxed);
        self.status.lost.store(self.lost, Ordering::Relaxed);
    }

    fn fail(&mut self, e: &io::Error) {
        if self.failure.is_none() {
            let f = Failure { reason: reason_of(e), detail: e.to_string(), since_us: now_us(), since: Instant::now() };
            eprintln!("phigate: cannot write the audit trail in {} ({}: {}); statements are refused until it can", self.s.dir.display(), f.reason, f.detail);
            self.status.set_failing(Some((f.reason.to_string(), f.detail.clone())));
            self.failure = Some(f);
            self.last_retry = Instant::now();
        }
        let why = self.failure_text().unwrap_or_default();
        for d in self.waiters.drain(..) {
            let _ = d.send(Err(why.clone()));
        }
    }

    fn sync(&mut self) {
        if !self.unsynced {
            return;
        }
        let r = self.seg.as_ref().map_or(Ok(()), Segment::sync);
        match r {
            Ok(()) => {
                self.unsynced = false;
                self.last_sync = Instant::now();
                for d in self.waiters.drain(..) {
                    let _ = d.send(Ok(()));
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    /// Cuts what a failed write left, then writes audit_failure, the records kept meanwhile
    /// and audit_recovered; on success the trail takes statements again.
    fn try_recover(&mut self) {
        self.last_retry = Instant::now();
        let Some(f) = &self.failure else { return };
        let cut = match self.seg.as_mut() {
            Some(seg) => seg.cut(),
            None => Segment::create(&self.s.dir, self.next_seq, now_us()).map(|s| self.seg = Some(s)),
        };
        if cut.is_err() {
            return;
        }
        let failure = json!({"detail": f.detail, "event": "audit_failure", "reason": f.reason, "ts": super::time::format_us(f.since_us)});
        let recovered = json!({"event": "audit_recovered", "failed_for_us": f.since.elapsed().as_micros() as u64, "lost": self.lost, "ts": now_ts()});
        let kept = self.pending.len();
        let mut items = Batch::default();
        items.push(&serde_json::to_vec(&failure).unwrap_or_default(), None);
        for i in 0..kept {
            items.push(self.pending.body(i), None);
        }
        items.push(&serde_json::to_vec(&recovered).unwrap_or_default(), None);
        // When this fails the kept records stay kept; the next retry writes them.
        if self.write_items(&mut items, 0..kept + 2).is_err() {
            return;
        }
        self.pending.clear();
        self.failure = None;
        self.sync();
        if self.failure.is_some() {
            return;
        }
        eprintln!("phigate: writing the audit trail again ({kept} records kept meanwhile, {} lost)", self.lost);
        self.lost = 0;
        self.status.set_failing(None);
        self.status.pending.store(0, Ordering::Relaxed);
        self.status.lost.store(0, Ordering::Relaxed);
        // The kept records carry the times they were made: sign them now, so the
        // trail never shows an unsigned tail older than the checkpoint interval.
        self.checkpoint();
    }

    fn checkpoint_due(&self) -> bool {
        self.since_checkpoint >= self.s.checkpoint_every || (self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.s.checkpoint_interval)
    }

    /// Appends a checkpoint record for every record before it, makes it durable, publishes its
    /// note, and rotates the segment if it is big or old enough.
    pub fn checkpoint(&mut self) {
        let size = self.next_seq;
        let root = self.tree.root();
        let keys: Vec<&SignerKey> = match (&self.s.previous, self.dual_sign) {
            (Some(old), true) => vec![old, &self.s.signer],
            _ => vec![&self.s.signer],
        };
        let note = sign_checkpoint(&self.s.origin, size, &root, &keys);
        let range: Vec<String> = self.tree.hashes().iter().map(to_hex).collect();
        let rec = json!({"event": "checkpoint", "note": note, "range": range, "root": b64(&root), "size": size, "ts": now_ts()});
        self.submit_one(&serde_json::to_vec(&rec).unwrap_or_default());
        self.sync();
        if self.failure.is_some() {
            return;
        }
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.dual_sign = false;
        self.status.checkpoint_size.store(size, Ordering::Relaxed);
        self.status.checkpoint_us.store(now_us(), Ordering::Relaxed);
        if let Err(e) = replace_checkpoint_file(&self.s.dir, &note) {
            return self.fail(&e);
        }
        if let Some(copy) = &self.s.copy_dir {
            if let Err(e) = replace_checkpoint_file(copy, &note) {
                self.status.publish_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("phigate: cannot write the audit checkpoint copy in {}: {e}", copy.display());
            }
        }
        self.runner.submit(&note);
        self.rotate_if_due();
    }

    fn rotate_if_due(&mut self) {
        let Some(seg) = &self.seg else { return };
        if seg.good_len < self.s.segment_max_bytes && now_us() - seg.started_us < self.s.segment_max_age_us {
            return;
        }
        match Segment::create(&self.s.dir, self.next_seq, now_us()) {
            Ok(new) => self.seg = Some(new),
            Err(e) => self.fail(&e),
        }
    }

    /// Writes records from the start-up path (audit_open, audit_key_rotated) and makes them
    /// durable; Err if that already fails (the gateway then refuses to start).
    pub fn write_now(&mut self, bodies: Vec<Vec<u8>>) -> Result<(), String> {
        let mut batch = Batch::default();
        for b in &bodies {
            batch.push(b, None);
        }
        self.submit(&mut batch, 0..bodies.len());
        self.sync();
        match self.failure_text() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn next_wakeup(&self) -> Duration {
        let mut d = RETRY;
        if self.failure.is_some() {
            return RETRY.saturating_sub(self.last_retry.elapsed());
        }
        if self.unsynced && self.s.sync != SyncMode::Statement {
            d = d.min(self.s.sync_window.saturating_sub(self.last_sync.elapsed()));
        }
        if self.since_checkpoint > 0 {
            d = d.min(self.s.checkpoint_interval.saturating_sub(self.last_checkpoint.elapsed()));
        }
        d
    }

    fn close(&mut self) {
        if self.failure.is_some() {
            self.try_recover();
        }
        self.submit_one(&serde_json::to_vec(&json!({"event": "audit_close", "ts": now_ts()})).unwrap_or_default());
        self.checkpoint();
        self.sync();
        if self.failure.is_some() {
            eprintln!("phigate: the audit trail could not be closed cleanly: {} records kept in memory are lost", self.pending.len());
        }
        self.runner.finish();
        self.status.closed.store(true, Ordering::Release);
    }

    /// The thread's loop: takes what sessions appended (gathering for a moment in batch mode,
    /// so a batch is one write), writes it with checkpoints every checkpoint_every records,
    /// fsyncs on schedule, checkpoints on time, and closes when asked.
    pub fn run(mut self, inbox: Arc<Inbox>) {
        let mut batch = Batch::default();
        loop {
            let (any, urgent) = inbox.wait(self.next_wakeup());
            // Sessions awaiting a record are not kept waiting for others to arrive.
            if any && !urgent && !self.s.sync.statements_wait() {
                std::thread::sleep(GATHER);
            }
            batch.clear();
            let close = inbox.take(&mut batch);
            if self.failure.is_some() && self.last_retry.elapsed() >= RETRY {
                self.try_recover();
            }
            // A checkpoint every checkpoint_every records, even inside one big batch.
            let mut from = 0;
            while from < batch.len() {
                let room = self.s.checkpoint_every.saturating_sub(self.since_checkpoint).max(1) as usize;
                let to = batch.len().min(from + room).min(from + MAX_WRITE);
                self.submit(&mut batch, from..to);
                from = to;
                if self.failure.is_none() && self.since_checkpoint >= self.s.checkpoint_every {
                    self.checkpoint();
                }
            }
            if self.failure.is_none() {
                if self.s.sync == SyncMode::Statement || self.last_sync.elapsed() >= self.s.sync_window {
                    self.sync();
                }
                if self.failure.is_none() && self.checkpoint_due() {
                    self.checkpoint();
                }
            }
            if let Some(reply) = close {
                self.close();
                let _ = reply.send(());
                return;
            }
        }
    }
}
