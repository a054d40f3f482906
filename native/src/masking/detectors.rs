//! Content detectors for PHI in free text (SSN, MRN, phone, email, dates of birth, configured
//! patterns), compiled once and run over text going to masked identities.
//!
//! Matching uses the `regex` crate, so every scan is linear in the input whatever the pattern.
//! Values without a hit are the common case and take the fast path: a byte prefilter, then one
//! `RegexSet` pass; the per-pattern searches only run for the patterns the set says matched.
//!
//! The identifier dictionaries (names, streets, towns from the database) run after the
//! patterns, in the text the patterns left: see `hits`.

use regex::{Regex, RegexSet};
use std::borrow::Cow;
use std::sync::Arc;

use crate::masking::dictionary::{tag_spans, TAGS};
use crate::masking::dictionary_set::DictionarySet;

/// Default medical record number shape when the config names none.
/// "MRN" in any case, optional separators, then at least 4 digits: "MRN-0012345", "mrn: 12345",
/// "MRN 0012345" (the demo's notes write them all ways). The same rule as layer 1's free text.
pub const DEFAULT_MRN_PATTERN: &str = r"(?i)mrn[-: #]*[0-9]{4,}";

// Digit-shaped identifiers are bounded by "no digit on either side", checked after the match
// (the regex crate has no look-around): a word boundary would miss "pt123-45-6789".
// Elsewhere ASCII word boundaries: the Unicode `\b` forces the slower engines on non-ASCII text.
const SSN: &str = r"[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}";
const PHONE: &str = r"(?:\+?1[-. ]?)?(?:\([0-9]{3}\)[-. ]?|[0-9]{3}[-. ])[0-9]{3}[-. ][0-9]{4}";
const EMAIL: &str = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}(?-u:\b)";
/// A birth keyword, then up to 40 characters without digits ("within a few words"), then a date.
/// Only the date (group `date`) is replaced, so the text stays readable: "DOB: [DOB]".
const DOB: &str = concat!(
    r"(?i)(?-u:\b)(?:dob|d\.o\.b|date\s+of\s+birth|birth\s*date|birthday|born)",
    r"[^0-9\n]{0,40}?(?P<date>",
    r"[0-9]{1,2}[/.\-][0-9]{1,2}[/.\-][0-9]{2,4}",
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}",
    r"|(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+[0-9]{1,2}(?:st|nd|rd|th)?,?\s+[0-9]{4}",
    r"|[0-9]{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?,?\s+[0-9]{4}",
    r")(?-u:\b)",
);

/// What the detectors look for beyond the built-in kinds.
#[derive(Debug, Clone, Default)]
pub struct DetectorConfig {
    /// MRN pattern from the config; `DEFAULT_MRN_PATTERN` when None.
    pub mrn_pattern: Option<String>,
    /// Extra (tag, pattern) pairs; a hit is replaced by `[TAG]`.
    pub extra: Vec<(String, String)>,
    /// Skip SSN-shaped numbers in ranges never issued (area 000, 666, 9xx; group 00; serial 0000).
    /// Off by default: test data and canaries are often "invalid" SSNs, and masking a false
    /// positive costs less than leaking a real one.
    pub ssn_valid_only: bool,
}

struct Rule {
    /// Replacement text, e.g. "[SSN]" (built-in tags are static: a hit copies no string).
    tag: Cow<'static, str>,
    re: Regex,
    /// Replace this capture group only (0 = the whole match).
    group: usize,
    /// Post-filter on (haystack, match start, match end): look-around the regex crate lacks.
    accept: Option<Accept>,
}

/// One detected identifier: byte range in the input and its replacement tag (static for the
/// built-in patterns and the dictionaries, so that a hit allocates nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub start: usize,
    pub end: usize,
    pub tag: Cow<'static, str>,
}

