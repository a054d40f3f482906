//! Micro-benchmark of the layer 2 masking per DataRow, of the content detectors and of the
//! identifier dictionaries and of the accounting of disclosures, with no benchmark framework so
//! it runs on stable:
//! `cargo bench --bench masking`.
//!
//! For instruction counts (other jobs on the machine make wall time noisy), one case runs alone
//! under callgrind, with only its loop counted:
//! `MASKING_BENCH_CASE=note-bulk MASKING_BENCH_ROWS=2000 valgrind --tool=callgrind
//!  --toggle-collect='*measured_loop*' target/release/deps/masking-<hash>` (cases: `CASES`).

use bytes::{BufMut, BytesMut};
use phigate_native::disclosures::{ResultPlan, SubjectKey, SubjectMap, SubjectRelation, Tally};
use phigate_native::masking::detectors::Detectors;
use phigate_native::masking::dictionary::{Dictionary, DictionaryBuilder, Kind};
use phigate_native::masking::dictionary_set::DictionarySet;
use phigate_native::masking::plan::{mask_data_row, Action, ColumnPlan, MaskPlan, Why};
use phigate_native::masking::values::{Format, Mask, MaskContext};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

/// Iterations per timed case; `MASKING_BENCH_ROWS` overrides (callgrind runs want few).
static ROWS_CELL: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn rows() -> u32 {
    *ROWS_CELL.get_or_init(|| std::env::var("MASKING_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000))
}

/// A synthetic note like the masked bulk-read benchmark's (benches/masked_bulk.py): vitals, doses
/// and lab values (many digits), no identifier.
const CLINICAL_NOTE: &str = "Seen in the nephrology clinic for follow-up of essential hypertension. Reports lightheadedness on standing for the past 26 days, worse in the evening. Vitals: BP 164/82, HR 102, RR 15, temp 36.3 C, SpO2 91% on room air, weight 121.3 kg. Current medications: atorvastatin 40 mg at bedtime, lisinopril 10 mg once daily. Labs this month: HbA1c 7.3%, creatinine 1.69 mg/dL, eGFR 28, potassium 4.9 mmol/L, LDL 123 mg/dL. Reviewed home readings brought to the visit; most fall within the target range with a few higher values after missed doses. Exam: lungs clear to auscultation bilaterally, no wheezes or crackles. Heart regular rate and rhythm, no murmurs, rubs or gallops. Abdomen soft, non-tender, non-distended. No peripheral edema today. Medication reconciliation completed; no side effects reported other than mild nausea in the first week, now resolved. Assessment: type 2 diabetes mellitus, well controlled. Plan: continue current regimen and repeat labs before the next visit.";

fn data_row(vals: &[&[u8]]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(vals.len() as i16);
    for v in vals {
        b.put_i32(v.len() as i32);
        b.put_slice(v);
    }
    b.to_vec()
}

fn time_rows(name: &str, plan: &MaskPlan, body: &[u8]) {
    let mut out = BytesMut::with_capacity(1 << 16);
    for _ in 0..10_000 {
        out.clear();
        mask_data_row(plan, body, &mut out).unwrap();
    }
    let t = Instant::now();
    for _ in 0..rows() {
        out.clear();
        mask_data_row(plan, black_box(body), &mut out).unwrap();
    }
    println!("{name:<48} {:>7.0} ns/row", t.elapsed().as_nanos() as f64 / f64::from(rows()));
}

/// Accounting of disclosures per DataRow: one key column hashed (HMAC-SHA256) and kept in the
/// hash set (distinct keys, up to the cap, then counted), plus the relations counted as possible.
fn time_disclosures() {
    let columns = [(1i16, "id"), (2, "last_name"), (3, "ssn")].into_iter().map(|(a, n)| (a, n.into())).collect();
    let map = SubjectMap::new(vec![SubjectRelation { oid: 500, key_attnum: 1, name: "public.patients".into(), columns }], []);
    let mut rd = BytesMut::new();
    rd.put_i16(3);
    for attnum in 1..=3i16 {
        rd.put_slice(b"c\0");
        rd.put_u32(500);
        rd.put_i16(attnum);
        rd.put_u32(if attnum == 1 { 20 } else { 25 });
        rd.put_i16(-1);
        rd.put_i32(-1);
        rd.put_i16(0);
    }
    let key = SubjectKey::new(&[5u8; 32]);
    let keyed = ResultPlan::from_row_description(&rd, &map, |_, _| false, None).unwrap();
    let all_rows: Vec<Vec<u8>> = (0..rows()).map(|i| data_row(&[i.to_string().as_bytes(), b"Doe", b"123-45-6789"])).collect();
    for (name, cap) in [("disclosures: 1 key column, all distinct, no cap", rows() as usize), ("disclosures: 1 key column, past a cap of 1000", 1000)] {
        let mut tally = Tally::default();
        tally.begin(&keyed);
        let t = Instant::now();
        for r in &all_rows {
            tally.row(&keyed, &key, black_box(r), cap);
        }
        println!("{name:<48} {:>7.0} ns/row", t.elapsed().as_nanos() as f64 / f64::from(rows()));
        black_box(tally.take());
    }
    // Rows sorted or joined by person: ten rows per key, under the default cap of 1000.
    let grouped: Vec<Vec<u8>> = (0..rows()).map(|i| data_row(&[(i / 10 % 1000).to_string().as_bytes(), b"Doe", b"123-45-6789"])).collect();
    let mut tally = Tally::default();
    let t = Instant::now();
    for r in &grouped {
        tally.row(&keyed, &key, black_box(r), 1000);
    }
    println!("{:<48} {:>7.0} ns/row", "disclosures: 1 key column, 10 rows per person", t.elapsed().as_nanos() as f64 / f64::from(rows()));
    let read: Vec<Arc<str>> = vec!["public.patients".into()];
    // A count(*) over patients: no output column from it, the decision says it was read.
    let unkeyed = ResultPlan::from_row_description(&[0, 0], &map, |_, _| false, Some(&read)).unwrap();
    let mut tally = Tally::default();
    let t = Instant::now();
    for r in &all_rows {
        tally.row(&unkeyed, &key, black_box(r), 1000);
    }
    println!("{:<48} {:>7.0} ns/row", "disclosures: no key column (possible, counted)", t.elapsed().as_nanos() as f64 / f64::from(rows()));
}

fn main() {
    if let Ok(case) = std::env::var("MASKING_BENCH_CASE") {
        return callgrind_case(&case);
    }
    time_disclosures();
    let ctx = Arc::new(MaskContext::new(&[7u8; 32], Arc::new(Detectors::standard())));
    // id, name, ssn, dob, email, note, visits, balance — the demo schema's shape.
    let body = data_row(&[
        b"12345",
        b"Jane Q. Doe",
        b"123-45-6789",
        b"1984-08-17",
        b"jane.doe@example.org",
        b"Patient reports mild headache after exercise, no prior history; follow up in two weeks.",
        b"42",
        b"1234.50",
    ]);
    let types = [23u32, 25, 25, 1082, 25, 25, 23, 1700];
    let plan = |actions: Vec<Action>| {
        let cols = types.iter().zip(actions).map(|(&type_oid, action)| ColumnPlan { type_oid, format: Format::Text, action });
        MaskPlan::from_columns(cols.collect(), ctx.clone())
    };
    let m = |mask| Action::Mask { mask, why: Why::NoOrigin };
    let pass = || vec![Action::Pass; 8];

    time_rows("8 columns, none masked (re-framing only)", &plan(pass()), &body);
    let mut one = pass();
    one[2] = m(Mask::Partial { keep_last: 4 });
    time_rows("8 columns, 1 masked (partial:4)", &plan(one), &body);
    let mut one = pass();
    one[1] = m(Mask::Pseudonym);
    time_rows("8 columns, 1 masked (pseudonym)", &plan(one), &body);
    time_rows("8 columns, all masked (redact)", &plan(vec![m(Mask::Redact); 8]), &body);
    let mixed = vec![
        m(Mask::Redact),
        m(Mask::Pseudonym),
        m(Mask::Partial { keep_last: 4 }),
        m(Mask::YearOnly),
        m(Mask::EmailDomain),
        m(Mask::FreeText),
        m(Mask::Redact),
        m(Mask::Null),
    ];
    time_rows("8 columns, all masked (each mask once)", &plan(mixed), &body);
    let mut scan = vec![Action::Scan; 8];
    scan[0] = Action::Pass;
    time_rows("8 columns, text scanned by detectors (2 hits)", &plan(scan), &body);

    // The masked bulk read's row (benches/masked_bulk.py): id, encounter, ssn (partial:4),
    // full_name (pseudonym), birth_date (year), a 1 KB note; unclassified text is scanned.
    let bulk = data_row(&[b"12345", b"ENC-A12345", b"547-48-4730", b"Joseph Martinez", b"1981-03-16", CLINICAL_NOTE.as_bytes()]);
    let bulk_plan = MaskPlan::from_columns(
        [
            (23u32, Action::Pass),
            (25, Action::Scan),
            (25, m(Mask::Partial { keep_last: 4 })),
            (25, m(Mask::Pseudonym)),
            (1082, m(Mask::YearOnly)),
            (25, Action::Scan),
        ]
        .into_iter()
        .map(|(type_oid, action)| ColumnPlan { type_oid, format: Format::Text, action })
        .collect(),
        ctx.clone(),
    );
    time_rows("bulk-read row: 3 masked, 2 scanned (1 KB note)", &bulk_plan, &bulk);
    // The same row as one line of text COPY, masked by column position.
    let line = format!("12345\tENC-A12345\t547-48-4730\tJoseph Martinez\t1981-03-16\t{CLINICAL_NOTE}\n");
    let mut out = BytesMut::with_capacity(1 << 16);
    let t = Instant::now();
    for _ in 0..rows() / 10 {
        out.clear();
        phigate_native::masking::copy::mask_copy_data(&bulk_plan, black_box(line.as_bytes()), b'\t', &mut out).unwrap();
    }
    println!("{:<48} {:>7.0} ns/row", "bulk-read row as a text COPY line", t.elapsed().as_nanos() as f64 / f64::from(rows() / 10));
    for (label, keep) in [("  only the note scanned", 5usize), ("  only the pseudonym", 3), ("  only partial", 2), ("  only year", 4), ("  only encounter scanned", 1)] {
        let mut cols = bulk_plan.columns.clone();
        for (i, c) in cols.iter_mut().enumerate() {
            if i != keep {
                c.action = Action::Pass;
            }
        }
        time_rows(label, &MaskPlan::from_columns(cols, ctx.clone()), &bulk);
    }

    let d = Detectors::standard();
    for (name, s) in [
        ("scrub: prose, no digit", "Patient reports mild headache after exercise, no prior history; follow up soon."),
        ("scrub: prose, few digits", "Patient reports mild headache after 2 days, no prior history; follow up in 14 days."),
        ("scrub: vitals, no identifier", "BP 120/80, HR 72, temp 37.2, SpO2 98%, weight 71.5 kg, seen 2024-03-02."),
        ("scrub: 4 identifiers", "Pt SSN 123-45-6789, DOB: 03/14/1962, call 555-123-4567, mail jane@example.org."),
        ("scrub: 1 KB clinical note, no identifier", CLINICAL_NOTE),
    ] {
        let t = Instant::now();
        for _ in 0..rows() {
            black_box(d.scrub(black_box(s)));
        }
        println!("{name:<48} {:>7.0} ns/value ({} bytes)", t.elapsed().as_nanos() as f64 / f64::from(rows()), s.len());
    }

    dictionary_benches();
}

/// The demo's identifier vocabularies (python/phigate/dev/ehr.py), for a demo-sized dictionary.
const FIRST_NAMES: &[&str] = &[
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth", "William",
    "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Carlos", "Karen", "Daniel", "Lisa", "Matthew",
    "Nancy", "Anthony", "Betty", "Maria", "Donald", "Sandra", "Steven", "Ashley", "Andrew", "Kimberly", "Paul", "Emily",
    "Joshua", "Donna", "Kenneth", "Michelle", "Kevin", "Carol", "Brian", "Amanda", "Wei", "Priya", "Ahmed", "Fatima",
    "Hiroshi", "Olga", "Kwame", "Ngozi", "Diego", "Lucia", "Omar", "Aisha", "Ivan", "Mei",
];
const LAST_NAMES: &[&str] = &[
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez", "Hernandez",
    "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez",
    "Thompson", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Allen", "King", "Wright",
    "Scott", "Torres", "Nguyen", "Flores", "Adams", "Nelson", "Baker", "Rivera", "Campbell", "Mitchell", "Carter",
    "Roberts", "Okafor", "Patel", "Kim", "Chen", "Kowalski", "Novak", "Haddad", "Tanaka", "Mensah", "Ivanova",
];
const STREETS: &[&str] = &["Maple", "Oak", "Pine", "Cedar", "Elm", "Washington", "Lake", "Hill", "Park", "Main", "Walnut", "Sunset"];
const STREET_KINDS: &[&str] = &["St", "Ave", "Rd", "Blvd", "Ln", "Dr", "Ct", "Way"];
const CITIES: &[&str] = &["Springfield", "Riverton", "Fairview", "Georgetown", "Madison", "Franklin", "Clinton", "Salem"];

/// Deterministic pseudo-random numbers (xorshift), so every run builds the same dictionaries.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.next(v.len() as u64) as usize]
    }
}

