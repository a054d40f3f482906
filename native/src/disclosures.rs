//! Accounting of disclosures (HIPAA §164.528): for every result sent to an identity, the keyed
//! hashes of the subject keys (the person identifiers) in the rows it carried, and how many rows
//! of subject relations left without their key ("possibly any subject of relation R").
//!
//! The control plane names the subject relations per target (`Engine.set_subjects`); every
//! result's RowDescription is turned into a `ResultPlan` once (which output columns are subject
//! keys, which relations appear without theirs), each DataRow then costs one HMAC per key column
//! and a hash-set insert, and the cycle's `Tally` becomes a small canonical JSON fragment of the
//! result record. Pure data-plane code: no PyO3, no I/O.

use arc_swap::ArcSwap;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;

use crate::protocol::framing::{read_cstr, read_i16, read_i32};

/// One relation whose rows describe a person, resolved against a target's catalog.
#[derive(Debug, Clone)]
pub struct SubjectRelation {
    pub oid: u32,
    /// The column holding the person's identifier (every subject key names the same persons).
    pub key_attnum: i16,
    /// "schema.table" as configured.
    pub name: Arc<str>,
    /// Column names by attnum, from the catalog (never the client's aliases).
    pub columns: HashMap<i16, Arc<str>>,
}

/// A target's subject relations: by table OID (what RowDescriptions carry) and by name (what
/// decisions carry). A configured relation the catalog could not resolve is only in `names`.
#[derive(Debug, Default)]
pub struct SubjectMap {
    by_oid: HashMap<u32, SubjectRelation>,
    names: HashSet<Arc<str>>,
}

impl SubjectMap {
    pub fn new(relations: Vec<SubjectRelation>, configured: impl IntoIterator<Item = Arc<str>>) -> Self {
        let mut names: HashSet<Arc<str>> = configured.into_iter().collect();
        names.extend(relations.iter().map(|r| r.name.clone()));
        SubjectMap { by_oid: relations.into_iter().map(|r| (r.oid, r)).collect(), names }
    }

    pub fn relation(&self, oid: u32) -> Option<&SubjectRelation> {
        self.by_oid.get(&oid)
    }

    pub fn is_subject(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// Every target's subject map, replaced whole and read lock-free at each RowDescription.
#[derive(Default)]
pub struct Subjects {
    targets: ArcSwap<HashMap<String, Arc<SubjectMap>>>,
}

impl Subjects {
    /// Puts a target's map in force (None: the target has no subject relations).
    pub fn set(&self, target: &str, map: Option<Arc<SubjectMap>>) {
        self.targets.rcu(|old| {
            let mut next = HashMap::clone(old);
            match &map {
                Some(m) => next.insert(target.to_string(), m.clone()),
                None => next.remove(target),
            };
            next
        });
    }

    /// The target's map; None when `[phi.subjects]` names nothing on it.
    pub fn get(&self, target: &str) -> Option<Arc<SubjectMap>> {
        self.targets.load().get(target).cloned()
    }
}

/// The audit HMAC key subject keys are hashed with ("h:" + 32 hex of HMAC-SHA256).
pub struct SubjectKey(ring::hmac::Key);

impl SubjectKey {
    pub fn new(raw: &[u8]) -> Self {
        SubjectKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, raw))
    }

    /// The first 16 bytes of the tag: kept as a number, written as 32 hex digits.
    pub fn hash(&self, value: &[u8]) -> u128 {
        let tag = ring::hmac::sign(&self.0, value);
        let mut first = [0u8; 16];
        first.copy_from_slice(&tag.as_ref()[..16]);
        u128::from_be_bytes(first)
    }
}

/// How a key column's value reads as the text its hash is taken over (text and binary results
/// of the same value must hash alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyRead {
    /// Text format, or a binary format whose bytes are the text (text, varchar, bpchar, name).
    Text,
    Int2,
    Int4,
    Int8,
    Uuid,
    /// A binary value of another type: cannot be hashed like its text, counted as possible.
    Unreadable,
}

