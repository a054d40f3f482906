//! The engine-wide identifier dictionaries, one per target, swapped atomically: every
//! `Detectors` (so every masking state, before and after a catalog reload) reads the same set.

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::masking::dictionary::Dictionary;

/// One version of the set: target name → dictionary, in name order (so scans are repeatable).
pub type Dictionaries = BTreeMap<String, Arc<Dictionary>>;

#[derive(Default)]
pub struct DictionarySet {
    current: ArcSwap<Dictionaries>,
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
        self.current.store(Arc::new(m));
        self.any.store(any, Ordering::Relaxed);
    }
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
}