/// The identifier columns of `patients` patients shaped like the demo's (ehr.py).
fn add_demo_patients(b: &mut DictionaryBuilder, patients: u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..patients {
        let (first, last) = (rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES));
        b.add(Kind::Name, first);
        b.add(Kind::Name, last);
        b.add(Kind::Mrn, &format!("MRN-{:07}", (i * 7919 + 1_000_000) % 10_000_000));
        b.add(Kind::Ssn, &format!("{}-{:02}-{:04}", 900 + rng.next(100), 1 + rng.next(99), 1 + rng.next(9999)));
        b.add(Kind::Address, &format!("{} {} {}", 1 + rng.next(9998), rng.pick(STREETS), rng.pick(STREET_KINDS)));
        b.add(Kind::City, rng.pick(CITIES));
        b.add(Kind::Zip, &format!("{:05}", rng.next(100_000)));
        b.add(Kind::Phone, &format!("(217) 555-01{:02}", rng.next(100)));
        b.add(Kind::Email, &format!("{}.{}{}@example.org", first.to_lowercase(), last.to_lowercase(), rng.next(100)));
    }
    // The identifiers the "5 identifiers" note below holds.
    b.add(Kind::Name, "Daniel");
    b.add(Kind::Name, "Harris");
    b.add(Kind::Name, "Okafor");
    b.add(Kind::Address, "4127 Maple Ave");
    b.add(Kind::City, "Springfield");
}