impl KeyRead {
    fn of(format: i16, type_oid: u32) -> Self {
        match (format, type_oid) {
            (0, _) => KeyRead::Text,
            (_, 25 | 1043 | 1042 | 19) => KeyRead::Text,
            (_, 21) => KeyRead::Int2,
            (_, 23) => KeyRead::Int4,
            (_, 20) => KeyRead::Int8,
            (_, 2950) => KeyRead::Uuid,
            _ => KeyRead::Unreadable,
        }
    }
}

#[derive(Debug)]
struct KeyColumn {
    index: usize,
    slot: usize,
    read: KeyRead,
}

/// A subject relation some output column comes from.
#[derive(Debug)]
struct Slot {
    name: Arc<str>,
    clear: BTreeSet<Arc<str>>,
    masked: BTreeSet<Arc<str>>,
    /// The key column is in the output (some rows may still lack a readable key).
    keyed: bool,
}

/// What one result's RowDescription says about subjects; built once per result.
#[derive(Debug, Default)]
pub struct ResultPlan {
    keys: Vec<KeyColumn>,
    slots: Vec<Slot>,
    /// Subject relations this result's rows come from (or that the statement read) without a
    /// key column in the output: each row is possibly any of their subjects.
    possible: BTreeSet<Arc<str>>,
    columns: usize,
}

impl ResultPlan {
    /// `masked(oid, attnum)`: whether the identity gets that column masked (layer 2).
    /// `read`: the subject relations the statement reads (the decision's `subject_relations`).
    /// None when the RowDescription is malformed (the caller fails closed as for masking).
    pub fn from_row_description(
        body: &[u8],
        map: &SubjectMap,
        masked: impl Fn(u32, i16) -> bool,
        read: Option<&[Arc<str>]>,
    ) -> Option<ResultPlan> {
        let mut pos = 0;
        let n = read_i16(body, &mut pos).filter(|n| *n >= 0)? as usize;
        let mut plan = ResultPlan { columns: n, ..ResultPlan::default() };
        for index in 0..n {
            read_cstr(body, &mut pos)?;
            let table = read_i32(body, &mut pos)? as u32;
            let attnum = read_i16(body, &mut pos)?;
            let type_oid = read_i32(body, &mut pos)? as u32;
            read_i16(body, &mut pos)?;
            read_i32(body, &mut pos)?;
            let format = read_i16(body, &mut pos)?;
            if table == 0 {
                continue; // computed: covered by the relations the statement read, below
            }
            let Some(rel) = map.relation(table) else { continue };
            let slot = match plan.slots.iter().position(|s| *s.name == *rel.name) {
                Some(s) => s,
                None => {
                    plan.slots.push(Slot { name: rel.name.clone(), clear: BTreeSet::new(), masked: BTreeSet::new(), keyed: false });
                    plan.slots.len() - 1
                }
            };
            let name = rel.columns.get(&attnum).cloned().unwrap_or_else(|| Arc::from(if attnum == 0 { "(whole row)" } else { "(unknown column)" }));
            let s = &mut plan.slots[slot];
            if masked(table, attnum) {
                s.masked.insert(name);
            } else {
                s.clear.insert(name);
            }
            if attnum == rel.key_attnum {
                s.keyed = true;
                plan.keys.push(KeyColumn { index, slot, read: KeyRead::of(format, type_oid) });
            }
        }
        for s in &plan.slots {
            if !s.keyed {
                plan.possible.insert(s.name.clone());
            }
        }
        // A relation the statement read whose key is not in the output: computed columns
        // (table OID 0, e.g. a key masked by the rewrite) or filters may carry its subjects.
        for r in read.unwrap_or_default() {
            if !plan.slots.iter().any(|s| s.keyed && *s.name == **r) {
                plan.possible.insert(r.clone());
            }
        }
        Some(plan)
    }

    /// Nothing to record for this result's rows.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.possible.is_empty()
    }

    /// Whether its DataRows must be read (some column is a subject key).
    pub fn reads_keys(&self) -> bool {
        !self.keys.is_empty()
    }
}

#[derive(Debug, Default)]
struct Disclosed {
    hashes: HashSet<u128>,
    /// Rows whose key was not kept in `hashes` (past the cap, unreadable or NULL keys).
    more: u64,
    clear: BTreeSet<Arc<str>>,
    masked: BTreeSet<Arc<str>>,
}

