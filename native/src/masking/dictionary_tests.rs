//! Tests of the identifier dictionary: what a value becomes, how text is matched, memory.

use super::*;
use crate::masking::start_filter::StartFilter;
use proptest::prelude::*;

fn build(values: &[(Kind, &str)]) -> Dictionary {
    let mut b = DictionaryBuilder::new(["the", "of", "street"], 2);
    for (k, v) in values {
        b.add(*k, v);
    }
    b.freeze()
}

/// `text` with the dictionary's hits replaced by their tags.
fn tagged(d: &Dictionary, text: &str) -> String {
    crate::masking::detectors::Detectors::replace(text, &d.hits(text)).into_owned()
}

#[test]
fn case_and_accents_do_not_matter() {
    let d = build(&[(Kind::Name, "Müller"), (Kind::Name, "José García-López")]);
    assert_eq!(tagged(&d, "MULLER, muller, Mueller, Mu\u{308}ller"), "[NAME], [NAME], Mueller, [NAME]");
    assert_eq!(tagged(&d, "seen by jose garcia lopez today"), "seen by [NAME] today");
    assert_eq!(tagged(&d, "GARCIA-LOPEZ"), "[NAME]-[NAME]", "each name token alone; the stored sequence has three");
}

#[test]
fn multi_token_values_match_their_whole_sequence_only() {
    let d = build(&[(Kind::Address, "12 Elm Street"), (Kind::City, "Springfield"), (Kind::Zip, "02139")]);
    assert_eq!(tagged(&d, "lives at 12 Elm Street, Springfield 02139."), "lives at [ADDRESS], [CITY] [ZIP].");
    assert_eq!(tagged(&d, "lives at 12  elm\nSTREET"), "lives at [ADDRESS]", "separators inside are part of the hit");
    assert_eq!(tagged(&d, "12 Elm Road; elm trees; street 12"), "12 Elm Road; elm trees; street 12", "address tokens alone are not identifiers");
}

#[test]
fn name_tokens_alone_and_reversed() {
    let d = build(&[(Kind::Name, "Daniel"), (Kind::Name, "Harris"), (Kind::Name, "Garcia-Lopez"), (Kind::Name, "Mary Anne O'Brien")]);
    assert_eq!(tagged(&d, "Harris, Daniel"), "[NAME], [NAME]");
    assert_eq!(tagged(&d, "Dr. Lopez and Mrs. Garcia"), "Dr. [NAME] and Mrs. [NAME]");
    assert_eq!(tagged(&d, "Anne O'Brien, Mary"), "[NAME] O'[NAME], [NAME]", "one-letter tokens alone are below min_chars");
    assert_eq!(tagged(&d, "mary anne o'brien"), "[NAME]");
}

#[test]
fn digit_identifiers_also_match_run_together() {
    let d = build(&[(Kind::Ssn, "984-96-1001"), (Kind::Mrn, "MRN-0012345"), (Kind::Phone, "(555) 010-4477"), (Kind::Zip, "02139-4307")]);
    assert_eq!(tagged(&d, "ssn 984961001 or 984 96 1001"), "ssn [SSN] or [SSN]");
    assert_eq!(tagged(&d, "chart mrn0012345, MRN: 0012345, #0012345"), "chart [MRN], [MRN], #[MRN]");
    assert_eq!(tagged(&d, "call 5550104477 or 555.010.4477"), "call [PHONE] or [PHONE]");
    assert_eq!(tagged(&d, "zip 021394307"), "zip [ZIP]");
    assert_eq!(tagged(&d, "984 96 and 0012 and 555"), "984 96 and 0012 and 555", "parts of a number are not the number");
}