fn demo_dictionary() -> Dictionary {
    let mut b = DictionaryBuilder::new(["the", "and", "of", "st", "ave", "rd", "dr", "ln", "ct", "way"], 2);
    add_demo_patients(&mut b, 1000);
    b.freeze()
}

/// 1,000,000 distinct name tokens (500,000 two-token names) plus the demo's values.
fn million_token_dictionary() -> (Dictionary, f64) {
    let t = Instant::now();
    let mut b = DictionaryBuilder::new(["the", "and", "of"], 2);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "bu", "da", "fe", "go", "hi", "ju", "qu"];
    let mut word = |k: u64| {
        // Distinct words: the index spelled in syllables, plus a random tail.
        let mut w = String::new();
        let mut n = k;
        loop {
            w.push_str(syllables[(n % 16) as usize]);
            n /= 16;
            if n == 0 {
                break;
            }
        }
        w.push_str(syllables[rng.next(16) as usize]);
        w
    };
    for i in 0..500_000u64 {
        let value = format!("{} {}", word(2 * i), word(2 * i + 1));
        b.add(Kind::Name, &value);
    }
    add_demo_patients(&mut b, 1000);
    let d = b.freeze();
    (d, t.elapsed().as_secs_f64())
}

/// The 1 KB note with five identifiers written in: two names, an address, a town, a name.
fn note_with_identifiers() -> String {
    CLINICAL_NOTE
        .replacen("Seen in the nephrology clinic", "Daniel Harris seen in the nephrology clinic", 1)
        .replacen("Reviewed home readings", "Reviewed home readings (lives at 4127 Maple Ave, Springfield)", 1)
        .replacen("Plan: continue", "Plan: discussed with Okafor; continue", 1)
}

