//! The signed, tamper-evident audit trail's writer (docs/audit.md): every record of the gateway
//! goes through one `Trail`, whose thread numbers, chains, Merkle-hashes, writes, fsyncs and
//! checkpoints it. This file is the handle sessions and the control plane use, and its config.

pub mod canonical;
pub mod inbox;
pub mod merkle;
pub mod note;
pub mod publish;
pub mod recovery;
pub mod segment;
pub mod status;
pub mod time;
pub mod writer;

#[cfg(test)]
mod tests;

use serde::Deserialize;
use serde_json::json;
use std::borrow::Cow;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use canonical::{canonicalize, event_name, Problem};
use inbox::Inbox;
use note::SignerKey;
use status::{Snapshot, Status};
use time::now_ts;
use writer::Writer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Records reach the kernel within milliseconds; fsync every sync_window.
    Batch,
    /// A statement goes upstream once its record reached the kernel (survives kill -9);
    /// fsync on the batch schedule.
    Write,
    /// A statement goes upstream once its record is fsync'd (survives a power loss).
    Statement,
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Batch => "batch",
            SyncMode::Write => "write",
            SyncMode::Statement => "statement",
        }
    }

    /// Whether a session awaits its statement record before the statement goes upstream.
    pub fn statements_wait(self) -> bool {
        self != SyncMode::Batch
    }
}

fn default_sync() -> SyncMode {
    SyncMode::Batch
}
fn default_window() -> u64 {
    50
}
fn default_interval() -> u64 {
    1000
}
/// A checkpoint costs a signature, an fsync and a file replacement (about half a millisecond
/// of CPU): at a thousand records each, they were a third of the trail's cost under load. Time
/// (checkpoint_interval) normally decides; the count only bounds a burst.
fn default_every() -> u64 {
    100_000
}
fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_segment_age() -> u64 {
    86_400_000
}
fn default_pending() -> usize {
    100_000
}

/// The data-plane config's `"audit"` object (docs/native-config.md).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    pub dir: String,
    pub origin: String,
    pub signing_key: String,
    #[serde(default)]
    pub previous_signing_key: Option<String>,
    pub hmac_key: String,
    #[serde(default = "default_sync")]
    pub sync: SyncMode,
    #[serde(default = "default_window")]
    pub sync_window_ms: u64,
    #[serde(default = "default_interval")]
    pub checkpoint_interval_ms: u64,
    #[serde(default = "default_every")]
    pub checkpoint_every: u64,
    #[serde(default)]
    pub checkpoint_copy_dir: Option<String>,
    #[serde(default)]
    pub checkpoint_command: Vec<String>,
    #[serde(default = "default_segment_bytes")]
    pub segment_max_bytes: u64,
    #[serde(default = "default_segment_age")]
    pub segment_max_age_ms: u64,
    #[serde(default = "default_pending")]
    pub max_pending_records: usize,
    /// Distinct subject-key hashes recorded per relation and result; past it, a count.
    #[serde(default = "default_disclosures_exact_max")]
    pub disclosures_exact_max: usize,
}

fn default_disclosures_exact_max() -> usize {
    1000
}

impl std::fmt::Debug for AuditSettings {
    // Keys never appear in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSettings").field("dir", &self.dir).field("origin", &self.origin).field("sync", &self.sync).finish_non_exhaustive()
    }
}

impl AuditSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.dir.is_empty() {
            return Err("audit.dir: required".into());
        }
        if !(1..=1000).contains(&self.sync_window_ms) {
            return Err("audit.sync_window_ms: must be between 1 and 1000".into());
        }
        if !(1..=3_600_000).contains(&self.checkpoint_interval_ms) {
            return Err("audit.checkpoint_interval_ms: must be between 1 and 3600000".into());
        }
        if self.checkpoint_every == 0 || self.segment_max_bytes < 4096 || self.max_pending_records == 0 {
            return Err("audit: checkpoint_every and max_pending_records must be positive, segment_max_bytes at least 4096".into());
        }
        self.hmac_key_bytes()?;
        if !(1..=1_000_000).contains(&self.disclosures_exact_max) {
            return Err("audit.disclosures_exact_max: must be between 1 and 1000000".into());
        }
        SignerKey::parse(&self.signing_key).map_err(|e| format!("audit.signing_key: {e}"))?;
        if let Some(p) = &self.previous_signing_key {
            SignerKey::parse(p).map_err(|e| format!("audit.previous_signing_key: {e}"))?;
        }
        Ok(())
    }

    /// The raw audit HMAC key (32 bytes): subject keys, literals and parameters are recorded
    /// as keyed hashes under it.
    pub fn hmac_key_bytes(&self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.hmac_key.trim())
            .map_err(|_| "audit.hmac_key: not base64".to_string())?;
        if raw.len() != 32 {
            return Err("audit.hmac_key: must be 32 bytes".into());
        }
        Ok(raw)
    }

    /// Whether a reload asks for a different trail (dir, keys, origin): that needs a restart.
    pub fn needs_restart(&self, other: &AuditSettings) -> bool {
        self != other
    }
}

