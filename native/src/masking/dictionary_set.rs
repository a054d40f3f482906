//! The engine-wide identifier dictionaries, one per target, swapped atomically: every
//! `Detectors` (so every masking state, before and after a catalog reload) reads the same set.
//!
//! A scan reads one dictionary, whatever the number of targets: with two or more, their
//! entries merged into one (they share the process's keys, so a value hashes alike in each).
//! Scanning each target's dictionary in turn walked every text once per target, so a second
//! target (a replica, or a pooler in front of the same database) doubled the cost of masking
//! free text.

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::masking::dictionary::{Dictionary, DictionaryBuilder};

/// One version of the set: target name → dictionary, in name order (so scans are repeatable).
pub type Dictionaries = BTreeMap<String, Arc<Dictionary>>;

#[derive(Default)]
pub struct DictionarySet {
    current: ArcSwap<Dictionaries>,
    /// What a scan reads: none, the one dictionary, or all of them merged (each apart only if
    /// they could not be merged).
    scanned: ArcSwap<Vec<Arc<Dictionary>>>,
    /// Whether any dictionary has an entry: the per-value fast path reads only this.
    any: AtomicBool,
    /// Serializes writers (read, change, store); readers never wait.
    writer: Mutex<()>,
}

impl DictionarySet {
    /// The dictionaries now; cheap, lock-free, hold it for one scan.
    pub fn load(&self) -> Guard<Arc<Dictionaries>> {
        self.current.load()
    }

    /// The dictionaries a scan reads (one, when there is any): cheap, lock-free, hold it for
    /// one scan.
    pub fn scanned(&self) -> Guard<Arc<Vec<Arc<Dictionary>>>> {
        self.scanned.load()
    }

    /// True when some dictionary may hit (false is exact: then no scan is needed).
    #[inline]
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    pub fn get(&self, target: &str) -> Option<Arc<Dictionary>> {
        self.current.load().get(target).cloned()
    }

    /// Replaces `target`'s dictionary (adds it if there was none).
    pub fn set(&self, target: &str, d: Arc<Dictionary>) {
        self.update(|m| {
            m.insert(target.to_string(), d);
        });
    }

    /// Replaces `target`'s dictionary with `change(current)`, with no other writer in between
    /// (an extension cannot lose a concurrent one). An error leaves the set as it was.
    pub fn replace_with<E>(&self, target: &str, change: impl FnOnce(Option<&Arc<Dictionary>>) -> Result<Dictionary, E>) -> Result<Arc<Dictionary>, E> {
        let _w = self.writer.lock();
        let mut m = Dictionaries::clone(&self.current.load());
        let d = Arc::new(change(m.get(target))?);
        m.insert(target.to_string(), d.clone());
        self.store(m);
        Ok(d)
    }

    /// Removes `target`'s dictionary; false if it had none.
    pub fn remove(&self, target: &str) -> bool {
        let mut removed = false;
        self.update(|m| removed = m.remove(target).is_some());
        removed
    }

    /// (target, entries, bytes) of every dictionary: counts only, never a value.
    pub fn stats(&self) -> Vec<(String, usize, usize)> {
        self.current.load().iter().map(|(t, d)| (t.clone(), d.len(), d.memory_bytes())).collect()
    }

    fn update(&self, change: impl FnOnce(&mut Dictionaries)) {
        let _w = self.writer.lock();
        let mut m = Dictionaries::clone(&self.current.load());
        change(&mut m);
        self.store(m);
    }

    fn store(&self, m: Dictionaries) {
        let any = m.values().any(|d| !d.is_empty());
        let scanned = merged(&m);
        self.current.store(Arc::new(m));
        self.scanned.store(Arc::new(scanned));
        self.any.store(any, Ordering::Relaxed);
    }

    /// The bytes of the merged dictionary a scan reads beside the targets' own (0 with one
    /// target: it is read as it is).
    pub fn merged_bytes(&self) -> usize {
        let current = self.current.load();
        self.scanned.load().iter().filter(|d| !current.values().any(|t| Arc::ptr_eq(t, d))).map(|d| d.memory_bytes()).sum()
    }
}

