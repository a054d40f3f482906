//! The decision cache: decisions keyed by (identity class, exact statement text) and, when the
//! control plane says a decision does not depend on literal values, by normalized text too.
//! An epoch the control plane bumps (reload) invalidates everything at once.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Beyond this many entries the cache is cleared (simple, bounded memory).
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny { sqlstate: String, message: String, hint: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    None,
    Exact,
    Normalized,
}

/// A notice the client gets right before the result of an allowed statement (what a masked
/// result hides, say), as the control plane decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Sent at most once per session under this key; None: sent with every result.
    pub key: Option<Arc<str>>,
    /// The whole NoticeResponse message, built once.
    pub message: bytes::Bytes,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub action: Action,
    pub reuse: Reuse,
    /// PHI-free statement form for events.
    pub normalized: Option<Arc<str>>,
    /// The statement to send upstream instead of the client's (PHI masking rewrite).
    pub rewritten: Option<bytes::Bytes>,
    /// The statement reads a protected relation (layer 2 treats its computed columns as PHI).
    pub protected: bool,
    /// A plain read the control plane left to layer 2: the only table OIDs its columns may
    /// come from (any other origin is redacted).
    pub origins: Option<Arc<[u32]>>,
    /// A text COPY of such a read: (table OID, attnum, type OID) of each output column, which
    /// COPY's own messages do not carry.
    pub copy_columns: Option<Arc<[(u32, i16, u32)]>>,
    /// Notices for the client before the statement's result (None: none).
    pub notices: Option<Arc<[Notice]>>,
    /// `[phi.subjects]` relations the statement reads ("schema.table"): rows of its results
    /// that do not show their key are possibly any of their subjects.
    pub subject_relations: Option<Arc<[Arc<str>]>>,
    /// What the statement record says of it besides the decision (shared by every statement
    /// the decision is reused for: none of it depends on literal values).
    pub facts: Arc<AuditFacts>,
    /// The SQL-level cursor a DECLARE, FETCH, MOVE or CLOSE works on (name as PostgreSQL
    /// folds it) and the operation ("declare", "fetch", "move", "close"): max_rows counts
    /// FETCH rows across the cursor's life.
    pub cursor: Option<(Arc<str>, Arc<str>)>,
    /// The statement needs a person's approval at each execution: the control plane's
    /// `approval` object, passed back verbatim when the data plane asks (never read here).
    pub approval: Option<Arc<serde_json::Value>>,
}

/// The control plane's facts about a statement for its audit record, each already rendered as
/// canonical JSON (the hot path copies the bytes). Names only, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFacts {
    /// "select", "insert", "ddl", "copy_to", …, or "multiple" (a string or null).
    pub kind: Box<[u8]>,
    /// The rule that decided: "role:analyst allow select", "default deny", … (a string or null).
    pub rule: Box<[u8]>,
    /// "schema.table" names read or written (an array).
    pub relations: Box<[u8]>,
    /// "schema.table.column" names read / written (arrays).
    pub columns_read: Box<[u8]>,
    pub columns_written: Box<[u8]>,
    /// `{"by": "rewrite"|"layer2"|null, "columns": {"schema.table.column": "mask"}}`.
    pub masking: Box<[u8]>,
}

/// Names a decision's facts may list at most (a statement naming more is still judged; its
/// record lists the first ones).
const MAX_FACT_NAMES: usize = 1024;

