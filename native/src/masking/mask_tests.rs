//! Tests of the layer-2 masks: plans, values, dates and COPY.

use super::copy::*;
use super::dates::*;
use super::plan::*;
use super::values::*;
use crate::masking::detectors::Detectors;
use bytes::{BufMut, BytesMut};
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use crate::protocol::framing::{read_i16, read_i32};
use proptest::prelude::*;
use std::sync::OnceLock;

fn ctx() -> Arc<MaskContext> {
    static C: OnceLock<Arc<MaskContext>> = OnceLock::new();
    C.get_or_init(|| {
        let c = MaskContext::new(b"test key 0123456789abcdef0123456", Arc::new(Detectors::standard()));
        Arc::new(c.with_zip3_restricted([*b"036", *b"893"]))
    })
        .clone()
}

/// RowDescription body from (name, table oid, attnum, type oid, format).
fn row_description(cols: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(cols.len() as i16);
    for (name, t, a, ty, f) in cols {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u32(*t);
        b.put_i16(*a);
        b.put_u32(*ty);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(*f);
    }
    b.to_vec()
}

fn data_row(vals: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(vals.len() as i16);
    for v in vals {
        match v {
            None => b.put_i32(-1),
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
        }
    }
    b.to_vec()
}

/// Parses a whole DataRow message back into values, checking the framing.
fn parse_row(msg: &[u8]) -> Vec<Option<Vec<u8>>> {
    assert_eq!(msg[0], b'D');
    let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
    assert_eq!(len + 1, msg.len());
    let body = &msg[5..];
    let mut pos = 0;
    let n = read_i16(body, &mut pos).unwrap();
    let mut out = vec![];
    for _ in 0..n {
        let l = read_i32(body, &mut pos).unwrap();
        if l < 0 {
            out.push(None);
        } else {
            out.push(Some(body[pos..pos + l as usize].to_vec()));
            pos += l as usize;
        }
    }
    assert_eq!(pos, body.len());
    out
}

fn plan_of(cols: &[(u32, Format, Mask)]) -> MaskPlan {
    MaskPlan::from_columns(
        cols.iter()
            .map(|&(type_oid, format, mask)| ColumnPlan { type_oid, format, action: Action::Mask { mask, why: Why::NoOrigin } })
            .collect(),
        ctx(),
    )
}

fn mask1(type_oid: u32, format: Format, mask: Mask, v: &[u8]) -> Option<Vec<u8>> {
    let plan = plan_of(&[(type_oid, format, mask)]);
    let mut out = BytesMut::new();
    mask_data_row(&plan, &data_row(&[Some(v)]), &mut out).unwrap();
    parse_row(&out).remove(0)
}

fn rule(kind: &str, mask: Mask) -> Option<ColumnRule> {
    Some(ColumnRule { kind: kind.into(), mask })
}

#[test]
fn parses_config_spellings() {
    assert_eq!("redact".parse(), Ok(Mask::Redact));
    assert_eq!("partial:4".parse(), Ok(Mask::Partial { keep_last: 4 }));
    assert_eq!(" YEAR ".parse(), Ok(Mask::YearOnly));
    assert_eq!("email_domain".parse(), Ok(Mask::EmailDomain));
    assert_eq!("pseudonym".parse(), Ok(Mask::Pseudonym));
    assert_eq!("free_text".parse(), Ok(Mask::FreeText));
    assert_eq!("null".parse(), Ok(Mask::Null));
    assert!("partial:x".parse::<Mask>().is_err());
    assert!("partial:-1".parse::<Mask>().is_err());
    assert!("hash".parse::<Mask>().is_err());
}