/// The compiled detectors. Build once per configuration and share (it is `Send + Sync`).
pub struct Detectors {
    set: RegexSet,
    rules: Vec<Rule>,
    /// The configured patterns (a configured MRN pattern, extra patterns) as their own set with
    /// their indexes in `rules`: they run when the built-in prefilter rules the built-ins out.
    configured: Option<(RegexSet, Vec<usize>)>,
    /// The engine's identifier dictionaries (empty unless `with_dictionaries`).
    dictionaries: Arc<DictionarySet>,
    /// Every tag a scrub can write: walls for the dictionaries, so tags are never words.
    tags: Vec<String>,
}

type Accept = fn(&str, usize, usize) -> bool;

/// Rules before this index are the built-in ones (SSN, MRN, phone, email, date of birth).
const BUILT_IN: usize = 5;

/// False when no built-in pattern can match: each needs one of
/// - three digits, then '-', '.' or ' ', then two digits (every SSN and phone shape),
/// - an '@' (email),
/// - "mrn" in any case (the default MRN pattern),
/// - a birth keyword, ASCII case-insensitively: "dob", "d.o.b", "birth" (date of birth,
///   birth date, birthday) or "born" (none has a letter with a non-ASCII case fold).
fn builtin_may_match(b: &[u8]) -> bool {
    crate::masking::prefilter::may_match(b)
}

/// `builtin_may_match` one byte at a time: the reference the SIMD version is tested against,
/// and what runs on targets without it.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
pub(crate) fn builtin_may_match_scalar(b: &[u8]) -> bool {
    let n = b.len();
    let mut i = 0;
    while i < n {
        // Most bytes are letters and punctuation no pattern starts with: a tight skip loop.
        while i < n && !INTERESTING[b[i] as usize] {
            i += 1;
        }
        if i == n {
            return false;
        }
        let c = b[i];
        if c.is_ascii_digit() {
            let start = i;
            while i < n && b[i].is_ascii_digit() {
                i += 1;
            }
            if i - start >= 3
                && i + 2 < n
                && matches!(b[i], b'-' | b'.' | b' ')
                && b[i + 1].is_ascii_digit()
                && b[i + 2].is_ascii_digit()
            {
                return true;
            }
            continue;
        }
        let at = |from: usize, w: &[u8]| n - from >= w.len() && b[from..from + w.len()].eq_ignore_ascii_case(w);
        let found = match c {
            b'@' => true,
            b'm' | b'M' => at(i, b"mrn"),
            // Every birth keyword has a 'b': "birth", "born", and the last letter of "dob"
            // and "d.o.b".
            _ => at(i, b"birth") || at(i, b"born") || (i >= 2 && at(i - 2, b"dob")) || (i >= 4 && at(i - 4, b"d.o.b")),
        };
        if found {
            return true;
        }
        i += 1;
    }
    false
}

/// Bytes `builtin_may_match` stops at: digits, '@', and 'b' and 'm' in either case.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
static INTERESTING: [bool; 256] = {
    let mut t = [false; 256];
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] = true;
        d += 1;
    }
    let bytes = b"@bBmM";
    let mut k = 0;
    while k < bytes.len() {
        t[bytes[k] as usize] = true;
        k += 1;
    }
    t
};

fn digit_bounded(text: &str, start: usize, end: usize) -> bool {
    let b = text.as_bytes();
    let before = start.checked_sub(1).and_then(|i| b.get(i));
    !before.is_some_and(u8::is_ascii_digit) && !b.get(end).is_some_and(u8::is_ascii_digit)
}

fn ssn_issued(text: &str, start: usize, end: usize) -> bool {
    if !digit_bounded(text, start, end) {
        return false;
    }
    let d: Vec<u8> = text[start..end].bytes().filter(u8::is_ascii_digit).collect();
    let area = &d[0..3];
    area != b"000" && area != b"666" && area[0] != b'9' && &d[3..5] != b"00" && &d[5..9] != b"0000"
}