/// The masked bulk read's dictionary (benches/masked_bulk.py): `full_name` (kind name) and
/// `ssn` (kind ssn) of 20,000 rows, both learned by default. Its SSNs make every 3-digit number
/// from 100 to 899 the first token of stored sequences, so the vitals and lab values of a note
/// ("BP 164/82", "LDL 123") are real candidates that go to the table, not filter misses.
fn bulk_read_dictionary() -> Dictionary {
    let mut b = DictionaryBuilder::new(["the", "and", "of"], 2);
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    for _ in 0..20_000 {
        b.add(Kind::Name, &format!("{} {}", rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES)));
        b.add(Kind::Ssn, &format!("{:03}-{:02}-{:04}", 100 + rng.next(800), 1 + rng.next(99), 1 + rng.next(9999)));
    }
    b.freeze()
}

fn per_scan_ns(d: &Detectors, text: &str, rounds: u32) -> f64 {
    for _ in 0..1000 {
        black_box(d.scrub(black_box(text)));
    }
    let t = Instant::now();
    for _ in 0..rounds {
        black_box(d.scrub(black_box(text)));
    }
    t.elapsed().as_nanos() as f64 / f64::from(rounds)
}

/// The scan with the dictionary's table out of cache: 48 MB are read between two scans (more
/// than the L3 cache, and the TLB is flushed of the table's pages), then a short unrelated text
/// is scanned (with two hits) so the code, the stack, the allocator and the detectors' own state
/// are warm again, and the note is read once. Only the note's scan is timed: what a note costs
/// whose words' buckets are not cached.
fn per_scan_cold_ns(d: &Detectors, text: &str, rounds: u32) -> f64 {
    let evict = vec![1u8; 48 << 20];
    let mut total = 0u128;
    for _ in 0..rounds {
        black_box(evict.iter().step_by(64).fold(0u8, |a, &b| a ^ b));
        black_box(d.scrub(black_box("warm up: qzx vbn wpt lkj, Okafor 123-45-6789")));
        // The note itself is in cache, as a row just read from the socket is.
        black_box(text.bytes().fold(0u8, |a, b| a ^ b));
        let t = Instant::now();
        black_box(d.scrub(black_box(text)));
        total += t.elapsed().as_nanos();
    }
    total as f64 / f64::from(rounds)
}