#[test]
fn plan_from_row_description() {
    let protected: HashSet<u32> = [9000].into_iter().collect();
    let rd = row_description(&[
        ("id", 5000, 1, 23, 0),
        ("ssn", 5000, 2, 25, 0),
        ("expr", 0, 0, 25, 1),
        ("p", 5000, 0, 2249, 0),
        ("v_col", 9000, 3, 25, 0),
        ("note", 6000, 1, 25, 0),
        ("n", 6000, 2, 23, 0),
        ("clear_name", 6000, 3, 25, 0),
    ]);
    let lookup = |t: u32, a: i16| match (t, a) {
        (5000, 2) => rule("ssn", Mask::Partial { keep_last: 4 }).map_or(Classified::No, Classified::Masked),
        (6000, 3) => Classified::Clear,
        _ => Classified::No,
    };
    let opts = PlanOptions { touches_protected: true, protected_oids: Some(&protected), scan_text: true, ..Default::default() };
    let plan = MaskPlan::from_row_description(&rd, lookup, &opts, ctx()).unwrap();
    let acts: Vec<&Action> = plan.columns.iter().map(|c| &c.action).collect();
    assert_eq!(acts[0], &Action::Pass);
    assert_eq!(acts[1], &Action::Mask { mask: Mask::Partial { keep_last: 4 }, why: Why::Classified("ssn".into()) });
    assert_eq!(acts[2], &Action::Mask { mask: Mask::Redact, why: Why::NoOrigin });
    assert_eq!(plan.columns[2].format, Format::Binary);
    assert_eq!(acts[3], &Action::Mask { mask: Mask::Redact, why: Why::WholeRow });
    assert_eq!(acts[4], &Action::Mask { mask: Mask::Redact, why: Why::ProtectedRelation });
    assert_eq!(acts[5], &Action::Scan);
    assert_eq!(acts[6], &Action::Pass);
    assert_eq!(acts[7], &Action::Pass, "a kind seen in clear is neither masked nor scanned");
    assert!(plan.is_active());

    // A rewritten statement: computed columns are scanned (text) or passed (count(*)).
    let rd2 = row_description(&[("count", 0, 0, 20, 0), ("ssn", 0, 0, 25, 0), ("p", 5000, 0, 2249, 0), ("ssn", 5000, 2, 25, 0)]);
    let opts = PlanOptions { touches_protected: true, origin_fallback: OriginFallback::Scan, ..Default::default() };
    let plan = MaskPlan::from_row_description(&rd2, lookup, &opts, ctx()).unwrap();
    let acts: Vec<&Action> = plan.columns.iter().map(|c| &c.action).collect();
    assert_eq!(acts[..3], [&Action::Pass, &Action::Scan, &Action::Scan]);
    assert!(matches!(acts[3], Action::Mask { .. }));
    let opts = PlanOptions { touches_protected: true, origin_fallback: OriginFallback::Mask(Mask::Null), ..Default::default() };
    let plan = MaskPlan::from_row_description(&rd2, lookup, &opts, ctx()).unwrap();
    assert_eq!(plan.columns[0].action, Action::Mask { mask: Mask::Null, why: Why::NoOrigin });

    // A statement that touches nothing protected keeps expressions in clear (still scanned).
    let opts = PlanOptions { touches_protected: false, protected_oids: Some(&protected), ..Default::default() };
    let plan = MaskPlan::from_row_description(&rd, lookup, &opts, ctx()).unwrap();
    assert_eq!(plan.columns[2].action, Action::Pass);
    assert_eq!(plan.columns[4].action, Action::Pass);

    assert!(MaskPlan::from_row_description(&rd[..rd.len() - 1], lookup, &opts, ctx()).is_err());
    let mut trailing = rd.clone();
    trailing.push(0);
    assert!(MaskPlan::from_row_description(&trailing, lookup, &opts, ctx()).is_err());
}

#[test]
fn year_masks_keep_the_session_datestyle() {
    assert_eq!(DateStyle::parse("German, DMY"), DateStyle::German);
    assert_eq!(DateStyle::parse(" sql , mdy"), DateStyle::Sql);
    assert_eq!(DateStyle::parse("ISO, MDY"), DateStyle::Iso);
    assert_eq!(DateStyle::parse("nonsense"), DateStyle::Iso);
    let (d, ts) = (Ty::Date, Ty::Timestamp);
    assert_eq!(jan1_text(1981, d, DateStyle::Sql), "01/01/1981");
    assert_eq!(jan1_text(1981, ts, DateStyle::German), "01.01.1981 00:00:00");
    assert_eq!(jan1_text(1981, d, DateStyle::Postgres), "01-01-1981");
    assert_eq!(jan1_text(1981, ts, DateStyle::Postgres), "Thu Jan 01 00:00:00 1981");
    assert_eq!(jan1_text(2000, ts, DateStyle::Postgres), "Sat Jan 01 00:00:00 2000");
    assert_eq!(jan1_text(-43, d, DateStyle::German), "01.01.0044 BC");
    assert_eq!(iso_jan1(1, d), "0001-01-01");
    assert_eq!(iso_jan1(-43, ts), "0044-01-01 00:00:00 BC");
    assert_eq!(iso_jan1(9999, Ty::TimestampTz), "9999-01-01 00:00:00+00");
    assert_eq!(iso_jan1(12345, d), "12345-01-01");
    assert_eq!(iso_jan1(-12344, d), "12345-01-01 BC");
    // Idempotent in every style: the masked text parses back to the same year.
    for style in [DateStyle::Iso, DateStyle::Sql, DateStyle::German, DateStyle::Postgres] {
        for ty in [d, ts] {
            let once = jan1_text(1962, ty, style);
            let again = year_only(ty, Format::Text, style, once.as_bytes()).unwrap();
            assert_eq!(again.as_ref(), once.as_bytes(), "{style:?} {ty:?}");
        }
    }
}

