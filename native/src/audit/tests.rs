//! The writer end to end on a temporary directory: lines chained and canonical, checkpoints
//! that verify, restart, torn tails, rotation, keys.

use super::merkle::{leaf_hash, to_hex, CompactRange};
use super::*;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde_json::Value;
use std::path::Path;

fn signer_text(name: &str, seed: u8) -> String {
    let pair = Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
    let h = note::key_hash(name, pair.public_key().as_ref());
    let mut blob = vec![1u8];
    blob.extend_from_slice(&[seed; 32]);
    format!("PRIVATE+KEY+{name}+{h:08x}+{}", base64::engine::general_purpose::STANDARD.encode(blob))
}

fn settings(dir: &Path, seed: u8) -> AuditSettings {
    AuditSettings {
        dir: dir.display().to_string(),
        origin: "test/gw".into(),
        signing_key: signer_text("test/gw", seed),
        previous_signing_key: None,
        hmac_key: base64::engine::general_purpose::STANDARD.encode([5u8; 32]),
        sync: SyncMode::Batch,
        sync_window_ms: 5,
        checkpoint_interval_ms: 3_600_000,
        checkpoint_every: 1000,
        checkpoint_copy_dir: None,
        checkpoint_command: vec![],
        segment_max_bytes: 64 << 20,
        segment_max_age_ms: 86_400_000,
        max_pending_records: 100,
        disclosures_exact_max: 1000,
    }
}

/// Every line of every segment, checked: canonical, seq contiguous, prev chained, and each
/// checkpoint's size, root and signatures against the recomputed tree. Returns the records.
fn verify(dir: &Path) -> Vec<Value> {
    let mut tree = CompactRange::default();
    let mut prev = [0u8; 32];
    let mut recs = vec![];
    for (first, path) in segment::list(dir).unwrap() {
        assert_eq!(first, tree.size(), "segment name = first seq");
        let data = std::fs::read(&path).unwrap();
        assert!(data.is_empty() || data.ends_with(b"\n"));
        for line in data.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_slice(line).unwrap();
            assert_eq!(serde_json::to_vec(&v).unwrap(), line, "canonical");
            assert_eq!(v["seq"].as_u64(), Some(tree.size()));
            assert_eq!(v["prev"].as_str().unwrap(), to_hex(&prev));
            let rec = &v["rec"];
            if rec["event"] == "checkpoint" {
                let root = tree.root();
                assert_eq!(rec["size"].as_u64(), Some(tree.size()));
                assert_eq!(rec["root"].as_str().unwrap(), note::b64(&root));
                let note = rec["note"].as_str().unwrap();
                let (body, sigs) = note.split_once("\n\n").unwrap();
                assert_eq!(format!("{body}\n"), note::checkpoint_body("test/gw", tree.size(), &root));
                assert!(!sigs.is_empty());
            }
            prev = leaf_hash(line);
            tree.append(prev);
            recs.push(rec.clone());
        }
    }
    recs
}