fn dictionary_benches() {
    println!();
    let t = Instant::now();
    let demo = demo_dictionary();
    println!("demo dictionary (1,000 patients): {} entries, {} KB, built in {:.1} ms", demo.len(), demo.memory_bytes() / 1024, t.elapsed().as_secs_f64() * 1e3);
    let (million, secs) = million_token_dictionary();
    println!("1M-token dictionary: {} entries, {:.1} MB, built in {:.2} s", million.len(), million.memory_bytes() as f64 / (1 << 20) as f64, secs);

    let with = |d: Dictionary| {
        let set = Arc::new(DictionarySet::default());
        set.set("ehr", Arc::new(d));
        Detectors::standard().with_dictionaries(set)
    };
    let bulk_dict = bulk_read_dictionary();
    println!("bulk-read dictionary (20,000 names and SSNs): {} entries, {} KB", bulk_dict.len(), bulk_dict.memory_bytes() / 1024);
    let none = Detectors::standard();
    let bulk_dict = with(bulk_dict);
    let demo = Arc::new(with(demo));
    let million = with(million);

    // Whole rows with the demo dictionary: every scanned text value is now tokenized.
    let ctx = Arc::new(MaskContext::new(&[7u8; 32], demo.clone()));
    let short_values = data_row(&[b"12345", b"Jane Q. Doe", b"123-45-6789", b"1984-08-17", b"jane.doe@example.org", b"follow up in two weeks", b"42", b"1234.50"]);
    let types = [23u32, 25, 25, 1082, 25, 25, 23, 1700];
    let mut scan = vec![Action::Scan; 8];
    scan[0] = Action::Pass;
    let cols = types.iter().zip(scan).map(|(&type_oid, action)| ColumnPlan { type_oid, format: Format::Text, action });
    time_rows("8 columns, 7 scanned, demo dictionary", &MaskPlan::from_columns(cols.collect(), ctx.clone()), &short_values);
    let bulk = data_row(&[b"12345", b"ENC-A12345", CLINICAL_NOTE.as_bytes()]);
    let cols = [(23u32, Action::Pass), (25, Action::Scan), (25, Action::Scan)].into_iter().map(|(type_oid, action)| ColumnPlan { type_oid, format: Format::Text, action });
    time_rows("bulk-read row: 2 scanned (1 KB note), demo dict.", &MaskPlan::from_columns(cols.collect(), ctx), &bulk);
    let five = note_with_identifiers();
    println!("five-identifier note, demo dictionary: {}", demo.scrub(&five).split_whitespace().filter(|w| w.contains('[')).count());
    for (label, text) in [("1 KB note, no identifier", CLINICAL_NOTE), ("1 KB note, 5 identifiers", five.as_str())] {
        let base = per_scan_ns(&none, text, rows());
        println!("{label:<48} {base:>7.0} ns/note  no dictionary");
        for (name, d) in [("bulk-read dictionary", &bulk_dict), ("demo dictionary", &*demo), ("1M-token dictionary", &million)] {
            let ns = per_scan_ns(d, text, rows());
            println!("{:<48} {ns:>7.0} ns/note  {name} (+{:.0} ns)", "", ns - base);
        }
        let base = per_scan_cold_ns(&none, text, 300);
        println!("{:<48} {base:>7.0} ns/note  no dictionary, table cold", "");
        for (name, d) in [("demo dictionary", &*demo), ("1M-token dictionary", &million)] {
            let ns = per_scan_cold_ns(d, text, 300);
            println!("{:<48} {ns:>7.0} ns/note  {name}, table cold (+{:.0} ns)", "", ns - base);
        }
    }
}