impl Detectors {
    /// Compiles the built-in detectors plus the configured ones. Fails on an invalid pattern.
    pub fn new(cfg: &DetectorConfig) -> Result<Self, regex::Error> {
        let mut rules = vec![
            Rule { tag: Cow::Borrowed("[SSN]"), re: Regex::new(SSN)?, group: 0, accept: Some(if cfg.ssn_valid_only { ssn_issued } else { digit_bounded }) },
            Rule {
                tag: Cow::Borrowed("[MRN]"),
                re: Regex::new(cfg.mrn_pattern.as_deref().unwrap_or(DEFAULT_MRN_PATTERN))?,
                group: 0,
                accept: cfg.mrn_pattern.is_none().then_some(digit_bounded as Accept),
            },
            Rule { tag: Cow::Borrowed("[PHONE]"), re: Regex::new(PHONE)?, group: 0, accept: Some(digit_bounded) },
            Rule { tag: Cow::Borrowed("[EMAIL]"), re: Regex::new(EMAIL)?, group: 0, accept: None },
            Rule { tag: Cow::Borrowed("[DOB]"), re: Regex::new(DOB)?, group: 1, accept: None },
        ];
        for (tag, pat) in &cfg.extra {
            let tag = tag.trim_matches(|c| c == '[' || c == ']').to_ascii_uppercase();
            rules.push(Rule { tag: Cow::Owned(format!("[{tag}]")), re: Regex::new(pat)?, group: 0, accept: None });
        }
        let set = RegexSet::new(rules.iter().map(|r| r.re.as_str()))?;
        let configured: Vec<usize> =
            (0..rules.len()).filter(|&i| (i == 1 && cfg.mrn_pattern.is_some()) || i >= BUILT_IN).collect();
        let configured = if configured.is_empty() {
            None
        } else {
            Some((RegexSet::new(configured.iter().map(|&i| rules[i].re.as_str()))?, configured))
        };
        let mut tags: Vec<String> = rules.iter().map(|r| r.tag.to_string()).chain(TAGS.iter().map(|t| t.to_string())).collect();
        tags.sort();
        tags.dedup();
        Ok(Detectors { set, rules, configured, dictionaries: Arc::default(), tags })
    }

    /// These detectors with the engine's identifier dictionaries (read at every scan, so a
    /// dictionary swapped in later applies at once).
    pub fn with_dictionaries(mut self, dictionaries: Arc<DictionarySet>) -> Self {
        self.dictionaries = dictionaries;
        self
    }

    /// The built-in detectors with the default MRN pattern.
    pub fn standard() -> Self {
        Self::new(&DetectorConfig::default()).expect("built-in patterns compile")
    }

    /// The rules that may match `text`, by index; empty means "certainly no hit".
    ///
    /// The built-in patterns only run when `builtin_may_match` says they might: a byte scan
    /// far cheaper than the regex set, and clinical notes full of vitals and doses (digits
    /// everywhere, no identifier) are the common case. Configured patterns run on their own.
    fn candidates(&self, text: &str) -> Vec<usize> {
        if builtin_may_match(text.as_bytes()) {
            return self.set.matches(text).iter().collect();
        }
        match &self.configured {
            Some((set, index)) => set.matches(text).iter().map(|i| index[i]).collect(),
            None => Vec::new(),
        }
    }

    /// False when no detector can fire on these bytes, checked without decoding them: the
    /// built-in shapes are ASCII; configured patterns and dictionaries always need the full check.
    pub fn may_hit(&self, bytes: &[u8]) -> bool {
        self.configured.is_some() || self.dictionaries.any() || builtin_may_match(bytes)
    }

    /// Every hit, sorted by position, without overlaps.
    ///
    /// Patterns first: among them the earliest, then longest, wins. Then the dictionary (all
    /// targets' merged: `DictionarySet::scanned`) scans only the text outside their hits and
    /// outside tags already in the text, so its hits never overlap (none is dropped half-way,
    /// leaving the rest of a name in clear) and scrubbing twice changes nothing the first time
    /// did not. (Several dictionaries are scanned in turn only if they could not be merged.)
    pub fn hits(&self, text: &str) -> Vec<Hit> {
        let mut hits = self.pattern_hits(text);
        if !self.dictionaries.any() {
            return hits;
        }
        let dictionaries = self.dictionaries.scanned();
        let mut walls: Vec<(usize, usize)> = hits.iter().map(|h| (h.start, h.end)).collect();
        walls.extend(tag_spans(text, &self.tags));
        walls.sort_unstable();
        let patterns = hits.len();
        for (i, d) in dictionaries.iter().enumerate() {
            let from = hits.len();
            d.scan_between(text, &walls, &mut hits);
            if hits.len() > from && i + 1 < dictionaries.len() {
                walls.extend(hits[from..].iter().map(|h| (h.start, h.end)));
                walls.sort_unstable();
            }
        }
        if hits.len() > patterns {
            hits.sort_unstable_by_key(|h| h.start);
        }
        hits
    }