/// What one cycle (Query or Sync) sent, accumulated over its results.
#[derive(Debug, Default)]
pub struct Tally {
    disclosed: BTreeMap<Arc<str>, Disclosed>,
    possible: BTreeMap<Arc<str>, u64>,
    /// The last value hashed per key position, with how it was read and its hash: rows sorted
    /// or joined by person repeat it, and an HMAC costs far more than a comparison. The buffer
    /// is reused, so this allocates only when a key is longer than any before.
    memo: Vec<(KeyRead, Vec<u8>, u128)>,
}

impl Tally {
    /// A result with this plan starts: its relations' columns are recorded.
    pub fn begin(&mut self, plan: &ResultPlan) {
        for s in plan.slots.iter().filter(|s| s.keyed) {
            let d = self.disclosed.entry(s.name.clone()).or_default();
            d.clear.extend(s.clear.iter().cloned());
            d.masked.extend(s.masked.iter().cloned());
        }
    }

    /// One DataRow (body without the 5-byte header), before any masking. `cap`: distinct
    /// hashes kept per relation and cycle; rows past it are counted in `more`.
    pub fn row(&mut self, plan: &ResultPlan, key: &SubjectKey, body: &[u8], cap: usize) {
        for r in &plan.possible {
            match self.possible.get_mut(r) {
                Some(n) => *n += 1,
                None => {
                    self.possible.insert(r.clone(), 1);
                }
            }
        }
        if plan.keys.is_empty() {
            return;
        }
        let mut pos = 2;
        let mut next = 0;
        for index in 0..plan.columns {
            let len = match read_i32(body, &mut pos) {
                Some(l) => l,
                None => return self.unreadable(plan, next),
            };
            let value = if len < 0 {
                None
            } else {
                let v = body.get(pos..pos + len as usize);
                pos += len as usize;
                if v.is_none() {
                    return self.unreadable(plan, next);
                }
                v
            };
            let Some(k) = plan.keys.get(next).filter(|k| k.index == index) else { continue };
            let position = next;
            next += 1;
            let name = &plan.slots[k.slot].name;
            let d = match self.disclosed.get_mut(name) {
                Some(d) => d,
                None => self.disclosed.entry(name.clone()).or_default(),
            };
            // Past the cap a row is counted without hashing it: the person may be in the list
            // already (the record says so for the listed ones), or among the counted.
            let hashed = match value {
                Some(v) if d.hashes.len() < cap => memo_hash(&mut self.memo, position, key, k.read, v),
                _ => None,
            };
            match hashed {
                Some(h) => {
                    d.hashes.insert(h);
                }
                None => d.more += 1,
            }
            if next == plan.keys.len() {
                return;
            }
        }
    }

    /// A row cut short: its remaining key columns count as rows not individually recorded.
    fn unreadable(&mut self, plan: &ResultPlan, from: usize) {
        for k in &plan.keys[from..] {
            self.disclosed.entry(plan.slots[k.slot].name.clone()).or_default().more += 1;
        }
    }

    /// Rows of a result that carries no RowDescription of its own (COPY out): each is possibly
    /// any subject of the relations the statement read.
    pub fn copy_row(&mut self, read: &[Arc<str>]) {
        for r in read {
            *self.possible.entry(r.clone()).or_default() += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.disclosed.is_empty() && self.possible.is_empty()
    }

    /// The statement's disclosures as two canonical JSON objects (keys sorted, integers only):
    /// `possible` ({"rel": rows}) and `subjects` ({"rel": {"clear","h","masked","more"}}), for
    /// the result record to place at their keys; and starts over for the next statement. None
    /// when nothing was sent.
    pub fn take(&mut self) -> Option<Disclosures> {
        // A relation whose result had no rows disclosed nobody.
        self.disclosed.retain(|_, d| !d.hashes.is_empty() || d.more > 0);
        if self.is_empty() {
            return None;
        }
        let mut possible = Vec::new();
        let mut subjects = Vec::new();
        self.write_possible(&mut possible);
        self.write_subjects(&mut subjects);
        self.disclosed.clear();
        self.possible.clear();
        Some(Disclosures { possible, subjects })
    }

    /// `{"rel":rows,…}`
    fn write_possible(&self, o: &mut Vec<u8>) {
        o.push(b'{');
        for (i, (r, n)) in self.possible.iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            json_str(o, r);
            let _ = write!(o, ":{n}");
        }
        o.push(b'}');
    }

