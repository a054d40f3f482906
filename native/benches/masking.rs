//! Micro-benchmark of the layer 2 masking per DataRow and of the content detectors, with no
//! benchmark framework so it runs on stable: `cargo bench --bench masking`.

use bytes::{BufMut, BytesMut};
use phigate_native::masking::detectors::Detectors;
use phigate_native::masking::plan::{mask_data_row, Action, ColumnPlan, MaskPlan, Why};
use phigate_native::masking::values::{Format, Mask, MaskContext};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

const ROWS: u32 = 500_000;

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
    for _ in 0..ROWS {
        out.clear();
        mask_data_row(plan, black_box(body), &mut out).unwrap();
    }
    println!("{name:<48} {:>7.0} ns/row", t.elapsed().as_nanos() as f64 / f64::from(ROWS));
}

fn main() {
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
    for _ in 0..ROWS / 10 {
        out.clear();
        phigate_native::masking::copy::mask_copy_data(&bulk_plan, black_box(line.as_bytes()), b'\t', &mut out).unwrap();
    }
    println!("{:<48} {:>7.0} ns/row", "bulk-read row as a text COPY line", t.elapsed().as_nanos() as f64 / f64::from(ROWS / 10));
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
        for _ in 0..ROWS {
            black_box(d.scrub(black_box(s)));
        }
        println!("{name:<48} {:>7.0} ns/value ({} bytes)", t.elapsed().as_nanos() as f64 / f64::from(ROWS), s.len());
    }
}