impl Default for AuditFacts {
    fn default() -> Self {
        let b = |s: &str| Box::from(s.as_bytes());
        AuditFacts { kind: b("null"), rule: b("null"), relations: b("[]"), columns_read: b("[]"), columns_written: b("[]"),
            masking: b(r#"{"by":null,"columns":{}}"#) }
    }
}

impl AuditFacts {
    /// The facts of a decision answer's `audit` object; None (the decision is refused) when
    /// one is malformed. serde_json's map keeps keys sorted, so rendering is canonical.
    pub fn from_answer(a: &serde_json::Value) -> Option<Self> {
        use serde_json::Value;
        let render = |v: &Value| serde_json::to_vec(v).ok().map(Vec::into_boxed_slice);
        let text_or_null = |k: &str| -> Option<Box<[u8]>> {
            match a.get(k) {
                None | Some(Value::Null) => Some(Box::from(&b"null"[..])),
                Some(v @ Value::String(_)) => render(v),
                Some(_) => None,
            }
        };
        let names = |k: &str| -> Option<Box<[u8]>> {
            match a.get(k) {
                None | Some(Value::Null) => Some(Box::from(&b"[]"[..])),
                Some(Value::Array(list)) if list.iter().all(Value::is_string) => {
                    render(&Value::Array(list.iter().take(MAX_FACT_NAMES).cloned().collect()))
                }
                Some(_) => None,
            }
        };
        let masking = match a.get("masking") {
            None | Some(Value::Null) => AuditFacts::default().masking,
            Some(Value::Object(m)) => {
                let by = match m.get("by") {
                    None | Some(Value::Null) => Value::Null,
                    Some(Value::String(s)) if s == "rewrite" || s == "layer2" => Value::String(s.clone()),
                    Some(_) => return None,
                };
                let columns = match m.get("columns") {
                    None | Some(Value::Null) => serde_json::Map::new(),
                    Some(Value::Object(c)) if c.values().all(Value::is_string) => c.iter().take(MAX_FACT_NAMES).map(|(k, v)| (k.clone(), v.clone())).collect(),
                    Some(_) => return None,
                };
                render(&serde_json::json!({"by": by, "columns": columns}))?
            }
            Some(_) => return None,
        };
        Some(AuditFacts {
            kind: text_or_null("kind")?,
            rule: text_or_null("rule")?,
            relations: names("relations")?,
            columns_read: names("columns_read")?,
            columns_written: names("columns_written")?,
            masking,
        })
    }

    /// Bytes of all facts (to size a record's buffer).
    pub fn len(&self) -> usize {
        self.kind.len() + self.rule.len() + self.relations.len() + self.columns_read.len() + self.columns_written.len() + self.masking.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per identity class, then per text: nested so a lookup borrows the class and the statement
/// text instead of allocating a key per statement (this is on every statement's path).
type ByClass<K> = HashMap<Arc<str>, HashMap<K, Arc<Decision>>>;

#[derive(Default)]
struct Maps {
    epoch: u64,
    exact: ByClass<Box<[u8]>>,
    normalized: ByClass<Box<str>>,
    /// Entries in `exact` and `normalized`, for the size bound.
    entries: usize,
}

pub struct DecisionCache {
    maps: RwLock<Maps>,
    epoch: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl Default for DecisionCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DecisionCache {
    pub fn new() -> Self {
        DecisionCache { maps: RwLock::new(Maps { epoch: 1, ..Default::default() }), epoch: AtomicU64::new(1), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Invalidates every entry; returns the new epoch.
    pub fn bump_epoch(&self) -> u64 {
        let mut m = self.maps.write();
        let e = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        m.exact.clear();
        m.normalized.clear();
        m.entries = 0;
        m.epoch = e;
        e
    }

    pub fn len(&self) -> usize {
        self.maps.read().entries
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks up by exact text, then by normalized text (computed lazily, only on an exact miss).
    /// Returns the decision and the normalized text if it was computed (to reuse on insert).
    pub fn lookup(&self, class: &Arc<str>, sql: &[u8]) -> (Option<Arc<Decision>>, Option<String>) {
        let m = self.maps.read();
        if let Some(d) = m.exact.get(&**class).and_then(|by_text| by_text.get(sql)) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return (Some(d.clone()), None);
        }
        let norm = crate::normalize::normalize(sql);
        if let Some(n) = &norm {
            if let Some(d) = m.normalized.get(&**class).and_then(|by_text| by_text.get(n.as_str())) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return (Some(d.clone()), norm);
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        (None, norm)
    }

    /// Stores a decision made under `epoch` (ignored if the epoch moved on meanwhile).
    pub fn insert(&self, epoch: u64, class: &Arc<str>, sql: &[u8], norm: Option<String>, d: Arc<Decision>) {
        if d.reuse == Reuse::None {
            return;
        }
        let mut m = self.maps.write();
        if m.epoch != epoch {
            return;
        }
        if m.entries >= MAX_ENTRIES {
            m.exact.clear();
            m.normalized.clear();
            m.entries = 0;
        }
        let added = match (d.reuse, norm) {
            (Reuse::Normalized, Some(n)) => {
                m.normalized.entry(class.clone()).or_default().insert(n.into_boxed_str(), d).is_none()
            }
            _ => m.exact.entry(class.clone()).or_default().insert(sql.into(), d).is_none(),
        };
        m.entries += usize::from(added);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(reuse: Reuse) -> Arc<Decision> {
        Arc::new(Decision { action: Action::Allow, reuse, normalized: None, rewritten: None, protected: false, origins: None, copy_columns: None, notices: None, subject_relations: None, facts: Default::default(), cursor: None, approval: None })
    }

    #[test]
    fn exact_and_normalized_reuse() {
        let c = DecisionCache::new();
        let class: Arc<str> = "clinicians".into();
        let e = c.epoch();
        let (d, n) = c.lookup(&class, b"select * from t where id = 1");
        assert!(d.is_none());
        c.insert(e, &class, b"select * from t where id = 1", n, allow(Reuse::Normalized));
        assert!(c.lookup(&class, b"select * from t where id = 2").0.is_some());
        assert!(c.lookup(&class, b"select * from u where id = 2").0.is_none());
        let other: Arc<str> = "billing".into();
        assert!(c.lookup(&other, b"select * from t where id = 2").0.is_none());
    }

    #[test]
    fn exact_only_does_not_generalize_and_epoch_invalidates() {
        let c = DecisionCache::new();
        let class: Arc<str> = "a".into();
        let e = c.epoch();
        c.insert(e, &class, b"select 1", None, allow(Reuse::Exact));
        assert!(c.lookup(&class, b"select 1").0.is_some());
        assert!(c.lookup(&class, b"select 2").0.is_none());
        c.bump_epoch();
        assert!(c.lookup(&class, b"select 1").0.is_none());
        // A decision made under the old epoch is not stored after the bump.
        c.insert(e, &class, b"select 1", None, allow(Reuse::Exact));
        assert!(c.lookup(&class, b"select 1").0.is_none());
    }
}