#[test]
fn stop_words_and_short_tokens() {
    let mut b = DictionaryBuilder::new(["The", "Of"], 2);
    assert_eq!(b.add(Kind::Name, "the"), 0, "a stop word alone adds nothing");
    assert_eq!(b.add(Kind::Name, "J"), 0, "shorter than min_chars");
    assert_eq!(b.add(Kind::Address, "of the"), 0, "all tokens ignored: nothing");
    assert_eq!(b.add(Kind::Name, ""), 0);
    assert_eq!(b.add(Kind::Name, " - "), 0);
    assert_eq!(b.add(Kind::City, "Isle of Wight"), 1, "stop words inside a sequence stay");
    assert_eq!(b.add(Kind::Name, "name"), 0, "tag words are always stop words");
    let d = b.freeze();
    assert_eq!(tagged(&d, "the J of Isle of Wight; isle"), "the J of [CITY]; isle");
    let mut b = DictionaryBuilder::new([], 4);
    assert_eq!(b.add(Kind::Name, "Kim Lee"), 0, "every token below min_chars: nothing");
    assert_eq!(b.add(Kind::Name, "Kim Leeson"), 2);
    assert_eq!(tagged(&b.freeze(), "Kim met Leeson and Kim Leeson"), "Kim met [NAME] and [NAME]");
}

#[test]
fn longest_match_wins_and_hits_do_not_overlap() {
    let d = build(&[(Kind::City, "Salt Lake"), (Kind::City, "Salt Lake City"), (Kind::Address, "Lake City Road 5")]);
    assert_eq!(tagged(&d, "Salt Lake City Road 5"), "[CITY] Road 5", "earliest, then longest");
    assert_eq!(tagged(&d, "Salt Lake Lake City Road 5"), "[CITY] [ADDRESS]");
    let hits = d.hits("Salt Lake City, Salt Lake");
    assert_eq!(hits.iter().map(|h| (h.start, h.end)).collect::<Vec<_>>(), [(0, 14), (16, 25)]);
}

#[test]
fn first_kind_wins_and_counts() {
    let mut b = DictionaryBuilder::new([], 2);
    assert_eq!(b.add(Kind::City, "Jackson"), 1);
    assert_eq!(b.add(Kind::Name, "Jackson"), 0, "same sequence, second kind: kept as city");
    assert_eq!(b.add(Kind::Name, "Ada Jackson"), 2, "the sequence and 'ada'; 'jackson' exists");
    assert_eq!(b.len(), 3);
    let d = b.freeze();
    assert_eq!(tagged(&d, "Jackson"), "[CITY]");
    assert_eq!(d.len(), 3);
}

#[test]
fn sequences_are_capped_at_fifteen_tokens() {
    let long: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    let d = build(&[(Kind::Address, &long.join(" "))]);
    let text = long.join(" ");
    let hits = d.hits(&text);
    assert_eq!(hits.len(), 1);
    assert_eq!(&text[hits[0].start..hits[0].end], long[..15].join(" "));
}

#[test]
fn tags_are_walls_so_scrubbing_is_idempotent() {
    let d = build(&[(Kind::Address, "Name City"), (Kind::Name, "Ann Lee")]);
    assert_eq!(tagged(&d, "[NAME] [CITY] x"), "[NAME] [CITY] x");
    let once = tagged(&d, "Ann Lee, Ann");
    assert_eq!(once, "[NAME], [NAME]");
    assert_eq!(tagged(&d, &once), once);
}

#[test]
fn extending_keeps_the_key_and_the_entries() {
    let mut b = DictionaryBuilder::new(["the"], 2);
    b.add(Kind::Name, "Okafor");
    let d = b.freeze();
    let mut more = DictionaryBuilder::from(&d);
    assert!(d.same_key(&more));
    more.add(Kind::Name, "Nguyen");
    assert_eq!(more.add(Kind::Name, "the"), 0, "the stop words come along");
    let d2 = more.freeze();
    assert_eq!(tagged(&d2, "Okafor and Nguyen"), "[NAME] and [NAME]");
    assert_eq!(tagged(&d, "Okafor and Nguyen"), "[NAME] and Nguyen", "the original is unchanged");
    // absorb: only with the same key.
    let mut base = DictionaryBuilder::from(&d);
    let mut delta = DictionaryBuilder::from(&d);
    delta.add(Kind::Address, "9 Birch Lane");
    assert_eq!(base.absorb(&delta), Some(1));
    assert_eq!(tagged(&base.freeze(), "at 9 Birch Lane"), "at [ADDRESS]");
    // Every builder of the process has its keys (so targets' dictionaries merge).
    assert_eq!(DictionaryBuilder::new([], 2).absorb(&delta), Some(2));
}