/// The cases `MASKING_BENCH_CASE` picks, one per run: a 1 KB note scanned with no dictionary,
/// the bulk-read or the demo dictionary, the note with five identifiers (demo dictionary), and
/// the masked bulk read's whole row (DataRow and COPY line) with the bulk-read dictionary.
/// `row-varied`: the bulk-read row with 256 notes of the same words in different orders, one
/// after the other, so that (as in a real read) the branch predictor cannot learn one note.
/// `row-stream`: the masked bulk read as the gateway does it: 20,000 different rows (names, SSNs,
/// birth dates, and notes with their own vitals, doses and lab values), each copied in from a
/// 21 MB stream as a socket read would, masked, and the output copied out about 60 KB at a time
/// as a socket write would, so that the dictionary's bitsets and table compete with the stream
/// for the caches.
const CASES: [&str; 9] = ["note-none", "note-bulk", "note-demo", "note5-demo", "row-bulk", "copy-bulk", "row-bulk-nodict", "row-varied", "row-stream"];

/// A clinical note like the masked bulk read's (benches/masked_bulk.py): its own numbers.
fn bench_note(rng: &mut Rng) -> String {
    const DEPTS: &[&str] = &["internal medicine", "cardiology", "endocrinology", "pulmonology", "nephrology", "family medicine"];
    const CONDITIONS: &[&str] = &["type 2 diabetes mellitus", "essential hypertension", "chronic kidney disease stage 3a", "asthma", "hypothyroidism", "atrial fibrillation", "gout"];
    const MEDS: &[(&str, &str, &str)] = &[("metformin", "500", "twice daily"), ("lisinopril", "10", "once daily"), ("atorvastatin", "40", "at bedtime"), ("levothyroxine", "0.075", "every morning"), ("allopurinol", "100", "once daily"), ("metoprolol succinate", "50", "once daily")];
    const FILLER: &[&str] = &[
        "Exam: lungs clear to auscultation bilaterally, no wheezes or crackles. Heart regular rate and rhythm, no murmurs, rubs or gallops. Abdomen soft, non-tender, non-distended. No peripheral edema today. ",
        "Reviewed home readings brought to the visit; most fall within the target range with a few higher values after missed doses. ",
        "Discussed diet, regular walking and medication adherence; the patient verbalized understanding and agrees with the plan. ",
        "No chest pain, no fever or chills, no changes in bowel habits, no new rashes. Sleep is fair. Denies tobacco use; alcohol occasionally on weekends. ",
        "Medication reconciliation completed; no side effects reported other than mild nausea in the first week, now resolved. ",
    ];
    let mut r = |lo: u64, hi: u64| lo + rng.next(hi - lo + 1);
    let (m1, m2) = (MEDS[r(0, 2) as usize], MEDS[r(3, 5) as usize]);
    let mut t = format!(
        "Seen in the {} clinic for follow-up of {}. Reports intermittent fatigue for the past {} days. Vitals: BP {}/{}, HR {}, RR {}, temp {}.{} C, SpO2 {}% on room air, weight {}.{} kg. Current medications: {} {} mg {}, {} {} mg {}. Labs this month: HbA1c {}.{}%, creatinine {}.{:02} mg/dL, eGFR {}, potassium {}.{} mmol/L, LDL {} mg/dL. ",
        DEPTS[r(0, 5) as usize], CONDITIONS[r(0, 6) as usize], r(2, 30), r(104, 168), r(58, 98), r(52, 110), r(12, 22), r(36, 37), r(0, 9), r(91, 100), r(48, 130), r(0, 9),
        m1.0, m1.1, m1.2, m2.0, m2.1, m2.2, r(5, 10), r(0, 9), r(0, 2), r(0, 99), r(28, 110), r(3, 5), r(0, 9), r(55, 190)
    );
    while t.len() < 1024 {
        t.push_str(FILLER[r(0, 4) as usize]);
    }
    t.truncate(t[..1024].rfind(". ").map_or(1024, |i| i + 1));
    t
}