/// The dictionaries a scan of `m` reads: the non-empty ones, merged into one when there are
/// several (in target order: an entry of two targets keeps the first target's kind).
fn merged(m: &Dictionaries) -> Vec<Arc<Dictionary>> {
    let full: Vec<&Arc<Dictionary>> = m.values().filter(|d| !d.is_empty()).collect();
    if full.len() < 2 {
        return full.into_iter().cloned().collect();
    }
    let mut all = DictionaryBuilder::from(&**full[0]);
    for d in &full[1..] {
        if all.absorb_frozen(d).is_none() {
            // Not under the same keys (not built by this process's builders): each apart.
            return full.into_iter().cloned().collect();
        }
    }
    vec![Arc::new(all.freeze())]
}

/// A set with one dictionary ("ehr") of these values, for tests elsewhere.
#[cfg(test)]
pub(crate) fn test_set(values: &[(crate::masking::dictionary::Kind, &str)]) -> Arc<DictionarySet> {
    let mut b = crate::masking::dictionary::DictionaryBuilder::new(["the", "and", "of"], 2);
    for (kind, v) in values {
        b.add(*kind, v);
    }
    let set = Arc::new(DictionarySet::default());
    set.set("ehr", Arc::new(b.freeze()));
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masking::dictionary::{DictionaryBuilder, Kind};

    fn dict(values: &[&str]) -> Arc<Dictionary> {
        let mut b = DictionaryBuilder::new([], 2);
        for v in values {
            b.add(Kind::Name, v);
        }
        Arc::new(b.freeze())
    }

    #[test]
    fn set_replace_remove() {
        let s = DictionarySet::default();
        assert!(!s.any() && s.load().is_empty());
        s.set("ehr", dict(&[]));
        assert!(!s.any(), "an empty dictionary cannot hit");
        s.set("ehr", dict(&["Harris"]));
        assert!(s.any());
        let before = s.load();
        s.set("lab", dict(&["Okafor"]));
        assert_eq!(before.len(), 1, "a loaded version does not change under its reader");
        assert_eq!(s.stats().iter().map(|(t, n, _)| (t.as_str(), *n)).collect::<Vec<_>>(), [("ehr", 1), ("lab", 1)]);
        let r: Result<_, ()> = s.replace_with("ehr", |cur| {
            let mut b = DictionaryBuilder::from(&**cur.unwrap());
            b.add(Kind::Name, "Nguyen");
            Ok(b.freeze())
        });
        assert_eq!(r.unwrap().len(), 2);
        assert!(s.replace_with("ehr", |_| Err("no")).is_err());
        assert_eq!(s.get("ehr").unwrap().len(), 2, "a failed change leaves the set alone");
        assert!(s.remove("ehr") && s.remove("lab") && !s.remove("lab"));
        assert!(!s.any());
    }

    /// The hits of scanning `text` with what the set's scans read.
    fn tagged(s: &DictionarySet, text: &str) -> String {
        let mut hits = Vec::new();
        for d in s.scanned().iter() {
            d.scan_between(text, &[], &mut hits);
        }
        crate::masking::detectors::Detectors::replace(text, &hits).into_owned()
    }

    #[test]
    fn a_scan_reads_one_dictionary_for_all_targets() {
        let s = DictionarySet::default();
        assert!(s.scanned().is_empty());
        let ehr = dict(&["Harris", "Olga Petrova"]);
        s.set("ehr", ehr.clone());
        assert!(Arc::ptr_eq(&s.scanned()[0], &ehr), "one target: its dictionary as it is");
        assert_eq!(s.merged_bytes(), 0);
        s.set("replica", dict(&["Harris", "Olga Petrova"]));
        s.set("lab", dict(&["Okafor"]));
        s.set("empty", dict(&[]));
        assert_eq!(s.scanned().len(), 1, "three targets with entries: one merged dictionary");
        assert_eq!(s.scanned()[0].len(), ehr.len() + 1, "the replica's same values counted once");
        assert!(s.merged_bytes() > 0);
        assert_eq!(tagged(&s, "Olga Petrova and Okafor, then Harris"), "[NAME] and [NAME], then [NAME]");
        s.set("lab", dict(&["Nguyen"]));
        assert_eq!(tagged(&s, "Okafor and Nguyen"), "Okafor and [NAME]", "a replaced target's old values are gone");
        assert!(s.remove("ehr") && s.remove("replica"));
        assert_eq!(tagged(&s, "Harris and Nguyen"), "Harris and [NAME]");
        assert_eq!(s.scanned().len(), 1);
    }
}