#[test]
fn bind_formats_apply() {
    let mut plan = plan_of(&[(25, Format::Text, Mask::Redact), (23, Format::Text, Mask::Redact)]);
    plan.set_result_formats(&[1]).unwrap();
    assert!(plan.columns.iter().all(|c| c.format == Format::Binary));
    plan.set_result_formats(&[0, 1]).unwrap();
    assert_eq!(plan.columns[0].format, Format::Text);
    assert_eq!(plan.columns[1].format, Format::Binary);
    assert!(plan.set_result_formats(&[0, 1, 1]).is_err());
}

#[test]
fn redact_is_type_valid() {
    use Format::{Binary as B, Text as T};
    let r = Mask::Redact;
    assert_eq!(mask1(25, T, r, b"Jane Doe").unwrap(), b"***");
    assert_eq!(mask1(1043, B, r, b"Jane Doe").unwrap(), b"***");
    assert_eq!(mask1(23, T, r, b"42").unwrap(), b"0");
    assert_eq!(mask1(23, B, r, &42i32.to_be_bytes()).unwrap(), [0; 4]);
    assert_eq!(mask1(20, B, r, &42i64.to_be_bytes()).unwrap(), [0; 8]);
    assert_eq!(mask1(1700, T, r, b"12.50").unwrap(), b"0");
    assert_eq!(mask1(1700, B, r, &[0, 1, 0, 0, 0, 0, 0, 0, 0, 12]).unwrap(), [0; 8]);
    assert_eq!(mask1(16, B, r, &[1]).unwrap(), [0]);
    assert_eq!(mask1(1082, T, r, b"1984-08-17").unwrap(), b"1900-01-01");
    assert_eq!(mask1(1082, B, r, &0i32.to_be_bytes()).unwrap(), (-36524i32).to_be_bytes());
    assert_eq!(pg_days_jan1(1900), i64::from(REDACT_DAYS));
    assert_eq!(mask1(1114, T, r, b"1984-08-17 10:00:00").unwrap(), iso_jan1(1900, Ty::Timestamp).as_bytes());
    assert_eq!(mask1(1114, B, r, &[1; 8]).unwrap(), (pg_days_jan1(1900) * USECS_PER_DAY).to_be_bytes());
    assert_eq!(mask1(1184, T, r, b"1984-08-17 10:00:00+02").unwrap(), b"1900-01-01 00:00:00+00");
    assert_eq!(mask1(2950, T, r, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap(), b"00000000-0000-0000-0000-000000000000");
    assert_eq!(mask1(2950, B, r, &[7; 16]).unwrap(), [0; 16]);
    assert_eq!(mask1(114, T, r, br#"{"ssn":"123"}"#).unwrap(), br#""***""#);
    assert_eq!(mask1(3802, B, r, b"\x01{\"a\":1}").unwrap(), b"\x01\"***\"");
    assert_eq!(mask1(17, T, r, b"\\x0102").unwrap(), b"\\x");
    assert_eq!(mask1(17, B, r, &[1, 2]).unwrap(), b"");
    assert_eq!(mask1(1009, T, r, b"{a,b}").unwrap(), b"{}");
    let arr = mask1(1009, B, r, &[0, 0, 0, 1]).unwrap();
    assert_eq!(arr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25]);
    assert_eq!(mask1(2249, T, r, b"(1,123-45-6789)").unwrap(), b"***");
    assert_eq!(mask1(701, B, r, &1.5f64.to_be_bytes()).unwrap(), 0f64.to_be_bytes());
}

#[test]
fn unknown_binary_type_is_refused() {
    let plan = plan_of(&[(23, Format::Text, Mask::Redact), (2249, Format::Binary, Mask::Redact)]);
    let mut out = BytesMut::from(&b"prefix"[..]);
    let err = mask_data_row(&plan, &data_row(&[Some(b"1"), Some(b"xx")]), &mut out).unwrap_err();
    assert_eq!(err, MaskError::UnsupportedBinaryType { column: 1, type_oid: 2249 });
    let g = err.to_gate_error();
    assert!(!g.is_fatal() && g.message.contains("column 2"));
    assert!(MaskError::Malformed("x").to_gate_error().is_fatal());
    assert_eq!(&out[..], b"prefix");
    // NULL needs no placeholder.
    mask_data_row(&plan, &data_row(&[Some(b"1"), None]), &mut out).unwrap();
}

#[test]
fn nulls_and_counts() {
    let plan = plan_of(&[(25, Format::Text, Mask::Pseudonym), (25, Format::Text, Mask::Null)]);
    let mut out = BytesMut::new();
    mask_data_row(&plan, &data_row(&[None, Some(b"x")]), &mut out).unwrap();
    assert_eq!(parse_row(&out), vec![None, None]);
    for bad in [data_row(&[None]), data_row(&[None, None, None]), vec![0, 2, 0, 0, 0, 5, b'a'], vec![0]] {
        let mut out = BytesMut::new();
        assert!(matches!(mask_data_row(&plan, &bad, &mut out), Err(MaskError::Malformed(_))));
        assert!(out.is_empty());
    }
    let mut trailing = data_row(&[None, None]);
    trailing.push(9);
    assert!(mask_data_row(&plan, &trailing, &mut BytesMut::new()).is_err());
}

#[test]
fn partial_email_year() {
    use Format::{Binary as B, Text as T};
    let p4 = Mask::Partial { keep_last: 4 };
    assert_eq!(mask1(25, T, p4, b"123-45-6789").unwrap(), b"***-**-6789");
    assert_eq!(mask1(25, T, p4, b"abc").unwrap(), b"***");
    assert_eq!(mask1(25, T, p4, "Zoë Ødegård".as_bytes()).unwrap(), "*** ***gård".as_bytes());
    assert_eq!(mask1(25, T, Mask::EmailDomain, b"jane@example.org").unwrap(), b"***@example.org");
    assert_eq!(mask1(25, T, Mask::EmailDomain, b"no mail").unwrap(), b"***");
    assert_eq!(mask1(1082, T, Mask::YearOnly, b"1984-08-17").unwrap(), b"1984-01-01");
    assert_eq!(mask1(1082, T, Mask::YearOnly, b"17.08.1984").unwrap(), b"1984-01-01");
    assert_eq!(mask1(1082, T, Mask::YearOnly, b"0044-03-15 BC").unwrap(), b"0044-01-01 BC");
    assert_eq!(mask1(1082, T, Mask::YearOnly, b"infinity").unwrap(), b"infinity");
    assert_eq!(mask1(1114, T, Mask::YearOnly, b"1984-08-17 13:14:15.5").unwrap(), b"1984-01-01 00:00:00");
    let d = (days_from_civil(1984, 8, 17) - PG_EPOCH_DAYS) as i32;
    let jan1 = (days_from_civil(1984, 1, 1) - PG_EPOCH_DAYS) as i32;
    assert_eq!(mask1(1082, B, Mask::YearOnly, &d.to_be_bytes()).unwrap(), jan1.to_be_bytes());
    let ts = i64::from(d) * USECS_PER_DAY + 3_600_000_000;
    assert_eq!(mask1(1184, B, Mask::YearOnly, &ts.to_be_bytes()).unwrap(), (i64::from(jan1) * USECS_PER_DAY).to_be_bytes());
    // Before 2000 and before year 0 round-trip through the calendar arithmetic.
    for y in [-500, 1, 1899, 1900, 1999, 2000, 2024, 9999] {
        assert_eq!(year_from_days(days_from_civil(y, 7, 4)), y);
        assert_eq!(year_from_days(days_from_civil(y, 1, 1)), y);
        assert_eq!(year_from_days(days_from_civil(y, 12, 31)), y);
    }
    // Masks that do not apply to a type give its placeholder.
    assert_eq!(mask1(23, T, Mask::YearOnly, b"1984").unwrap(), b"0");
    assert_eq!(mask1(1082, T, p4, b"1984-08-17").unwrap(), b"1900-01-01");
}

#[test]
fn zip3_keeps_three_digits_and_hides_small_areas() {
    use Format::{Binary as B, Text as T};
    let z = |oid, fmt, v: &[u8]| mask1(oid, fmt, Mask::Zip3, v).unwrap();
    assert_eq!(z(25, T, b"02139"), b"021**");
    assert_eq!(z(25, T, b"02139-4307"), b"021**");
    assert_eq!(z(1043, B, b" 02139\t"), b"021**");
    // character(10) output is blank-padded; the mask's output is not.
    assert_eq!(z(1042, T, b"02139     "), b"021**");
    // Safe Harbor: a prefix on the list shows as 000.
    assert_eq!(z(25, T, b"03601"), b"000**");
    assert_eq!(z(25, T, b"89301-0001"), b"000**");
    // Already masked: unchanged (layer 1's output passes layer 2), and so is the redaction.
    for v in [&b"021**"[..], b"000**", b"***"] {
        assert_eq!(z(25, T, v), v);
    }
    assert_eq!(z(25, T, b"036**"), b"000**");
    // Not ZIP-shaped: redacted whole.
    for v in [&b"2139"[..], b"021394", b"02139-43", b"02139 4307", b"0213a", b"ZIP 02139", b"", b"\xd9\xa0\xd9\xa2\xd9\xa1\xd9\xa3\xd9\xa9", b"02\n139", b"02*39", b"0**", b"02139\x0b"] {
        assert_eq!(z(25, T, v), b"***", "{}", String::from_utf8_lossy(v));
    }
    // JSON strings are masked inside; other types get their placeholder.
    assert_eq!(z(3802, T, b"\"02139\""), b"\"021**\"");
    assert_eq!(z(3802, B, b"\x01\"02139-4307\""), b"\x01\"021**\"");
    assert_eq!(z(23, T, b"2139"), b"0");
    assert_eq!(z(23, B, &2139i32.to_be_bytes()), [0; 4]);
    assert_eq!("zip3".parse(), Ok(Mask::Zip3));
    // Without a list nothing is restricted.
    let bare = MaskContext::new(b"another key", Arc::new(Detectors::standard()));
    assert_eq!(bare.zip3("03601"), "036**");
}

#[test]
fn cached_pseudonyms_are_the_computed_ones() {
    let a = MaskContext::new(b"key one, at least 32 bytes long...", Arc::new(Detectors::standard()));
    let b = MaskContext::new(b"key two, at least 32 bytes long...", Arc::new(Detectors::standard()));
    for v in [&b"Jane"[..], b"John", b"Jane"] {
        assert_eq!(a.pseudonym(v).as_bytes(), a.compute_pseudonym(v));
        // Another context (a reload's new key) never gets the first one's cached tokens.
        assert_eq!(b.pseudonym(v).as_bytes(), b.compute_pseudonym(v));
        assert_ne!(a.pseudonym(v), b.pseudonym(v));
    }
}

#[test]
fn pseudonyms_are_stable_and_keyed() {
    let a = mask1(25, Format::Text, Mask::Pseudonym, b"Jane Doe").unwrap();
    let b = mask1(1043, Format::Binary, Mask::Pseudonym, b"Jane Doe").unwrap();
    assert_eq!(a, b);
    assert!(is_pseudonym(std::str::from_utf8(&a).unwrap()));
    assert_ne!(a, mask1(25, Format::Text, Mask::Pseudonym, b"Jane Doe ").unwrap());
    let other = MaskContext::new(b"another key", Arc::new(Detectors::standard()));
    assert_ne!(other.pseudonym(b"Jane Doe").into_bytes(), a);
    // Non-text types: the type's placeholder.
    assert_eq!(mask1(23, Format::Binary, Mask::Pseudonym, &7i32.to_be_bytes()).unwrap(), [0; 4]);
    let j = mask1(3802, Format::Binary, Mask::Pseudonym, b"\x01\"Jane Doe\"").unwrap();
    assert_eq!(j, [&[1u8][..], b"\"", &a, b"\""].concat());
    let obj = mask1(114, Format::Text, Mask::Pseudonym, br#"{"name":"Jane"}"#).unwrap();
    assert!(obj.starts_with(b"\"psn_"));
}

#[test]
fn free_text_and_scan() {
    let note = b"Pt SSN 123-45-6789, call 555-123-4567.";
    assert_eq!(mask1(25, Format::Text, Mask::FreeText, note).unwrap(), b"Pt SSN [SSN], call [PHONE].");
    // JSON stays valid or becomes the placeholder.
    let j = mask1(114, Format::Text, Mask::FreeText, br#"{"ssn":"123-45-6789"}"#).unwrap();
    assert_eq!(j, br#"{"ssn":"[SSN]"}"#);
    let j = mask1(114, Format::Text, Mask::FreeText, br#"{"phone":5551234567, "x": 555-123-4567}"#).unwrap();
    assert_eq!(j, br#""***""#);

    let plan = MaskPlan::from_columns(
        vec![
            ColumnPlan { type_oid: 25, format: Format::Text, action: Action::Scan },
            ColumnPlan { type_oid: 1009, format: Format::Text, action: Action::Scan },
            ColumnPlan { type_oid: 23, format: Format::Text, action: Action::Pass },
        ],
        ctx(),
    );
    let mut out = BytesMut::new();
    mask_data_row(&plan, &data_row(&[Some(note), Some(b"{jane@example.org}"), Some(b"7")]), &mut out).unwrap();
    let row = parse_row(&out);
    assert_eq!(row[0].as_deref(), Some(&b"Pt SSN [SSN], call [PHONE]."[..]));
    assert_eq!(row[1].as_deref(), Some(&b"{}"[..]));
    assert_eq!(row[2].as_deref(), Some(&b"7"[..]));
    // No hit: the same bytes.
    let mut out2 = BytesMut::new();
    let clean = data_row(&[Some(b"fine"), Some(b"{a}"), Some(b"7")]);
    mask_data_row(&plan, &clean, &mut out2).unwrap();
    assert_eq!(&out2[5..], &clean[..]);
}

#[test]
fn names_from_the_dictionary_in_scanned_text_json_and_copy() {
    use crate::masking::dictionary::Kind;
    let set = crate::masking::dictionary_set::test_set(&[(Kind::Name, "Daniel Harris"), (Kind::Address, "12 Elm Street")]);
    let ctx = Arc::new(MaskContext::new(b"test key 0123456789abcdef0123456", Arc::new(Detectors::standard().with_dictionaries(set))));
    let plan = MaskPlan::from_columns(
        vec![
            ColumnPlan { type_oid: 25, format: Format::Text, action: Action::Scan },
            ColumnPlan { type_oid: 3802, format: Format::Text, action: Action::Scan },
            ColumnPlan { type_oid: 114, format: Format::Text, action: Action::Mask { mask: Mask::FreeText, why: Why::NoOrigin } },
        ],
        ctx,
    );
    let note: &[u8] = b"seen with HARRIS, Daniel";
    let jsonb: &[u8] = br#"{"contact": "Daniel Harris", "home": "12 Elm Street"}"#;
    let json: &[u8] = br#"["daniel", 12]"#;
    let mut out = BytesMut::new();
    mask_data_row(&plan, &data_row(&[Some(note), Some(jsonb), Some(json)]), &mut out).unwrap();
    let row = parse_row(&out);
    assert_eq!(row[0].as_deref(), Some(&b"seen with [NAME], [NAME]"[..]));
    assert_eq!(row[1].as_deref(), Some(&br#"{"contact": "[NAME]", "home": "[ADDRESS]"}"#[..]));
    assert_eq!(row[2].as_deref(), Some(&br#"["[NAME]", 12]"#[..]));
    // The same columns as a text COPY line.
    let mut out = BytesMut::new();
    mask_copy_data(&plan, b"Daniel Harris\\tat home\t{\"a\": \"harris\"}\t\\N\n", b'\t', &mut out).unwrap();
    assert_eq!(&out[5..], &b"[NAME]\\tat home\t{\"a\": \"[NAME]\"}\t\\N\n"[..]);
}

#[test]
fn copy_text_rows() {
    let plan = MaskPlan::from_columns(
        vec![
            ColumnPlan { type_oid: 23, format: Format::Binary, action: Action::Pass },
            ColumnPlan { type_oid: 25, format: Format::Text, action: Action::Mask { mask: Mask::Partial { keep_last: 4 }, why: Why::NoOrigin } },
            ColumnPlan { type_oid: 25, format: Format::Text, action: Action::Scan },
            ColumnPlan { type_oid: 1082, format: Format::Binary, action: Action::Mask { mask: Mask::YearOnly, why: Why::NoOrigin } },
        ],
        ctx(),
    );
    let data = b"1\t123-45-6789\tline\\none\\tSSN 123-45-6789 a\\\\b\t1984-08-17\n2\t\\N\t\\N\t\\N\n";
    let mut out = BytesMut::new();
    mask_copy_data(&plan, data, b'\t', &mut out).unwrap();
    assert_eq!(out[0], b'd');
    assert_eq!(u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize + 1, out.len());
    assert_eq!(
        &out[5..],
        &b"1\t***-**-6789\tline\\none\\tSSN [SSN] a\\\\b\t1984-01-01\n2\t\\N\t\\N\t\\N\n"[..]
    );
    // Masking the masked output changes nothing.
    let mut again = BytesMut::new();
    mask_copy_data(&plan, &out[5..], b'\t', &mut again).unwrap();
    assert_eq!(again, out);
    // Wrong column count, escaped delimiters counted right.
    assert!(mask_copy_data(&plan, b"1\t2\n", b'\t', &mut BytesMut::new()).is_err());
    let plan2 = plan_of(&[(25, Format::Text, Mask::Redact), (25, Format::Text, Mask::Pseudonym)]);
    let mut o = BytesMut::new();
    mask_copy_data(&plan2, b"a,b\\,c|x\\tz", b'|', &mut o).unwrap();
    let expect = format!("***|{}", ctx().pseudonym(b"x\tz"));
    assert_eq!(&o[5..], expect.as_bytes());
    assert_eq!(copy_unescape(b"\\101\\x41\\q\\"), b"AAq\\");
}

#[test]
fn rewrite_outputs_pass_unchanged() {
    // What layer 1's mask expressions produce must survive layer 2 byte for byte.
    use Format::Text as T;
    let cases: [(u32, Mask, &[u8]); 10] = [
        (25, Mask::Zip3, b"021**"),
        (1043, Mask::Zip3, b"000**"),
        (25, Mask::Partial { keep_last: 4 }, b"***6789"),
        (25, Mask::Partial { keep_last: 4 }, b"***ab"),
        (25, Mask::EmailDomain, b"***@example.org"),
        (25, Mask::Pseudonym, b"psn_0123456789abcdef"),
        (1082, Mask::YearOnly, b"1984-01-01"),
        (25, Mask::FreeText, b"seen [DATE], [SSN], call [PHONE], [MRN], [EMAIL]"),
        (25, Mask::Redact, b"***"),
        (1009, Mask::Redact, b"{}"),
    ];
    for (oid, m, v) in cases {
        assert_eq!(mask1(oid, T, m, v).unwrap(), v, "{m:?} {}", String::from_utf8_lossy(v));
    }
}

#[test]
fn copy_out_response() {
    assert_eq!(copy_out_columns(&[0, 0, 2, 0, 0, 0, 0]), Ok(2));
    assert_eq!(copy_out_columns(&[1, 0, 1, 0, 1]), Err(MaskError::UnsupportedCopyFormat));
    assert!(copy_out_columns(&[0, 0, 2, 0, 0]).is_err());
    assert!(copy_out_columns(&[]).is_err());
}

fn types() -> impl Strategy<Value = (u32, Format)> {
    let oids = prop::sample::select(vec![25u32, 1043, 1042, 19, 18, 114, 3802, 17, 16, 21, 23, 20, 700, 701, 1700, 1082, 1114, 1184, 2950, 1009, 1186]);
    (oids, prop::bool::ANY.prop_map(|b| if b { Format::Binary } else { Format::Text }))
}

fn masks() -> impl Strategy<Value = Mask> {
    prop_oneof![
        Just(Mask::Redact),
        Just(Mask::Null),
        (0usize..6).prop_map(|keep_last| Mask::Partial { keep_last }),
        Just(Mask::YearOnly),
        Just(Mask::EmailDomain),
        Just(Mask::Pseudonym),
        Just(Mask::FreeText),
        Just(Mask::Zip3),
    ]
}

/// A plausible clear value of the type in the format.
fn value_for(oid: u32, fmt: Format, seed: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(seed).into_owned();
    match (oid, fmt) {
        (114, _) | (3802, Format::Text) => serde_json::to_string(&s).unwrap().into_bytes(),
        (3802, Format::Binary) => [&[1u8][..], serde_json::to_string(&s).unwrap().as_bytes()].concat(),
        (1082, Format::Binary) => (seed.len() as i32 * 997 - 20_000).to_be_bytes().to_vec(),
        (1114 | 1184, Format::Binary) => (seed.len() as i64 * 86_399_999_999 - 1_000_000_000_000).to_be_bytes().to_vec(),
        (1082, Format::Text) => format!("{:04}-0{}-1{}", 1000 + seed.len() * 37, 1 + seed.len() % 9, seed.len() % 9).into_bytes(),
        (18, _) => seed.iter().take(1).copied().collect(),
        _ if fmt == Format::Binary && ![25, 1043, 1042, 19].contains(&oid) => seed.to_vec(),
        _ => s.into_bytes(),
    }
}

proptest! {
    /// The byte-by-byte partial mask of ASCII text is the char-by-char one, borrowed when that
    /// one is.
    #[test]
    fn partial_of_ascii_is_the_char_by_char_mask(s in "[ -~]{0,24}", keep_last in 0usize..10) {
        let (fast, chars) = (partial_ascii(&s, keep_last), partial_chars(&s, keep_last));
        prop_assert_eq!(&fast, &chars);
        prop_assert_eq!(matches!(fast, Cow::Borrowed(_)), matches!(chars, Cow::Borrowed(_)));
    }

    #[test]
    fn masking_is_idempotent_and_keeps_shape(
        cols in prop::collection::vec((types(), masks(), prop::option::of(prop::collection::vec(any::<u8>(), 0..40))), 1..12),
    ) {
        let plan = plan_of(&cols.iter().map(|((t, f), m, _)| (*t, *f, *m)).collect::<Vec<_>>());
        let values: Vec<Option<Vec<u8>>> = cols.iter().map(|((t, f), _, v)| v.as_ref().map(|v| value_for(*t, *f, v))).collect();
        let row = data_row(&values.iter().map(|v| v.as_deref()).collect::<Vec<_>>());
        let mut once = BytesMut::new();
        mask_data_row(&plan, &row, &mut once).unwrap();
        let parsed = parse_row(&once);
        prop_assert_eq!(parsed.len(), cols.len());
        for (p, v) in parsed.iter().zip(&values) {
            if v.is_none() { prop_assert!(p.is_none()); }
        }
        let mut twice = BytesMut::new();
        mask_data_row(&plan, &once[5..], &mut twice).unwrap();
        prop_assert_eq!(&twice[..], &once[..]);
    }

    #[test]
    fn texty_masks_are_valid_utf8_and_hide_ssns(ssn in "[0-9]{3}-[0-9]{2}-[0-9]{4}", pre in "[a-z ]{0,10}", m in masks()) {
        let v = format!("{pre}{ssn}");
        if let Some(out) = mask1(25, Format::Text, m, v.as_bytes()) {
            let s = String::from_utf8(out).unwrap();
            prop_assert!(!s.contains(&ssn));
        }
        for oid in [114u32, 3802] {
            let j = serde_json::to_string(&v).unwrap();
            if let Some(out) = mask1(oid, Format::Text, m, j.as_bytes()) {
                prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok());
                prop_assert!(!String::from_utf8_lossy(&out).contains(&ssn));
            }
        }
    }

    #[test]
    fn copy_escape_round_trips(v in prop::collection::vec(any::<u8>(), 0..60)) {
        let mut out = BytesMut::new();
        copy_escape(&v, b'\t', &mut out);
        prop_assert_eq!(split_copy_fields(&out, b'\t').len(), 1);
        prop_assert_eq!(copy_unescape(&out), v);
    }
}

#[test]
fn values_become_text_borrowed_when_valid() {
    assert!(matches!(utf8_text(b"BP 164/82"), Cow::Borrowed("BP 164/82")));
    assert!(matches!(utf8_text("Zoë Ødegård".as_bytes()), Cow::Borrowed("Zoë Ødegård")));
    assert_eq!(utf8_text(b"ab\xffc"), "ab\u{fffd}c");
}