/// 256 notes: the clinical note's words, shuffled.
fn varied_notes() -> Vec<String> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    (0..256)
        .map(|_| {
            let mut words: Vec<&str> = CLINICAL_NOTE.split(' ').collect();
            for i in (1..words.len()).rev() {
                words.swap(i, rng.next(i as u64 + 1) as usize);
            }
            words.join(" ")
        })
        .collect()
}

/// Runs `work` `rows()` times; the only function callgrind counts (`--toggle-collect`).
#[inline(never)]
fn measured_loop(work: &mut dyn FnMut()) {
    for _ in 0..rows() {
        work();
    }
}

fn callgrind_case(case: &str) {
    let with = |d: Dictionary| {
        let set = Arc::new(DictionarySet::default());
        set.set("ehr", Arc::new(d));
        Arc::new(Detectors::standard().with_dictionaries(set))
    };
    let detectors = match case {
        "note-none" | "row-bulk-nodict" => Arc::new(Detectors::standard()),
        "note-bulk" | "row-bulk" | "copy-bulk" | "row-varied" | "row-stream" => with(bulk_read_dictionary()),
        "note-demo" | "note5-demo" => with(demo_dictionary()),
        _ => panic!("unknown case {case:?}; one of {CASES:?}"),
    };
    let five = note_with_identifiers();
    let ctx = Arc::new(MaskContext::new(&[7u8; 32], detectors.clone()));
    let m = |mask| Action::Mask { mask, why: Why::NoOrigin };
    // The masked bulk read's columns (benches/masked_bulk.py, set A).
    let plan = MaskPlan::from_columns(
        [(23u32, Action::Pass), (25, Action::Scan), (25, m(Mask::Partial { keep_last: 4 })), (25, m(Mask::Pseudonym)), (1082, m(Mask::YearOnly)), (25, Action::Scan)]
            .into_iter()
            .map(|(type_oid, action)| ColumnPlan { type_oid, format: Format::Text, action })
            .collect(),
        ctx,
    );
    let row = data_row(&[b"12345", b"ENC-A12345", b"547-48-4730", b"Joseph Martinez", b"1981-03-16", CLINICAL_NOTE.as_bytes()]);
    let line = format!("12345\tENC-A12345\t547-48-4730\tJoseph Martinez\t1981-03-16\t{CLINICAL_NOTE}\n");
    let varied: Vec<Vec<u8>> = varied_notes()
        .iter()
        .map(|note| data_row(&[b"12345", b"ENC-A12345", b"547-48-4730", b"Joseph Martinez", b"1981-03-16", note.as_bytes()]))
        .collect();
    let mut next = 0;
    // row-stream: the rows one after the other as they come from PostgreSQL, a socket read's
    // buffer, and where the socket writes copy the output to.
    let (stream, starts) = if case == "row-stream" {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut stream = Vec::new();
        let mut starts = vec![0];
        for i in 0..20_000u32 {
            let ssn = format!("{:03}-{:02}-{:04}", 100 + rng.next(800), 1 + rng.next(99), 1 + rng.next(9999));
            let name = format!("{} {}", rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES));
            let born = format!("{}-{:02}-{:02}", 1930 + rng.next(79), 1 + rng.next(12), 1 + rng.next(28));
            let note = bench_note(&mut rng);
            stream.extend_from_slice(&data_row(&[i.to_string().as_bytes(), format!("ENC-A{i:05}").as_bytes(), ssn.as_bytes(), name.as_bytes(), born.as_bytes(), note.as_bytes()]));
            starts.push(stream.len());
        }
        (stream, starts)
    } else {
        (Vec::new(), vec![0])
    };
    let mut read_buf = vec![0u8; 1 << 16];
    let mut sent = vec![0u8; stream.len().max(1 << 16)];
    // Every page written once now: first-touch page faults are not what the loop measures.
    sent.fill(1);
    let (mut row_at, mut read_at, mut sent_at) = (0, 0, 0);
    let mut out = BytesMut::with_capacity(1 << 16);
    let mut work: Box<dyn FnMut()> = match case {
        "row-stream" => Box::new(|| {
            let row = &stream[starts[row_at]..starts[row_at + 1]];
            row_at = (row_at + 1) % (starts.len() - 1);
            // Each row lands after the last in the read buffer, as a socket read fills it.
            if read_at + row.len() > read_buf.len() {
                read_at = 0;
            }
            read_buf[read_at..read_at + row.len()].copy_from_slice(row);
            mask_data_row(&plan, black_box(&read_buf[read_at..read_at + row.len()]), &mut out).unwrap();
            read_at += row.len();
            if out.len() >= 60 * 1024 {
                if sent_at + out.len() > sent.len() {
                    sent_at = 0;
                }
                sent[sent_at..sent_at + out.len()].copy_from_slice(&out);
                sent_at += out.len();
                out.clear();
            }
        }),
        "row-varied" => Box::new(|| {
            out.clear();
            next = (next + 1) % varied.len();
            mask_data_row(&plan, black_box(&varied[next]), &mut out).unwrap();
        }),
        "note5-demo" => Box::new(|| drop(black_box(detectors.scrub(black_box(&five))))),
        "row-bulk" | "row-bulk-nodict" => Box::new(|| {
            out.clear();
            mask_data_row(&plan, black_box(&row), &mut out).unwrap();
        }),
        "copy-bulk" => Box::new(|| {
            out.clear();
            phigate_native::masking::copy::mask_copy_data(&plan, black_box(line.as_bytes()), b'\t', &mut out).unwrap();
        }),
        _ => Box::new(|| drop(black_box(detectors.scrub(black_box(CLINICAL_NOTE))))),
    };
    // Warm: the pseudonym cache, the allocator.
    work();
    let t = Instant::now();
    measured_loop(&mut *work);
    println!("{case}: {:.0} ns/iteration", t.elapsed().as_nanos() as f64 / f64::from(rows()));
}