fn events(recs: &[Value]) -> Vec<String> {
    recs.iter().map(|r| r["event"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn records_are_chained_checkpointed_and_continue_after_restart() {
    let d = tempfile::tempdir().unwrap();
    let t = Trail::open(&settings(d.path(), 1)).unwrap();
    t.append(br#"{"ts":"x","event":"a","z":1,"b":"\u00e9"}"#);
    t.append_canonical(br#"{"event":"b","ts":"x"}"#);
    t.append(br#"{"event":"f","ms":1.5}"#);
    t.append(b"[not an object");
    t.close();
    let recs = verify(d.path());
    assert_eq!(events(&recs), ["audit_open", "a", "b", "f", "bad_record", "audit_close", "checkpoint"]);
    assert_eq!(recs[3]["ms"], "1.5");
    let note = std::fs::read_to_string(d.path().join("checkpoint")).unwrap();
    assert_eq!(note, recs[6]["note"].as_str().unwrap());
    // The signature verifies under the key's public half.
    let (body, sig) = note.split_once("\n\n").unwrap();
    let raw = base64::engine::general_purpose::STANDARD.decode(sig.trim_end().rsplit(' ').next().unwrap()).unwrap();
    let pair = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
    UnparsedPublicKey::new(&ED25519, pair.public_key().as_ref()).verify(format!("{body}\n").as_bytes(), &raw[4..]).unwrap();

    let t = Trail::open(&settings(d.path(), 1)).unwrap();
    t.append(br#"{"event":"c"}"#);
    t.close();
    let recs = verify(d.path());
    assert_eq!(events(&recs)[7..], ["audit_open", "c", "audit_close", "checkpoint"]);
    assert!(recs[7]["recovered"].is_null());
}

#[test]
fn a_torn_tail_is_set_aside_and_recorded() {
    let d = tempfile::tempdir().unwrap();
    let t = Trail::open(&settings(d.path(), 1)).unwrap();
    t.append(br#"{"event":"a"}"#);
    t.close();
    let seg = d.path().join(segment::segment_name(0));
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, br#"{"prev":"00","rec":{"ev"#).unwrap();
    let t = Trail::open(&settings(d.path(), 1)).unwrap();
    t.close();
    let recs = verify(d.path());
    let open = recs.iter().rfind(|r| r["event"] == "audit_open").unwrap();
    assert_eq!(open["recovered"]["bytes"], 23);
    assert_eq!(open["recovered"]["segment"], "segment-000000000000.jsonl");
    let aside: Vec<_> = std::fs::read_dir(d.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".torn-")).collect();
    assert_eq!(aside.len(), 1);
}

#[test]
fn a_restart_without_any_checkpoint_rehashes_the_first_segment() {
    let d = tempfile::tempdir().unwrap();
    let t = Trail::open(&settings(d.path(), 1)).unwrap();
    t.append(br#"{"event":"a"}"#);
    // Simulates a crash: the thread is never told to close, the process "dies" here.
    std::mem::forget(t);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let t = Trail::open(&settings(d.path(), 1)).unwrap();
    t.close();
    assert_eq!(events(&verify(d.path()))[..3], ["audit_open", "a", "audit_open"]);
}

#[test]
fn segments_rotate_after_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let mut s = settings(d.path(), 1);
    s.segment_max_bytes = 4096;
    s.checkpoint_every = 10;
    let t = Trail::open(&s).unwrap();
    for i in 0..200 {
        t.append(format!(r#"{{"event":"x","i":{i},"pad":"{}"}}"#, "p".repeat(100)).as_bytes());
    }
    t.close();
    let segs = segment::list(d.path()).unwrap();
    assert!(segs.len() > 3, "{} segments", segs.len());
    for (_, p) in &segs[..segs.len() - 1] {
        let data = std::fs::read(p).unwrap();
        let last = data.split(|&c| c == b'\n').rfind(|l| !l.is_empty()).unwrap();
        assert!(memchr::memmem::find(last, br#""event":"checkpoint""#).is_some(), "a closed segment ends with a checkpoint");
    }
    let recs = verify(d.path());
    assert_eq!(recs.iter().filter(|r| r["event"] == "x").count(), 200);
    assert!(recs.iter().filter(|r| r["event"] == "checkpoint").count() >= 20);
    let t = Trail::open(&s).unwrap();
    t.append(br#"{"event":"after"}"#);
    t.close();
    verify(d.path());
}

#[test]
fn a_trail_signed_by_another_key_needs_previous_signing_key() {
    let d = tempfile::tempdir().unwrap();
    Trail::open(&settings(d.path(), 1)).unwrap().close();
    let err = Trail::open(&settings(d.path(), 2)).err().unwrap();
    assert!(err.contains("set previous_signing_key"), "{err}");
    let mut s = settings(d.path(), 2);
    s.previous_signing_key = Some(signer_text("test/gw", 1));
    let t = Trail::open(&s).unwrap();
    t.close();
    let recs = verify(d.path());
    let i = recs.iter().position(|r| r["event"] == "audit_key_rotated").unwrap();
    assert_eq!(recs[i + 1]["event"], "checkpoint");
    assert_eq!(note::note_signers(recs[i + 1]["note"].as_str().unwrap()).len(), 2);
    // From then on the new key alone is enough.
    Trail::open(&settings(d.path(), 2)).unwrap().close();
}

#[tokio::test]
async fn statement_sync_resolves_after_fsync() {
    let d = tempfile::tempdir().unwrap();
    let mut s = settings(d.path(), 1);
    s.sync = SyncMode::Statement;
    let t = Trail::open(&s).unwrap();
    let done = t.append_durable(br#"{"event":"statement"}"#, false);
    assert_eq!(done.await.unwrap(), Ok(()));
    let data = std::fs::read_to_string(d.path().join(segment::segment_name(0))).unwrap();
    assert!(data.contains(r#""event":"statement""#));
    t.close();
}

#[tokio::test]
async fn write_sync_resolves_once_the_record_is_in_the_file() {
    let d = tempfile::tempdir().unwrap();
    let mut s = settings(d.path(), 1);
    s.sync = serde_json::from_str(r#""write""#).unwrap();
    assert_eq!(s.sync, SyncMode::Write);
    // The batch-schedule fsync comes a second after audit_open's: an answer sooner did not wait for it.
    s.sync_window_ms = 1000;
    let t = Trail::open(&s).unwrap();
    let asked = std::time::Instant::now();
    let done = t.append_durable(br#"{"event":"statement"}"#, false);
    assert_eq!(done.await.unwrap(), Ok(()));
    assert!(asked.elapsed() < std::time::Duration::from_millis(500));
    let data = std::fs::read_to_string(d.path().join(segment::segment_name(0))).unwrap();
    assert!(data.contains(r#""event":"statement""#));
    t.close();
}