    /// `{"rel":{"clear":[…],"h":[…],"masked":[…],"more":n},…}`
    fn write_subjects(&self, o: &mut Vec<u8>) {
        o.push(b'{');
        for (i, (r, d)) in self.disclosed.iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            json_str(o, r);
            o.extend_from_slice(b":{\"clear\":");
            json_list(o, d.clear.iter().map(|s| &**s));
            o.extend_from_slice(b",\"h\":[");
            let mut hashes: Vec<u128> = d.hashes.iter().copied().collect();
            hashes.sort_unstable();
            for (j, h) in hashes.iter().enumerate() {
                if j > 0 {
                    o.push(b',');
                }
                let _ = write!(o, "\"h:{h:032x}\"");
            }
            o.extend_from_slice(b"],\"masked\":");
            json_list(o, d.masked.iter().map(|s| &**s));
            let _ = write!(o, ",\"more\":{}}}", d.more);
        }
        o.push(b'}');
    }
}

/// One statement's disclosures, rendered: the values of the result record's `possible` and
/// `subjects` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disclosures {
    pub possible: Vec<u8>,
    pub subjects: Vec<u8>,
}

/// `hash_value`, remembered per key position for the next row.
fn memo_hash(memo: &mut Vec<(KeyRead, Vec<u8>, u128)>, position: usize, key: &SubjectKey, read: KeyRead, v: &[u8]) -> Option<u128> {
    if let Some((r, bytes, h)) = memo.get(position) {
        if *r == read && bytes.as_slice() == v {
            return Some(*h);
        }
    }
    let h = hash_value(key, read, v)?;
    if memo.len() <= position {
        memo.resize_with(position + 1, || (KeyRead::Unreadable, Vec::new(), 0));
    }
    let slot = &mut memo[position];
    slot.0 = read;
    slot.1.clear();
    slot.1.extend_from_slice(v);
    slot.2 = h;
    Some(h)
}

/// The key value's text form hashed: text bytes as they are, binary integers and UUIDs as the
/// text PostgreSQL would have sent. None for a binary value that cannot be read so.
fn hash_value(key: &SubjectKey, read: KeyRead, v: &[u8]) -> Option<u128> {
    let mut buf = [0u8; 40];
    let text: &[u8] = match read {
        KeyRead::Text => v,
        KeyRead::Int2 => int_text(&mut buf, i64::from(i16::from_be_bytes(v.try_into().ok()?))),
        KeyRead::Int4 => int_text(&mut buf, i64::from(i32::from_be_bytes(v.try_into().ok()?))),
        KeyRead::Int8 => int_text(&mut buf, i64::from_be_bytes(v.try_into().ok()?)),
        KeyRead::Uuid => {
            let b: &[u8; 16] = v.try_into().ok()?;
            let mut c = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(c, "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                u32::from_be_bytes(b[0..4].try_into().ok()?), u16::from_be_bytes([b[4], b[5]]),
                u16::from_be_bytes([b[6], b[7]]), u16::from_be_bytes([b[8], b[9]]),
                u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]));
            &buf[..36]
        }
        KeyRead::Unreadable => return None,
    };
    Some(key.hash(text))
}

fn int_text(buf: &mut [u8; 40], n: i64) -> &[u8] {
    let mut c = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(c, "{n}");
    let end = c.position() as usize;
    &buf[..end]
}

fn json_str(o: &mut Vec<u8>, s: &str) {
    // serde_json escapes like the trail's canonical form (and Python's json.dumps).
    let _ = serde_json::to_writer(&mut *o, s);
}

fn json_list<'a>(o: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    o.push(b'[');
    for (i, s) in items.enumerate() {
        if i > 0 {
            o.push(b',');
        }
        json_str(o, s);
    }
    o.push(b']');
}