#[test]
fn memory_of_a_million_tokens() {
    // 500,000 two-token names of distinct tokens: 1M token entries, 500k sequences, 500k markers.
    let mut b = DictionaryBuilder::new([], 2);
    let mut s = String::new();
    for i in 0..500_000u32 {
        s.clear();
        use std::fmt::Write;
        let _ = write!(s, "fa{i:x}x lb{i:x}y");
        b.add(Kind::Name, &s);
    }
    let d = b.freeze();
    assert_eq!(d.len(), 1_500_000);
    assert!(d.memory_bytes() <= 64 << 20, "{} bytes", d.memory_bytes());
    assert_eq!(tagged(&d, "Fa1fx Lb1fy; lb2y"), "[NAME]; [NAME]");
    assert_eq!(tagged(&d, "lb1fx fa1fy"), "lb1fx fa1fy");
}

#[test]
fn clear_values_are_not_kept() {
    let mut b = DictionaryBuilder::new([], 2);
    b.add(Kind::Name, "Zebulon Quackenbush");
    let d = b.freeze();
    // The table holds only hashes: no byte run of the value is in it.
    let bytes: Vec<u8> = d.table.lines.iter().flat_map(|l| l.slots).flat_map(u64::to_le_bytes).collect();
    for needle in [&b"zebulon"[..], b"Zebulon", b"quack", b"Quack"] {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    }
}

proptest! {
    /// Every value added is found again in text, whatever the case, and a scan of the
    /// result finds nothing more (tags are walls).
    #[test]
    fn added_values_are_found_and_tagging_is_idempotent(
        names in prop::collection::vec("[A-Za-zé]{2,8}( [A-Za-z]{2,8}){0,2}", 1..6),
        filler in prop::collection::vec("[a-z ,.;0-9\\[\\]A-Z]{0,12}", 1..6),
    ) {
        let mut b = DictionaryBuilder::new(["and", "the"], 2);
        for n in &names {
            b.add(Kind::Name, n);
        }
        let d = b.freeze();
        let mut text = String::new();
        for (i, n) in names.iter().enumerate() {
            text.push_str(&filler[i % filler.len()]);
            text.push(' ');
            text.push_str(&n.to_uppercase());
            text.push(' ');
        }
        let once = tagged(&d, &text);
        for n in &names {
            for w in crate::masking::tokens::folded(n) {
                prop_assert!(!crate::masking::tokens::folded(&once).contains(&w), "{w:?} left in {once:?}");
            }
        }
        prop_assert_eq!(tagged(&d, &once), once.clone());
    }
}

/// The same dictionary scanning through `filter` (None: the batched reference scan).
fn with_filter(d: &Dictionary, filter: Option<StartFilter>) -> Dictionary {
    Dictionary {
        key: d.key.clone(),
        table: d.table.clone(),
        starts: d.starts.clone(),
        filter,
        pairs: d.pairs.clone(),
        pair_filter: d.pairs.clone().filter(),
        stop: d.stop.clone(),
        min_chars: d.min_chars,
    }
}

const KINDS_ADDED: [Kind; 7] = [Kind::Name, Kind::Address, Kind::City, Kind::Mrn, Kind::Ssn, Kind::Phone, Kind::Zip];

/// A text piece: a value as added (its case changed, accents decomposed or dropped, its
/// separators changed), the first tokens of a value (a longer sequence's start without its end),
/// a random word (ASCII, non-ASCII, long), separators or a tag.
fn piece(values: &[(usize, String)], pick: (u8, usize, u8), word: &str) -> String {
    let value = &values[pick.1 % values.len()].1;
    match pick.0 % 8 {
        0 => match pick.2 % 5 {
            0 => value.to_uppercase(),
            1 => value.to_lowercase(),
            2 => value.replace('ü', "u\u{308}").replace('é', "e\u{301}"),
            3 => value.replace([' ', '-'], "\n , "),
            _ => value.clone(),
        },
        1 => value.split(' ').take(1 + pick.2 as usize % 3).collect::<Vec<_>>().join(" "),
        2 | 3 => word.to_string(),
        4 => word.repeat(1 + pick.2 as usize % 12),
        5 => [" ", ", ", " - ", ".\n", "'", "  ;  "][pick.2 as usize % 6].to_string(),
        6 => ["[NAME]", "[CITY] ", "İpek", "ＭＵＬＬＥＲ", "Straße", "½", "Ö"][pick.2 as usize % 7].to_string(),
        _ => format!("{} {}", value, word),
    }
}