/// A receiver that resolves when the record is as durable as the sync mode promises: written
/// (handed to the kernel) in write mode, fsync'd in statement mode (Err: why it is not).
pub type Durable = tokio::sync::oneshot::Receiver<Result<(), String>>;

/// Marks the inbox shut when the writer thread ends, however it ends.
struct ShutOnExit(Arc<Inbox>);

impl Drop for ShutOnExit {
    fn drop(&mut self) {
        self.0.shut();
    }
}

/// The open trail: hands records to the writer thread and reads its status.
pub struct Trail {
    inbox: Arc<Inbox>,
    status: Arc<Status>,
    /// "event.field" of floats already warned about (once each).
    float_warned: parking_lot::Mutex<HashSet<String>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    pub settings: AuditSettings,
}

fn at(dir: &std::path::Path, what: impl std::fmt::Display) -> String {
    format!("audit trail {}: {what}", dir.display())
}

impl Trail {
    /// Recovers the trail in `settings.dir`, writes `audit_open` (and `audit_key_rotated`) and
    /// starts the writer thread. Errors say what the operator must fix; nothing runs then.
    pub fn open(settings: &AuditSettings) -> Result<Trail, String> {
        settings.validate()?;
        let dir = PathBuf::from(&settings.dir);
        if !dir.is_dir() {
            return Err(at(&dir, "is not a directory; create it (owned by the gateway's user) or set [audit] dir"));
        }
        let signer = SignerKey::parse(&settings.signing_key).map_err(|e| format!("audit.signing_key: {e}"))?;
        let previous = settings.previous_signing_key.as_deref().map(SignerKey::parse).transpose().map_err(|e| format!("audit.previous_signing_key: {e}"))?;
        if signer.name != settings.origin {
            return Err(format!("audit.origin is {:?} but the signing key is named {:?}", settings.origin, signer.name));
        }
        let rec = recovery::recover(&dir)?;
        let rotating = match rec.last_signers.last() {
            None => false,
            Some(_) if rec.last_signers.contains(&signer.id()) => false,
            Some(_) if previous.as_ref().is_some_and(|p| rec.last_signers.contains(&p.id())) => true,
            Some(last) => {
                return Err(at(&dir, format!("was signed by key {last}, which is neither signing_key ({}) nor previous_signing_key; set previous_signing_key to the key that signed it to rotate (or set signing_key back to it)", signer.id())));
            }
        };
        let now = time::now_us();
        let seg = match &rec.segment {
            Some((path, first, len, started)) => segment::Segment::reopen(path.clone(), *first, *len, started.unwrap_or(now)),
            None => segment::Segment::create(&dir, 0, now),
        }
        .map_err(|e| at(&dir, format!("cannot open a segment for writing: {e}")))?;
        let runner = publish::CommandRunner::new(settings.checkpoint_command.clone()).map_err(|e| at(&dir, e))?;
        let status = Arc::new(Status::default());
        let vkey = signer.verifier_text();
        let old_vkey = previous.as_ref().map(SignerKey::verifier_text);
        let ws = writer::Settings {
            dir: dir.clone(),
            origin: settings.origin.clone(),
            signer,
            previous,
            sync: settings.sync,
            sync_window: Duration::from_millis(settings.sync_window_ms),
            checkpoint_interval: Duration::from_millis(settings.checkpoint_interval_ms),
            checkpoint_every: settings.checkpoint_every,
            copy_dir: settings.checkpoint_copy_dir.as_ref().map(PathBuf::from),
            segment_max_bytes: settings.segment_max_bytes,
            segment_max_age_us: settings.segment_max_age_ms.saturating_mul(1000).min(i64::MAX as u64) as i64,
            max_pending: settings.max_pending_records,
        };
        let mut w = Writer::new(ws, status.clone(), seg, rec.position, runner);
        let mut first = vec![json!({"event": "audit_open", "key": vkey, "origin": settings.origin, "recovered": rec.torn, "ts": time::now_ts()})];
        if rotating {
            first.push(json!({"event": "audit_key_rotated", "new_key": vkey, "old_key": old_vkey, "ts": time::now_ts()}));
            w.dual_sign = true;
        }
        w.write_now(first.iter().map(|v| serde_json::to_vec(v).unwrap_or_default()).collect())
            .map_err(|e| at(&dir, format!("cannot write: {e}")))?;
        if rotating {
            // The dual-signed checkpoint at once: it vouches for the new key.
            w.checkpoint();
        }
        let inbox = Arc::new(Inbox::default());
        let theirs = inbox.clone();
        let thread = std::thread::Builder::new()
            .name("phigate-audit".into())
            .spawn(move || {
                let _shut = ShutOnExit(theirs.clone());
                w.run(theirs);
            })
            .map_err(|e| at(&dir, e))?;
        Ok(Trail { inbox, status, float_warned: parking_lot::Mutex::new(HashSet::new()), thread: parking_lot::Mutex::new(Some(thread)), settings: settings.clone() })
    }

