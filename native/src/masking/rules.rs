//! What the data plane needs to verify masking (layer 2): per target, the classified columns by
//! (table OID, attnum) from the control plane's catalog; the pseudonym key; the compiled content
//! detectors. Replaced whole on every catalog load or reload (`Engine::set_masking`); the
//! identifier dictionaries are the engine's and outlive it.

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::masking::detectors::{DetectorConfig, Detectors};
use crate::masking::dictionary_set::DictionarySet;
use crate::masking::values::{ColumnRule, Mask, MaskContext};

/// The classification of one target, as the catalog resolved it.
#[derive(Default)]
pub struct TargetRules {
    /// (table OID, attnum) → rule. Partitions, children and views have their own entries.
    pub rules: HashMap<(u32, i16), ColumnRule>,
    /// Relations whose columns cannot be mapped to rules (views the catalog marks "refuse"):
    /// any output column originating there is protected.
    pub protected_oids: HashSet<u32>,
}

/// Everything layer 2 uses, for every target. Sessions read the current one per result.
pub struct MaskingState {
    pub ctx: Arc<MaskContext>,
    pub targets: HashMap<String, TargetRules>,
}

impl MaskingState {
    /// Before the control plane has sent anything: built-in detectors, a random pseudonym key
    /// (no pseudonym can be configured without a key file, so none is ever shown), no rules.
    pub fn initial(dictionaries: Arc<DictionarySet>) -> Self {
        let key: [u8; 32] = rand::random();
        let detectors = Detectors::standard().with_dictionaries(dictionaries);
        MaskingState { ctx: Arc::new(MaskContext::new(&key, Arc::new(detectors))), targets: HashMap::new() }
    }

    /// The state the control plane sent; its detectors scan with the engine's `dictionaries`.
    pub fn from_json(s: &str, dictionaries: Arc<DictionarySet>) -> Result<Self, String> {
        let doc: MaskingDoc = serde_json::from_str(s).map_err(|e| format!("masking state: {e}"))?;
        let key = match &doc.pseudonym_key_hex {
            Some(h) => hex_decode(h).ok_or("masking state: pseudonym_key_hex is not hex")?,
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        if key.is_empty() {
            return Err("masking state: the pseudonym key is empty".into());
        }
        let detectors = Detectors::new(&DetectorConfig {
            mrn_pattern: doc.mrn_pattern,
            extra: doc.extra_patterns.into_iter().collect(),
            ssn_valid_only: false,
        })
        .map_err(|e| format!("masking state: a detector pattern does not compile: {e}"))?
        .with_dictionaries(dictionaries);
        let mut zip3_restricted = Vec::new();
        for p in doc.zip3_restricted.iter().flatten() {
            match p.as_bytes() {
                &[a, b, c] if [a, b, c].iter().all(u8::is_ascii_digit) => zip3_restricted.push([a, b, c]),
                _ => return Err(format!("masking state: zip3_restricted: {p:?} is not a 3-digit ZIP prefix")),
            }
        }
        let mut targets = HashMap::new();
        for (name, t) in doc.targets {
            let mut rules = HashMap::with_capacity(t.rules.len());
            for (oid, attnum, kind, mask) in t.rules {
                let mask: Mask = mask.parse().map_err(|e| format!("masking state: targets.{name}: {e}"))?;
                // Without the list a restricted prefix would be shown: refuse the state.
                if mask == Mask::Zip3 && doc.zip3_restricted.is_none() {
                    return Err(format!("masking state: targets.{name} uses zip3 but zip3_restricted is missing"));
                }
                rules.insert((oid, attnum), ColumnRule { kind: kind.into(), mask });
            }
            targets.insert(name, TargetRules { rules, protected_oids: t.protected_oids.into_iter().collect() });
        }
        let ctx = MaskContext::new(&key, Arc::new(detectors)).with_zip3_restricted(zip3_restricted);
        Ok(MaskingState { ctx: Arc::new(ctx), targets })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaskingDoc {
    #[serde(default)]
    pseudonym_key_hex: Option<String>,
    #[serde(default)]
    mrn_pattern: Option<String>,
    #[serde(default)]
    extra_patterns: BTreeMap<String, String>,
    #[serde(default)]
    targets: BTreeMap<String, TargetDoc>,
    /// 3-digit ZIP prefixes zip3 shows as "000**"; required when a rule uses zip3.
    #[serde(default)]
    zip3_restricted: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetDoc {
    /// [table OID, attnum, kind, mask spelling ("partial:4", "pseudonym", ...)]
    #[serde(default)]
    rules: Vec<(u32, i16, String, String)>,
    #[serde(default)]
    protected_oids: Vec<u32>,
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules_and_rejects_bad_input() {
        let s = MaskingState::from_json(
            r#"{"pseudonym_key_hex":"00ff","mrn_pattern":"H[0-9]{6}","extra_patterns":{"NHS":"NHS[0-9]{10}"},
                "targets":{"ehr":{"rules":[[16384,2,"ssn","partial:4"],[16384,3,"name","pseudonym"]],"protected_oids":[17000]}}}"#,
            Arc::default(),
        )
        .unwrap();
        let t = &s.targets["ehr"];
        assert_eq!(t.rules[&(16384, 2)].mask, Mask::Partial { keep_last: 4 });
        assert_eq!(&*t.rules[&(16384, 3)].kind, "name");
        assert!(t.protected_oids.contains(&17000));
        assert_eq!(s.ctx.detectors.scrub("see H123456 and NHS0123456789"), "see [MRN] and [NHS]");
        assert!(MaskingState::from_json(r#"{"pseudonym_key_hex":"zz"}"#, Arc::default()).is_err());
        assert!(MaskingState::from_json(r#"{"targets":{"ehr":{"rules":[[1,1,"ssn","scramble"]]}}}"#, Arc::default()).is_err());
        assert!(MaskingState::from_json(r#"{"mrn_pattern":"("}"#, Arc::default()).is_err());
        assert!(MaskingState::from_json(r#"{"surprise":1}"#, Arc::default()).is_err());
    }

    #[test]
    fn zip3_list_comes_with_the_state() {
        let s = MaskingState::from_json(
            r#"{"zip3_restricted":["036","893"],"targets":{"ehr":{"rules":[[16384,7,"zip","zip3"]]}}}"#,
            Arc::default(),
        )
        .unwrap();
        assert_eq!(s.targets["ehr"].rules[&(16384, 7)].mask, Mask::Zip3);
        assert_eq!(s.ctx.zip3("03601"), "000**");
        assert_eq!(s.ctx.zip3("89301-1234"), "000**");
        assert_eq!(s.ctx.zip3("02139"), "021**");
        // A zip3 rule without the list, or a malformed entry, is refused: fail closed.
        assert!(MaskingState::from_json(r#"{"targets":{"ehr":{"rules":[[1,1,"zip","zip3"]]}}}"#, Arc::default()).is_err());
        assert!(MaskingState::from_json(r#"{"zip3_restricted":["36"]}"#, Arc::default()).is_err());
        assert!(MaskingState::from_json(r#"{"zip3_restricted":["03a"]}"#, Arc::default()).is_err());
        assert!(MaskingState::from_json(r#"{"zip3_restricted":["٠٣٦"]}"#, Arc::default()).is_err());
    }
}