proptest! {
    /// The filtered scan finds exactly the hits of the reference scan (every token hashed and
    /// looked up), at the chosen filter size, the coarsest size, and with a filter every token
    /// passes: the filter only ever skips tokens the table would have rejected.
    #[test]
    fn filtered_scan_finds_exactly_what_the_reference_finds(
        values in prop::collection::vec((0usize..7, "[A-Za-zéüÖß0-9]{1,10}([ -][A-Za-z0-9üé]{1,8}){0,3}"), 1..12),
        picks in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..60),
        words in prop::collection::vec("[a-zA-Z0-9]{1,12}|\\PC{1,4}|[a-z]{60,70}", 1..8),
    ) {
        let mut b = DictionaryBuilder::new(["the", "of"], 2);
        for (k, v) in &values {
            b.add(KINDS_ADDED[*k], v);
        }
        let d = b.freeze();
        let text: String = picks.iter().enumerate().map(|(i, &p)| piece(&values, p, &words[i % words.len()]) + " ").collect();
        let want = with_filter(&d, None).hits(&text);
        prop_assert!(d.filter.is_some());
        prop_assert_eq!(&d.hits(&text), &want, "chosen size");
        prop_assert_eq!(&with_filter(&d, Some(d.starts.folded_for_tests(0))).hits(&text), &want, "coarsest size");
        prop_assert_eq!(&with_filter(&d, Some(d.starts.everything_for_tests())).hits(&text), &want, "every token passes");
        prop_assert_eq!(&with_filter(&d, Some(d.starts.every_start_for_tests())).hits(&text), &want, "every token passes, most to the pair filter");
        // Windows (as between walls) too.
        let cut = text.char_indices().map(|(i, _)| i).nth(picks.len() / 2).unwrap_or(0);
        let (mut fast, mut slow) = (vec![], vec![]);
        d.scan(&text, cut, text.len(), &mut fast);
        d.scan_batched(&text, cut, text.len(), &mut slow);
        prop_assert_eq!(fast, slow);
    }
}

#[test]
fn filtered_scan_on_the_edges() {
    let d = build(&[(Kind::Name, "Müller"), (Kind::Address, "12 Elm Street"), (Kind::Name, &"Long".repeat(20)), (Kind::Ssn, "984-96-1001")]);
    let reference = with_filter(&d, None);
    for text in [
        "x".repeat(63) + " 12 elm street",
        "a".repeat(62) + " 12 Elm",
        format!("{} MÜLLER mu\u{308}ller", "y".repeat(61)),
        format!("{}.{}", "z".repeat(64), "long".repeat(20)),
        "LONG".repeat(20),
        "984 96 1001 984961001 [SSN] 12 Elm Street12 Elm Street".to_string(),
        String::new(),
    ] {
        assert_eq!(d.hits(&text), reference.hits(&text), "{text:?}");
    }
    assert_eq!(tagged(&d, &format!("{} 12 Elm Street, müller.", "q".repeat(60))), format!("{} [ADDRESS], [NAME].", "q".repeat(60)));
}

/// Tokens of one or two bytes are dropped by the walk only in a class whose every start is
/// longer: a one-digit house number and a two-letter name still start hits among them.
#[test]
fn short_tokens_start_hits_when_a_value_starts_with_one() {
    let d = build(&[(Kind::Address, "5 Oak Ave"), (Kind::Name, "Al Wu"), (Kind::Ssn, "984-96-1001")]);
    let reference = with_filter(&d, None);
    let text = "a 5 of Oak 5 oak ave; wu, al. 12 x 984 96 1001 y 5 OAK AVE".repeat(3);
    assert_eq!(d.hits(&text), reference.hits(&text));
    assert_eq!(tagged(&d, "BP 120/80 a 5 oak ave, x wu"), "BP 120/80 a [ADDRESS], x [NAME]");
    let d = build(&[(Kind::Name, "Harris"), (Kind::Ssn, "984-96-1001")]);
    let text = "a 5 of 12 x to be harris 984 96 1001 HR 98".repeat(4);
    assert_eq!(d.hits(&text), with_filter(&d, None).hits(&text));
    assert_eq!(tagged(&d, "seen by Harris, 984-96-1001 at 12 x"), "seen by [NAME], [SSN] at 12 x");
}