    /// The pattern hits: sorted, without overlaps (the earliest, then longest, wins).
    fn pattern_hits(&self, text: &str) -> Vec<Hit> {
        let matched = self.candidates(text);
        if matched.is_empty() {
            return Vec::new();
        }
        let mut all = Vec::new();
        for i in matched {
            let r = &self.rules[i];
            if r.group == 0 {
                for m in r.re.find_iter(text) {
                    if r.accept.is_none_or(|ok| ok(text, m.start(), m.end())) {
                        all.push(Hit { start: m.start(), end: m.end(), tag: r.tag.clone() });
                    }
                }
            } else {
                for c in r.re.captures_iter(text) {
                    if let Some(m) = c.get(r.group) {
                        all.push(Hit { start: m.start(), end: m.end(), tag: r.tag.clone() });
                    }
                }
            }
        }
        all.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        let mut out: Vec<Hit> = Vec::with_capacity(all.len());
        for h in all {
            if out.last().is_none_or(|l| h.start >= l.end) && h.end > h.start {
                out.push(h);
            }
        }
        out
    }

    /// `text` with every detected identifier replaced by its tag; borrowed when nothing matched.
    /// Idempotent for the built-in detectors (tags contain no digits and no '@') and for the
    /// dictionaries (tags are walls to them).
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        Self::replace(text, &self.hits(text))
    }

    /// `text` with each of `hits` (sorted, not overlapping) replaced by its tag.
    pub fn replace<'a>(text: &'a str, hits: &[Hit]) -> Cow<'a, str> {
        if hits.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut s = String::with_capacity(text.len());
        let mut last = 0;
        for h in hits {
            s.push_str(&text[last..h.start]);
            s.push_str(&h.tag);
            last = h.end;
        }
        s.push_str(&text[last..]);
        Cow::Owned(s)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// The prefilter never rules out a text a built-in pattern matches: strings from the
        /// characters identifiers are made of, in every arrangement.
        #[test]
        fn prefilter_never_hides_a_builtin_match(s in "[0-9 .()+@a-zA-Z/,:-]{0,40}") {
            let d = Detectors::standard();
            if d.set.is_match(&s) {
                prop_assert!(builtin_may_match(s.as_bytes()), "{s:?}");
            }
        }

        #[test]
        fn prefilter_on_identifier_shapes(ssn in "[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}",
                                          phone in r"(\+?1[-. ]?)?(\([0-9]{3}\)[-. ]?|[0-9]{3}[-. ])[0-9]{3}[-. ][0-9]{4}",
                                          pad in "[a-z ,]{0,10}") {
            let with_ssn = format!("{pad}{ssn}{pad}");
            let with_phone = format!("{pad}{phone}{pad}");
            prop_assert!(builtin_may_match(with_ssn.as_bytes()));
            prop_assert!(builtin_may_match(with_phone.as_bytes()));
        }
    }

    #[test]
    fn clinical_note_with_many_numbers_skips_the_regexes() {
        let note = "Vitals: BP 164/82, HR 102, RR 15, temp 36.3 C, SpO2 91%, weight 121.3 kg. \
                    atorvastatin 40 mg, HbA1c 7.3%, creatinine 1.69 mg/dL, eGFR 28, LDL 123 mg/dL.";
        assert!(!builtin_may_match(note.as_bytes()));
        assert!(builtin_may_match(b"born 1/2/80") && builtin_may_match(b"D.O.B. 1/2/80") && builtin_may_match(b"x@y"));
    }

    #[test]
    fn configured_patterns_run_when_the_builtins_cannot_match() {
        let d = Detectors::new(&DetectorConfig { mrn_pattern: Some("H[0-9]{6}".into()), extra: vec![("nhs".into(), "NHS[0-9]{10}".into())], ssn_valid_only: false }).unwrap();
        assert_eq!(d.scrub("chart H123456, NHS0123456789"), "chart [MRN], [NHS]");
        assert_eq!(d.scrub("chart H123456, ssn 123-45-6789"), "chart [MRN], ssn [SSN]");
    }

    use super::*;
    use std::sync::OnceLock;

    fn det() -> &'static Detectors {
        static D: OnceLock<Detectors> = OnceLock::new();
        D.get_or_init(Detectors::standard)
    }

    #[test]
    fn replaces_each_kind() {
        let d = det();
        let cases = [
            ("ssn 123-45-6789 on file", "ssn [SSN] on file"),
            ("ssn 123 45 6789", "ssn [SSN]"),
            ("record MRN-0012345.", "record [MRN]."),
            ("chart mrn 0012345, MRN: 98765", "chart [MRN], [MRN]"),
            ("call (555) 123-4567 or 555.987.6543", "call [PHONE] or [PHONE]"),
            ("call +1 555-123-4567 now", "call [PHONE] now"),
            ("mail jane.doe+x@mail.example.org today", "mail [EMAIL] today"),
            ("DOB: 03/14/1962, allergic", "DOB: [DOB], allergic"),
            ("date of birth is March 3, 1980.", "date of birth is [DOB]."),
            ("Born on the 3rd of May 1980", "Born on the [DOB]"),
            ("birthdate 1984-08-17", "birthdate [DOB]"),
            ("dob 1/2/80", "dob [DOB]"),
        ];
        for (input, want) in cases {
            assert_eq!(d.scrub(input), want, "input {input:?}");
        }
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let d = det();
        for s in ["", "no identifiers here", "follow up in 14 days, 2 doses", "BP 120/80, temp 37.2", "visit 2024-01-02 routine", "née Müller, 3 kids", "order 12345"] {
            assert!(matches!(d.scrub(s), Cow::Borrowed(_)), "{s:?}");
        }
    }

    #[test]
    fn dates_without_a_birth_keyword_stay() {
        assert_eq!(det().scrub("seen 03/14/1962"), "seen 03/14/1962");
        // Too far from the keyword.
        let far = format!("born{}03/14/1962", " word".repeat(12));
        assert_eq!(det().scrub(&far), far);
    }

    #[test]
    fn configured_patterns_and_mrn() {
        let d = Detectors::new(&DetectorConfig {
            mrn_pattern: Some(r"(?-u:\b)H[0-9]{6}(?-u:\b)".into()),
            extra: vec![("insurance".into(), r"INS-[A-Z]{3}[0-9]{4}".into())],
            ssn_valid_only: true,
        })
        .unwrap();
        assert_eq!(d.scrub("mrn H123456 plan INS-ABC1234"), "mrn [MRN] plan [INSURANCE]");
        assert_eq!(d.scrub("MRN-0012345"), "MRN-0012345");
        assert_eq!(d.scrub("ssn 666-12-3456 / 123-45-6789"), "ssn 666-12-3456 / [SSN]");
        assert!(Detectors::new(&DetectorConfig { extra: vec![("x".into(), "(".into())], ..Default::default() }).is_err());
    }

    #[test]
    fn digit_boundaries() {
        let d = det();
        assert_eq!(d.scrub("pt123-45-6789x"), "pt[SSN]x");
        assert_eq!(d.scrub("tel:555-123-4567;"), "tel:[PHONE];");
        assert_eq!(d.scrub("order 1123-45-67890"), "order 1123-45-67890");
        assert_eq!(d.scrub("xMRN-00123456"), "x[MRN]", "all the digits, whatever their count");
    }

    #[test]
    fn overlaps_resolve_to_one_tag() {
        // The email's local part looks like a phone number.
        assert_eq!(det().scrub("555-123-4567@example.com"), "[EMAIL]");
    }

    #[test]
    fn linear_on_adversarial_input() {
        let s = "1-".repeat(50_000) + &"a@".repeat(50_000);
        let t = std::time::Instant::now();
        let _ = det().scrub(&s);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    fn with_dictionary() -> Detectors {
        use crate::masking::dictionary::Kind;
        let set = crate::masking::dictionary_set::test_set(&[
            (Kind::Name, "Daniel Harris"),
            (Kind::Name, "Müller"),
            (Kind::Address, "12 Elm Street"),
            (Kind::Address, "4567 Oak Avenue"),
            (Kind::City, "Springfield"),
            (Kind::Phone, "555-010-4477"),
        ]);
        Detectors::standard().with_dictionaries(set)
    }

    #[test]
    fn dictionary_hits_join_the_pattern_hits() {
        let d = with_dictionary();
        assert_eq!(
            d.scrub("Harris, Daniel (ssn 123-45-6789) lives at 12 Elm Street, Springfield; call 5550104477 or MULLER."),
            "[NAME], [NAME] (ssn [SSN]) lives at [ADDRESS], [CITY]; call [PHONE] or [NAME]."
        );
        // Patterns first; a dictionary never matches inside or across a pattern hit.
        assert_eq!(d.scrub("mail daniel.harris@example.org"), "mail [EMAIL]");
        assert_eq!(d.scrub("call 555-123-4567 Oak Avenue"), "call [PHONE] Oak Avenue");
        let hits = d.hits("call 555-123-4567 Oak Avenue, Daniel");
        assert!(hits.windows(2).all(|w| w[0].end <= w[1].start), "{hits:?}");
        // Every value may hold a name once a dictionary has entries.
        assert!(d.may_hit(b"no digits here") && !det().may_hit(b"no digits here"));
        assert_eq!(det().scrub("Daniel Harris"), "Daniel Harris", "no dictionary: the patterns alone, as before");
    }

    #[test]
    fn a_dictionary_set_later_applies_to_existing_detectors() {
        use crate::masking::dictionary::{DictionaryBuilder, Kind};
        let set = Arc::new(DictionarySet::default());
        let d = Detectors::standard().with_dictionaries(set.clone());
        assert_eq!(d.scrub("Okafor"), "Okafor");
        let mut b = DictionaryBuilder::new([], 2);
        b.add(Kind::Name, "Okafor");
        set.set("ehr", Arc::new(b.freeze()));
        assert_eq!(d.scrub("Okafor"), "[NAME]");
        set.remove("ehr");
        assert_eq!(d.scrub("Okafor"), "Okafor");
    }

    proptest! {
        #[test]
        fn scrub_with_a_dictionary_is_idempotent(s in "[ -~]{0,60}", pick in prop::collection::vec(0usize..6, 1..5), ssn in "[0-9]{3}-[0-9]{2}-[0-9]{4}") {
            let d = with_dictionary();
            let parts = ["Daniel Harris", "harris", "12 elm street", "Springfield", "555 010 4477", "[NAME] [CITY]"];
            let mut input = format!("{s} {ssn}");
            for &p in &pick {
                input.push(' ');
                input.push_str(parts[p]);
                input.push(' ');
                input.push_str(&s);
            }
            let once = d.scrub(&input).into_owned();
            prop_assert!(!once.contains(&ssn));
            prop_assert!(!once.to_lowercase().contains("harris") && !once.contains("Springfield"));
            prop_assert_eq!(d.scrub(&once).into_owned(), once);
        }

        #[test]
        fn scrub_is_idempotent(s in "[ -~]{0,80}", ssn in "[0-9]{3}-[0-9]{2}-[0-9]{4}") {
            let d = det();
            let input = format!("{s} {ssn} {s}");
            let once = d.scrub(&input).into_owned();
            prop_assert!(!once.contains(&ssn));
            prop_assert_eq!(d.scrub(&once).into_owned(), once);
        }

        #[test]
        fn no_hit_borrows(s in "[a-zA-Z .,;]{0,200}") {
            prop_assert!(matches!(det().scrub(&s), Cow::Borrowed(_)));
        }
    }
}
