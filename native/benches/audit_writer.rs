//! Micro-benchmark of the audit trail's cost per record, as the gateway pays it under load:
//! one producer appends statement- and result-sized canonical records at a steady rate
//! (pgbench -S through one gateway makes about 50,000 a second) to a batch-mode trail on a
//! temporary directory; it reports the producer's CPU and the whole process's CPU per record
//! (the writer thread's hashing, write()s, fsyncs and checkpoints included).
//! `cargo bench --bench audit_writer` (RECORDS, RATE and CHECKPOINT_EVERY env vars override).

use base64::Engine as _;
use phigate_native::audit::{AuditSettings, SyncMode, Trail};
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::time::{Duration, Instant};

const STATEMENT: &str = r#"{"cached":true,"columns_read":["public.pgbench_accounts.abalance","public.pgbench_accounts.aid"],"columns_written":[],"decision":"allow","event":"statement","kind":"select","literals":[],"masking":{"by":null,"columns":{}},"normalized":"select abalance from pgbench_accounts where aid = $1","parameters":["h:4629a1f4537c3b954cd3bbdfb96a1747"],"protocol":"extended","relations":["public.pgbench_accounts"],"rule":"role:bench allow select","session":"2aa94847-367b-4431-b539-28c0001d3eee","stmt":1,"ts":"2026-12-06T20:41:31.060028Z"}"#;
const RESULT: &str = r#"{"bytes":22,"duration_us":185,"event":"result","rows":1,"rows_masked":0,"session":"2aa94847-367b-4431-b539-28c0001d3eee","skipped":false,"sqlstate":null,"stmt":1,"ts":"2026-12-06T20:41:31.061898Z"}"#;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn cpu(who: libc::c_int) -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn signer(name: &str) -> String {
    let seed = [7u8; 32];
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
    let h = phigate_native::audit::note::key_hash(name, pair.public_key().as_ref());
    let mut blob = vec![1u8];
    blob.extend_from_slice(&seed);
    format!("PRIVATE+KEY+{name}+{h:08x}+{}", base64::engine::general_purpose::STANDARD.encode(blob))
}

fn main() {
    let records = env("RECORDS", 500_000);
    let rate = env("RATE", 50_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = AuditSettings {
        dir: dir.path().display().to_string(),
        origin: "bench/gw".into(),
        signing_key: signer("bench/gw"),
        previous_signing_key: None,
        hmac_key: base64::engine::general_purpose::STANDARD.encode([5u8; 32]),
        sync: SyncMode::Batch,
        sync_window_ms: 50,
        checkpoint_interval_ms: 1000,
        checkpoint_every: env("CHECKPOINT_EVERY", 100_000),
        checkpoint_copy_dir: None,
        checkpoint_command: vec![],
        segment_max_bytes: 64 << 20,
        segment_max_age_ms: 86_400_000,
        max_pending_records: 100_000,
        disclosures_exact_max: 1000,
    };
    let trail = Trail::open(&settings).expect("trail");
    let (proc0, thread0, t0) = (cpu(libc::RUSAGE_SELF), cpu(libc::RUSAGE_THREAD), Instant::now());
    // Paced in 1 ms steps, as sessions would append.
    let per_ms = (rate / 1000).max(1);
    let mut sent = 0;
    while sent < records {
        for _ in 0..per_ms.min(records - sent) {
            let body = if sent % 2 == 0 { STATEMENT } else { RESULT };
            trail.append_canonical(body.as_bytes());
            sent += 1;
        }
        let due = t0 + Duration::from_micros(sent * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let producer = cpu(libc::RUSAGE_THREAD) - thread0;
    trail.close();
    let (whole, wall) = (cpu(libc::RUSAGE_SELF) - proc0, t0.elapsed());
    let bytes = trail.status().bytes_written;
    let per = |d: Duration| d.as_nanos() as f64 / records as f64;
    println!("audit trail, batch mode: {records} records at {rate}/s over {:.1} s, {:.0} bytes/record written", wall.as_secs_f64(), bytes as f64 / records as f64);
    println!("  producer CPU           {:>7.0} ns/record (appending)", per(producer));
    println!("  writer and rest, CPU   {:>7.0} ns/record (hashing, write(), fsync, checkpoints)", per(whole.saturating_sub(producer)));
    println!("  whole process CPU      {:>7.0} ns/record", per(whole));
}