/// `"h:"` and 32 hex digits: what the trail and `phigate audit hash` show for a value.
pub fn hash_label(key: &SubjectKey, value: &[u8]) -> String {
    format!("h:{:032x}", key.hash(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    const PATIENTS: u32 = 500;
    const ENCOUNTERS: u32 = 600;

    fn map() -> SubjectMap {
        let cols = |names: &[&str]| names.iter().enumerate().map(|(i, n)| (i as i16 + 1, Arc::from(*n))).collect();
        SubjectMap::new(
            vec![
                SubjectRelation { oid: PATIENTS, key_attnum: 1, name: "public.patients".into(), columns: cols(&["id", "name", "ssn"]) },
                SubjectRelation { oid: ENCOUNTERS, key_attnum: 2, name: "public.encounters".into(), columns: cols(&["id", "patient_id", "reason"]) },
            ],
            [Arc::from("public.notes")],
        )
    }

    /// RowDescription of (table, attnum, type, format) columns.
    fn rd(cols: &[(u32, i16, u32, i16)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(cols.len() as i16);
        for &(t, a, ty, f) in cols {
            b.put_slice(b"c\0");
            b.put_u32(t);
            b.put_i16(a);
            b.put_u32(ty);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(f);
        }
        b.to_vec()
    }

    fn row(vals: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(vals.len() as i16);
        for v in vals {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.to_vec()
    }

    fn fragment(t: &mut Tally) -> serde_json::Value {
        let d = t.take().expect("something was disclosed");
        let mut v = serde_json::Map::new();
        for (k, bytes) in [("possible", d.possible), ("subjects", d.subjects)] {
            let text = String::from_utf8(bytes).unwrap();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            // Canonical: re-serializing with sorted keys gives the same bytes.
            assert_eq!(serde_json::to_string(&value).unwrap(), text);
            v.insert(k.into(), value);
        }
        serde_json::Value::Object(v)
    }

    #[test]
    fn keys_are_hashed_and_columns_split_clear_and_masked() {
        let key = SubjectKey::new(&[9; 32]);
        let plan = ResultPlan::from_row_description(&rd(&[(PATIENTS, 1, 23, 0), (PATIENTS, 3, 25, 0), (0, 0, 25, 0)]), &map(),
            |t, a| t == PATIENTS && a == 3, None).unwrap();
        let mut t = Tally::default();
        t.begin(&plan);
        t.row(&plan, &key, &row(&[Some(b"123"), Some(b"123-45-6789"), Some(b"x")]), 1000);
        t.row(&plan, &key, &row(&[Some(b"123"), Some(b"123-45-6789"), Some(b"x")]), 1000);
        let v = fragment(&mut t);
        let p = &v["subjects"]["public.patients"];
        assert_eq!(p["h"], serde_json::json!([hash_label(&key, b"123")]));
        assert_eq!((p["clear"].clone(), p["masked"].clone(), p["more"].as_u64()), (serde_json::json!(["id"]), serde_json::json!(["ssn"]), Some(0)));
        assert_eq!(v["possible"], serde_json::json!({}));
        assert!(t.is_empty(), "a new cycle starts empty");
    }

    #[test]
    fn binary_integers_and_uuids_hash_like_their_text() {
        let key = SubjectKey::new(&[1; 32]);
        for (ty, bytes, text) in [
            (23u32, 123i32.to_be_bytes().to_vec(), "123"),
            (20, (-7i64).to_be_bytes().to_vec(), "-7"),
            (21, 5i16.to_be_bytes().to_vec(), "5"),
            (2950, (0..16).collect::<Vec<u8>>(), "00010203-0405-0607-0809-0a0b0c0d0e0f"),
            (25, b"abc".to_vec(), "abc"),
        ] {
            let plan = ResultPlan::from_row_description(&rd(&[(PATIENTS, 1, ty, 1)]), &map(), |_, _| false, None).unwrap();
            let mut t = Tally::default();
            t.begin(&plan);
            t.row(&plan, &key, &row(&[Some(&bytes)]), 10);
            assert_eq!(fragment(&mut t)["subjects"]["public.patients"]["h"][0], hash_label(&key, text.as_bytes()), "{ty}");
        }
        // A binary numeric cannot be read as its text: counted, never dropped.
        let plan = ResultPlan::from_row_description(&rd(&[(PATIENTS, 1, 1700, 1)]), &map(), |_, _| false, None).unwrap();
        let mut t = Tally::default();
        t.row(&plan, &key, &row(&[Some(b"\0\x01")]), 10);
        assert_eq!(fragment(&mut t)["subjects"]["public.patients"]["more"], 1);
    }

    #[test]
    fn a_repeated_key_is_hashed_once_and_the_memo_follows_the_read() {
        let key = SubjectKey::new(&[6; 32]);
        let text = ResultPlan::from_row_description(&rd(&[(PATIENTS, 1, 25, 0)]), &map(), |_, _| false, None).unwrap();
        let binary = ResultPlan::from_row_description(&rd(&[(PATIENTS, 1, 23, 1)]), &map(), |_, _| false, None).unwrap();
        let mut t = Tally::default();
        // The same four bytes: "1234" as text, then as a binary int4 (825373492).
        t.row(&text, &key, &row(&[Some(b"1234")]), 10);
        t.row(&text, &key, &row(&[Some(b"1234")]), 10);
        t.row(&binary, &key, &row(&[Some(b"1234")]), 10);
        let h = &fragment(&mut t)["subjects"]["public.patients"]["h"];
        let mut want = vec![hash_label(&key, b"1234"), hash_label(&key, b"825373492")];
        want.sort();
        assert_eq!(h, &serde_json::json!(want));
    }

    #[test]
    fn past_the_cap_rows_are_counted() {
        let key = SubjectKey::new(&[2; 32]);
        let plan = ResultPlan::from_row_description(&rd(&[(ENCOUNTERS, 2, 23, 0)]), &map(), |_, _| false, None).unwrap();
        let mut t = Tally::default();
        for i in 0..10 {
            t.row(&plan, &key, &row(&[Some(i.to_string().as_bytes())]), 4);
        }
        t.row(&plan, &key, &row(&[Some(b"0")]), 4); // past the cap: counted, even if listed
        t.row(&plan, &key, &row(&[None]), 4);
        let v = fragment(&mut t);
        let e = &v["subjects"]["public.encounters"];
        assert_eq!((e["h"].as_array().unwrap().len(), e["more"].as_u64()), (4, Some(8)));
        let mut listed: Vec<String> = (0..4).map(|i| hash_label(&key, i.to_string().as_bytes())).collect();
        listed.sort();
        assert_eq!(e["h"], serde_json::json!(listed), "the first distinct keys are the listed ones");
    }

    #[test]
    fn relations_without_their_key_are_possible_disclosures() {
        let key = SubjectKey::new(&[3; 32]);
        // encounters.reason without patient_id; a computed column (table 0); the statement also
        // read public.notes (by the decision) and public.patients, whose key is not shown.
        let read: Vec<Arc<str>> = vec!["public.notes".into(), "public.patients".into()];
        let plan = ResultPlan::from_row_description(&rd(&[(ENCOUNTERS, 3, 25, 0), (0, 0, 25, 0)]), &map(), |_, _| false, Some(&read)).unwrap();
        let mut t = Tally::default();
        t.begin(&plan);
        for _ in 0..3 {
            t.row(&plan, &key, &row(&[Some(b"flu"), Some(b"x")]), 10);
        }
        let v = fragment(&mut t);
        assert_eq!(v["possible"], serde_json::json!({"public.encounters": 3, "public.notes": 3, "public.patients": 3}));
        assert_eq!(v["subjects"], serde_json::json!({}));
        // Nothing about subjects: nothing appended.
        let plan = ResultPlan::from_row_description(&rd(&[(700, 1, 25, 0)]), &map(), |_, _| false, None).unwrap();
        assert!(plan.is_empty());
        assert_eq!(Tally::default().take(), None);
    }

    #[test]
    fn malformed_descriptions_and_short_rows_do_not_panic() {
        assert!(ResultPlan::from_row_description(&[0, 1, b'c'], &map(), |_, _| false, None).is_none());
        let key = SubjectKey::new(&[4; 32]);
        let plan = ResultPlan::from_row_description(&rd(&[(PATIENTS, 1, 23, 0)]), &map(), |_, _| false, None).unwrap();
        let mut t = Tally::default();
        t.row(&plan, &key, &[0, 1, 0, 0, 0, 9, b'1'], 10);
        assert_eq!(fragment(&mut t)["subjects"]["public.patients"]["more"], 1);
    }
}