    /// A body as the trail holds it: canonical, floats as strings, never dropped (a body that
    /// is not a JSON object becomes a bad_record record carrying its SHA-256).
    fn canonical<'b>(&self, body: &'b [u8], promised: bool) -> Cow<'b, [u8]> {
        if promised {
            debug_assert!(canonical::is_canonical(body), "a producer promised a canonical record body and broke the promise");
            return Cow::Borrowed(body);
        }
        match canonicalize(body) {
            Ok((c, floats)) => {
                if !floats.is_empty() {
                    self.status.float_values.fetch_add(floats.len() as u64, Ordering::Relaxed);
                    let event = event_name(&c);
                    let mut warned = self.float_warned.lock();
                    for f in floats {
                        if warned.insert(format!("{event}.{f}")) {
                            eprintln!("phigate: audit record {event:?} carries a float at {f:?}; it was written as a string (records hold integers and strings only)");
                        }
                    }
                }
                Cow::Owned(c)
            }
            Err(Problem::NotAnObject(why)) => {
                self.status.bad_records.fetch_add(1, Ordering::Relaxed);
                eprintln!("phigate: an audit record body was {why}; a bad_record record with its SHA-256 stands in for it");
                let digest = ring::digest::digest(&ring::digest::SHA256, body);
                let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                Cow::Owned(serde_json::to_vec(&json!({"event": "bad_record", "reason": why, "sha256": hex, "ts": now_ts()})).unwrap_or_default())
            }
        }
    }

    fn send(&self, body: &[u8], canonical: bool, done: Option<writer::Done>) {
        if !self.inbox.push(&self.canonical(body, canonical), done) {
            // Closed: the writer has stopped; the record cannot be written anywhere.
            self.status.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends a record body (a JSON object; made canonical first).
    pub fn append(&self, body: &[u8]) {
        self.send(body, false, None);
    }

    /// Appends a body its producer guarantees is canonical (sorted keys, no whitespace, no
    /// floats): it is taken as it is (debug builds check the promise).
    pub fn append_canonical(&self, body: &[u8]) {
        self.send(body, true, None);
    }

    /// Appends a body and returns what resolves once it is durable as the sync mode promises.
    pub fn append_durable(&self, body: &[u8], canonical: bool) -> Durable {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(body, canonical, Some(tx));
        rx
    }

    pub fn sync_mode(&self) -> SyncMode {
        self.settings.sync
    }

    /// The reason word while the trail cannot write (statements are refused then).
    pub fn failing(&self) -> Option<String> {
        self.status.failing_reason()
    }

    pub fn status(&self) -> Snapshot {
        self.status.snapshot()
    }

    /// Writes audit_close and a final checkpoint, fsyncs and stops the writer; later appends
    /// are counted as lost. Blocks until done; a second call does nothing.
    pub fn close(&self) {
        let Some(thread) = self.thread.lock().take() else { return };
        let (tx, rx) = mpsc::channel();
        if self.inbox.close(tx) {
            let _ = rx.recv();
        }
        let _ = thread.join();
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        self.close();
    }
}
