//! The identifier dictionary: the values of classified identifier columns (names, streets, towns,
//! MRNs...) kept only as keyed 64-bit hashes of their folded token sequences, and the scan that
//! tags those sequences in free text ("Seen with Daniel Harris" → "Seen with [NAME] [NAME]").
//!
//! Layout: one open-addressing table of 64-byte buckets (7 slots and their tag bytes). A slot
//! keeps the top 59 bits of a hash, a flag bit and 4 bits of payload:
//! - entry: the hash of a token sequence (one token: the token's hash), payload = its kind;
//! - marker: "sequences of up to N tokens start with this token", payload = N (2..=15).
//!
//! An entry and the marker of the same token share the hash bits, so both sit in the same
//! bucket: one cache line answers "is this token an identifier, and does a longer one start
//! here". In front of the table, a small keyed bitset of the tokens that start something
//! (start_filter.rs) rules out most tokens of ordinary text from a sample of their bytes, with
//! no hash and no table read; the rest are hashed and looked up exactly. Before the next tokens
//! are hashed for a longer sequence, a keyed bitset of (first, second) token pairs
//! (pair_filter.rs) rules out most continuations the same way. A dictionary so large
//! that the bitset is mostly ones scans without it: tokens are hashed a batch ahead and their
//! buckets prefetched.
//! No clear value is ever stored; the key is random per dictionary and never leaves it.

use foldhash::quality::FoldHasher;
use foldhash::SharedSeed;
use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::Hasher;

use crate::masking::candidates::{Cursor, NO_CANDIDATE};
use crate::masking::detectors::Hit;
use crate::masking::pair_filter::{PairFilter, PairSet};
use crate::masking::start_filter::{Start, StartBits, StartFilter};
use crate::masking::tokens::{sample_after, Folded, Sample, Tok, Tokens};

/// Longest token sequence stored; longer values keep their first `MAX_TOKENS` tokens.
pub const MAX_TOKENS: usize = 15;

/// What a value is; decides its tag and which extra entries it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Name = 1,
    Address,
    City,
    Zip,
    Mrn,
    Email,
    Phone,
    Ssn,
    Dob,
    Other,
}

const KINDS: [Kind; 10] =
    [Kind::Name, Kind::Address, Kind::City, Kind::Zip, Kind::Mrn, Kind::Email, Kind::Phone, Kind::Ssn, Kind::Dob, Kind::Other];

/// Every tag the dictionary writes. The scan treats these as walls, never as words, so a
/// scrubbed text scanned again finds nothing new (scrub is idempotent).
pub const TAGS: [&str; 10] = ["[NAME]", "[ADDRESS]", "[CITY]", "[ZIP]", "[MRN]", "[EMAIL]", "[PHONE]", "[SSN]", "[DOB]", "[PHI]"];

impl Kind {
    /// The PHI kind of a classified column ("name", "address", ...); unknown kinds are `Other`.
    pub fn parse(kind: &str) -> Kind {
        match kind.to_ascii_lowercase().as_str() {
            "name" => Kind::Name,
            "address" => Kind::Address,
            "city" => Kind::City,
            "zip" => Kind::Zip,
            "mrn" => Kind::Mrn,
            "email" => Kind::Email,
            "phone" => Kind::Phone,
            "ssn" => Kind::Ssn,
            "dob" => Kind::Dob,
            _ => Kind::Other,
        }
    }

    pub fn tag(self) -> &'static str {
        TAGS[self as usize - 1]
    }

    fn from_code(c: u64) -> Kind {
        KINDS.get((c as usize).wrapping_sub(1)).copied().unwrap_or(Kind::Other)
    }
}

/// Always stop words, whatever the caller passes: the words of the tags.
const TAG_WORDS: [&str; 10] = ["name", "address", "city", "zip", "mrn", "email", "phone", "ssn", "dob", "phi"];

/// The process's random dictionary key (`process_keys`): token hashes and sequence mixing both
/// depend on it.
#[derive(Clone)]
struct Key {
    seeds: [u64; 4],
    shared: SharedSeed,
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The keys of every dictionary of this process: the token hash's seeds, the start filter's
/// and the pair filter's. Made once, at the first dictionary (so at each start of the
/// gateway), and never written anywhere. One set of keys lets the dictionaries of several
/// targets merge into the one a scan reads (`DictionarySet`): a value's hashes are the same in
/// every target's dictionary, and one walk over a text looks them all up.
fn process_keys() -> &'static ([u64; 4], [u64; 2], [u64; 3]) {
    static KEYS: std::sync::OnceLock<([u64; 4], [u64; 2], [u64; 3])> = std::sync::OnceLock::new();
    KEYS.get_or_init(rand::random)
}

impl Key {
    fn of_process() -> Self {
        let seeds = process_keys().0;
        Key { shared: SharedSeed::from_u64(seeds[0]), seeds }
    }

    /// A short token is one u128 (two multiplies, no branch on its length), a long one bytes.
    #[inline]
    fn token(&self, folded: Folded<'_>) -> u64 {
        let mut h = FoldHasher::with_seed(self.seeds[1], &self.shared);
        match folded {
            Folded::Short(w) => h.write_u128(w),
            Folded::Long(b) => h.write(b),
        }
        h.finish()
    }

    /// The hash of a sequence one token longer. Order matters ("Daniel Harris" is not
    /// "Harris Daniel"): the two operands are keyed differently before the multiply.
    #[inline]
    fn extend(&self, sequence: u64, token: u64) -> u64 {
        folded_multiply(folded_multiply(sequence ^ self.seeds[2], token ^ self.seeds[3]), 0x9e37_79b9_7f4a_7c15)
    }
}

const PAYLOAD: u64 = 0xF;
const MARKER: u64 = 0x10;
/// The hash bits a slot keeps (all but the flag and payload).
const HASH_BITS: u64 = !0x1F;

/// A bucket: one 64-byte cache line, 7 slots and a tag byte per slot (0 = empty, else 0x80 |
/// 7 bits of the slot's hash), so a look-up compares 7 tags in a few word operations and
/// reads a slot only when its tag matches (about 1 in 18 misses, and every hit).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line {
    tags: u64,
    slots: [u64; SLOTS],
}

const SLOTS: usize = 7;
/// The tag bytes' high bits (bytes 0..7; the eighth byte is never used).
const TAG_HIGHS: u64 = 0x0080_8080_8080_8080;
const TAG_LOWS: u64 = 0x0001_0101_0101_0101;
const EMPTY_LINE: Line = Line { tags: 0, slots: [0; SLOTS] };

#[inline(always)]
fn tag_of(h: u64) -> u64 {
    0x80 | (h >> 5 & 0x7F)
}

/// Buckets probed linearly, bucket after bucket. A key lives in the first bucket from its
/// home that had room when it was inserted; nothing is ever removed, so a look-up stops at the
/// first bucket with an empty slot. The home comes from the hash's top 32 bits (multiply-shift:
/// any number of buckets works, so the size follows the count).
#[derive(Clone)]
struct Table {
    lines: Vec<Line>,
    entries: usize,
    markers: usize,
}

/// How a second insert of the same key is resolved.
#[derive(Clone, Copy, PartialEq)]
enum Merge {
    /// Entries: the first kind wins.
    KeepFirst,
    /// Markers: the longest sequence wins.
    Max,
}

impl Table {
    fn with_slots(slots: usize) -> Self {
        Table { lines: vec![EMPTY_LINE; slots.div_ceil(SLOTS).max(1)], entries: 0, markers: 0 }
    }

    #[inline]
    fn slots(&self) -> usize {
        self.lines.len() * SLOTS
    }

    #[inline(always)]
    fn home(&self, h: u64) -> usize {
        (((h >> 32) * self.lines.len() as u64) >> 32) as usize
    }

    #[inline(always)]
    fn next(&self, line: usize) -> usize {
        if line + 1 == self.lines.len() {
            0
        } else {
            line + 1
        }
    }

    /// Asks the CPU to bring bucket `line` into cache now, to be read a few tokens later.
    #[inline(always)]
    fn prefetch(&self, line: usize) {
        crate::masking::prefetch(&self.lines[line]);
    }

    /// (entry kind code, marker length) of hash `h`, whose home bucket is `line`; 0 where
    /// there is none.
    #[inline(always)]
    fn probe_from(&self, h: u64, mut line: usize) -> (u64, u64) {
        let (want, pattern) = (h & HASH_BITS, tag_of(h) * TAG_LOWS);
        let (mut kind, mut longest) = (0, 0);
        loop {
            let l = &self.lines[line];
            // Bytes of `x` that are zero are tag matches (the usual SWAR test; a rare false
            // candidate is weeded out by the full compare).
            let x = l.tags ^ pattern;
            let mut same = x.wrapping_sub(TAG_LOWS) & !x & TAG_HIGHS;
            while same != 0 {
                let s = l.slots[same.trailing_zeros() as usize / 8];
                if s & HASH_BITS == want {
                    if s & MARKER == 0 {
                        kind = s & PAYLOAD;
                    } else {
                        longest = s & PAYLOAD;
                    }
                }
                same &= same - 1;
            }
            if !l.tags & TAG_HIGHS != 0 {
                return (kind, longest);
            }
            line = self.next(line);
        }
    }

    #[inline(always)]
    fn probe(&self, h: u64) -> (u64, u64) {
        self.probe_from(h, self.home(h))
    }

    /// The kind code of the entry for sequence hash `h`, 0 if none.
    #[inline]
    fn entry(&self, h: u64) -> u64 {
        self.probe(h).0
    }

    /// Inserts slot value `v` (hash bits, flag, payload); true when it was not there yet.
    fn insert(&mut self, v: u64, merge: Merge) -> bool {
        if (self.entries + self.markers + 1) * 2 > self.slots() {
            *self = self.resized(self.slots() * 2);
        }
        let want = v & (HASH_BITS | MARKER);
        let mut line = self.home(v);
        loop {
            let l = &mut self.lines[line];
            for j in 0..SLOTS {
                let s = &mut l.slots[j];
                if *s == 0 {
                    *s = v;
                    l.tags |= tag_of(v) << (8 * j);
                    if v & MARKER == 0 {
                        self.entries += 1;
                    } else {
                        self.markers += 1;
                    }
                    return true;
                }
                if *s & (HASH_BITS | MARKER) == want {
                    if merge == Merge::Max && v & PAYLOAD > *s & PAYLOAD {
                        *s = v;
                    }
                    return false;
                }
            }
            line = self.next(line);
        }
    }

    fn occupied(&self) -> impl Iterator<Item = u64> + '_ {
        self.lines.iter().flat_map(|l| l.slots).filter(|&s| s != 0)
    }

    fn resized(&self, slots: usize) -> Table {
        let mut t = Table::with_slots(slots);
        for s in self.occupied() {
            let merge = if s & MARKER == 0 { Merge::KeepFirst } else { Merge::Max };
            t.insert(s, merge);
        }
        t
    }

    /// At most half full: most buckets have room, so most look-ups read one cache line.
    fn compact(self) -> Table {
        let want = ((self.entries + self.markers) * 2).max(SLOTS);
        if want.div_ceil(SLOTS) < self.lines.len() {
            self.resized(want)
        } else {
            self
        }
    }
}

/// A frozen dictionary: look-ups and scans only. `Send + Sync`; share it through an `Arc`.
pub struct Dictionary {
    key: Key,
    table: Table,
    /// The tokens that start an entry or a marker: full resolution (for builders started from
    /// this dictionary) and the folded filter scans read (None: too dense to help).
    starts: StartBits,
    filter: Option<StartFilter>,
    /// The first two tokens of every multi-token sequence: all of them (for builders) and the
    /// bitset scans read.
    pairs: PairSet,
    pair_filter: PairFilter,
    /// Settings a builder started from this dictionary continues with; stop words as hashes.
    stop: HashSet<u64>,
    min_chars: usize,
}

/// Tokens the scan reads ahead, hashed and prefetched in one batch: their buckets are on their
/// way from memory together instead of one after the other.
const BATCH: usize = 64;
const _: () = assert!(MAX_TOKENS < BATCH);
/// Candidates (tokens the start filter lets through) read ahead and prefetched together.
const CANDIDATES: usize = 8;

impl Dictionary {
    /// Entries (token sequences and single tokens), markers not counted.
    pub fn len(&self) -> usize {
        self.table.entries
    }

    pub fn is_empty(&self) -> bool {
        self.table.entries == 0
    }

    /// Bytes held: the table, the stop-word hashes and the struct itself.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.table.lines.capacity() * std::mem::size_of::<Line>()
            + self.starts.memory_bytes()
            + self.filter.as_ref().map_or(0, StartFilter::memory_bytes)
            + self.pairs.memory_bytes()
            + self.pair_filter.memory_bytes()
            + self.stop.capacity() * (std::mem::size_of::<u64>() + 1)
    }

    /// Whether both were built under the same key (so one's entries mean the same in the other).
    pub fn same_key(&self, other: &DictionaryBuilder) -> bool {
        self.key.seeds == other.key.seeds
    }

    /// Every dictionary hit in `text`, sorted, not overlapping; the dictionary's own tags are
    /// walls (see `TAGS`). The tests' view: `Detectors::hits` combines the dictionary with the
    /// patterns itself.
    #[cfg(test)]
    pub(crate) fn hits(&self, text: &str) -> Vec<Hit> {
        let mut out = Vec::new();
        self.scan_between(text, &tag_spans(text, &TAGS), &mut out);
        out
    }

    /// Scans the parts of `text` outside `walls` (sorted by start, may overlap): no token and
    /// no sequence crosses a wall.
    pub fn scan_between(&self, text: &str, walls: &[(usize, usize)], out: &mut Vec<Hit>) {
        let mut pos = 0;
        for &(start, end) in walls {
            if start > pos {
                self.scan(text, pos, start, out);
            }
            pos = pos.max(end);
        }
        if pos < text.len() {
            self.scan(text, pos, text.len(), out);
        }
    }

    /// Appends the hits in `text[from..to]`: at each token the longest stored sequence that
    /// starts there wins (greedy, left to right, no overlap); a hit runs from its first
    /// token's first byte to its last token's last byte, separators included.
    pub fn scan(&self, text: &str, from: usize, to: usize, out: &mut Vec<Hit>) {
        if self.table.entries == 0 {
            return;
        }
        match &self.filter {
            Some(filter) => self.scan_filtered(filter, text, from, to, out),
            None => self.scan_batched(text, from, to, out),
        }
    }

    /// `scan` through the start filter: only tokens whose bit is set (candidates) are hashed
    /// and looked up; the others cannot start anything, which is what the look-up would have
    /// said. A candidate that can only start a multi-token sequence is dropped, unhashed, when
    /// the pair filter says no stored sequence goes on with the token after it. Candidates are
    /// read a batch ahead and their buckets prefetched, so a table out of cache costs one memory
    /// wait per batch, not one per candidate. After a hit the scan goes on after its last token
    /// (candidates inside it are dropped), as in `scan_batched`.
    fn scan_filtered(&self, filter: &StartFilter, text: &str, from: usize, to: usize, out: &mut Vec<Hit>) {
        let mut cursor = Cursor::within(text, from, to);
        let mut candidates = [NO_CANDIDATE; CANDIDATES];
        // The candidates kept: where they are, their hash, and their sample when the pair
        // filter was not asked about them yet.
        let mut batch = [(0usize, 0usize, 0u64, None::<Sample>); CANDIDATES];
        // Where the next hit may start: the end of the last hit.
        let mut resume = from;
        // Per candidate of a batch: whether it is an entry alone, else the pair filter's bit
        // for it and the token after it (None: no token after it, so it continues nothing).
        let mut asks = [(false, None::<usize>); CANDIDATES];
        loop {
            let got = cursor.fill(filter, &mut candidates);
            // The bitset words every candidate of the batch will read are requested first, so
            // that their cache misses (large dictionaries, and cold between rows) overlap.
            for (c, ask) in candidates[..got].iter().zip(&mut asks) {
                let alone = filter.start(c.sample) == Start::Alone;
                let pair = if alone { None } else { self.pair_bit(c.sample, text, c.end, to) };
                if let Some(i) = pair {
                    self.pair_filter.prefetch(i);
                }
                *ask = (alone, pair);
            }
            let mut n = 0;
            for (c, &(unasked, pair)) in candidates[..got].iter().zip(&asks) {
                // A token that can only start a sequence: the token after it decides, from
                // samples, before anything is hashed.
                if !unasked && !pair.is_some_and(|i| self.pair_filter.has(i)) {
                    continue;
                }
                let hash = self.key.token(cursor.fold(c));
                self.table.prefetch(self.table.home(hash));
                batch[n] = (c.start, c.end, hash, unasked.then_some(c.sample));
                n += 1;
            }
            for &(start, end, first, unasked) in &batch[..n] {
                if start < resume {
                    continue;
                }
                if let Some((last, code)) = self.longest_at(text, end, to, first, unasked) {
                    out.push(Hit { start, end: last, tag: Cow::Borrowed(Kind::from_code(code).tag()) });
                    resume = last;
                }
            }
            if got < CANDIDATES {
                return;
            }
            if resume > candidates[got - 1].end {
                cursor.skip_to(resume);
            }
        }
    }

    /// Whether some stored sequence goes on from a token of sample `first` that ends at `end`
    /// with the token after it (false is exact; true may be wrong).
    #[inline]
    fn continues(&self, first: Sample, text: &str, end: usize, to: usize) -> bool {
        self.pair_bit(first, text, end, to).is_some_and(|i| self.pair_filter.has(i))
    }

    /// The pair filter's bit for a token of sample `first` that ends at `end` and the token
    /// after it; None when no token follows (then nothing stored goes on from it).
    #[inline]
    fn pair_bit(&self, first: Sample, text: &str, end: usize, to: usize) -> Option<usize> {
        sample_after(text, end, to).map(|second| self.pair_filter.index(first, second))
    }

    /// The longest stored sequence starting with the token hashed `first`, which ends at
    /// `end`: (its last byte, its kind code), or None. Later tokens are read from `end` on,
    /// after the pair filter (`unasked`: the first token's sample, when it was not asked yet).
    #[inline]
    fn longest_at(&self, text: &str, end: usize, to: usize, first: u64, unasked: Option<Sample>) -> Option<(usize, u64)> {
        let (alone, longest) = self.table.probe(first);
        let found = (alone != 0).then_some((end, alone));
        if longest < 2 || unasked.is_some_and(|sample| !self.continues(sample, text, end, to)) {
            return found;
        }
        // The next tokens, hashed exactly: each sequence's hash and last byte.
        let mut seq = [(0u64, 0usize); MAX_TOKENS + 1];
        let (mut h, mut n) = (first, 1);
        let mut next = Tokens::within(text, end, to);
        while n < longest as usize {
            let Some((_, e, f)) = next.next_token() else { break };
            h = self.key.extend(h, self.key.token(f));
            n += 1;
            seq[n] = (h, e);
        }
        let longer = (2..=n).rev().find_map(|k| {
            let code = self.table.entry(seq[k].0);
            (code != 0).then_some((seq[k].1, code))
        });
        longer.or(found)
    }

    /// `scan` without the filter: every token hashed, a batch ahead, its bucket prefetched (the
    /// faster way when most tokens would pass the filter anyway). The reference `scan_filtered`
    /// is tested against.
    pub(crate) fn scan_batched(&self, text: &str, from: usize, to: usize, out: &mut Vec<Hit>) {
        let mut tokens = Tokens::within(text, from, to);
        let mut buf = [Tok::default(); BATCH];
        // Each token's home bucket, computed and prefetched when the token is read.
        let mut homes = [0usize; BATCH];
        let (mut head, mut len, mut more) = (0, 0, true);
        loop {
            // Keep a whole sequence's worth of tokens ahead of `head`.
            if more && len - head < MAX_TOKENS {
                buf.copy_within(head..len, 0);
                homes.copy_within(head..len, 0);
                (len, head) = (len - head, 0);
                let got = tokens.fill(&mut buf[len..], |f| self.key.token(f));
                for (t, home) in buf[len..len + got].iter().zip(&mut homes[len..]) {
                    *home = self.table.home(t.hash);
                    self.table.prefetch(*home);
                }
                more = got == BATCH - len;
                len += got;
            }
            if head == len {
                return;
            }
            let first = buf[head];
            let (alone, longest) = self.table.probe_from(first.hash, homes[head]);
            let mut found = (alone != 0).then_some((1, alone));
            if longest >= 2 {
                let n = (longest as usize).min(len - head);
                let mut seq = [0u64; MAX_TOKENS + 1];
                let mut h = first.hash;
                for k in 2..=n {
                    h = self.key.extend(h, buf[head + k - 1].hash);
                    seq[k] = h;
                }
                let longer = (2..=n).rev().find_map(|k| {
                    let code = self.table.entry(seq[k]);
                    (code != 0).then_some((k, code))
                });
                found = longer.or(found);
            }
            let k = match found {
                Some((k, code)) => {
                    out.push(Hit { start: first.start, end: buf[head + k - 1].end, tag: Cow::Borrowed(Kind::from_code(code).tag()) });
                    k
                }
                None => 1,
            };
            head += k;
        }
    }
}

/// Where any of `tags` occurs in `text`, sorted: the walls that keep tags from being scanned.
pub fn tag_spans(text: &str, tags: &[impl AsRef<str>]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    for i in memchr::memchr_iter(b'[', text.as_bytes()) {
        if let Some(t) = tags.iter().map(AsRef::as_ref).find(|t| text[i..].starts_with(t)) {
            spans.push((i, i + t.len()));
        }
    }
    spans
}

/// Builds a dictionary from clear values, keeping only their hashes. Single-threaded; `freeze`
/// makes the shareable `Dictionary`.
pub struct DictionaryBuilder {
    key: Key,
    table: Table,
    starts: StartBits,
    pairs: PairSet,
    stop: HashSet<u64>,
    min_chars: usize,
}

/// One token of a value being added, as far as the rules need it.
struct ValueToken {
    hash: u64,
    sample: Sample,
    chars: usize,
    digits: bool,
}

impl DictionaryBuilder {
    /// A new, empty dictionary under the process's keys. Tokens of `stop_words` (folded) and the
    /// tags' words, and tokens shorter than `min_chars` characters, never become entries alone.
    pub fn new<'s>(stop_words: impl IntoIterator<Item = &'s str>, min_chars: usize) -> Self {
        let key = Key::of_process();
        let mut stop = HashSet::new();
        for w in stop_words.into_iter().chain(TAG_WORDS) {
            let mut t = Tokens::new(w);
            while let Some((_, _, f)) = t.next_token() {
                stop.insert(key.token(f));
            }
        }
        let (_, start_keys, pair_keys) = *process_keys();
        DictionaryBuilder { key, table: Table::with_slots(1024), starts: StartBits::new(start_keys), pairs: PairSet::new(pair_keys), stop, min_chars }
    }

    /// Entries so far (markers not counted).
    pub fn len(&self) -> usize {
        self.table.entries
    }

    pub fn is_empty(&self) -> bool {
        self.table.entries == 0
    }

    /// Adds the entry `hash`, a sequence whose first token's fold has `first` as its sample
    /// (`Start::Alone`: a sequence of that one token).
    fn entry(&mut self, hash: u64, first: Sample, start: Start, kind: Kind) -> usize {
        self.starts.insert(first, start);
        usize::from(self.table.insert(hash & HASH_BITS | kind as u64, Merge::KeepFirst))
    }

    /// Adds one clear value (it is folded, hashed and forgotten); returns the entries added.
    /// - the value's whole token sequence (first `MAX_TOKENS` tokens), unless its tokens are all
    ///   stop words or shorter than `min_chars` (then nothing at all is added);
    /// - `Name`: every token alone too ("Garcia-Lopez" also masks "Lopez");
    /// - all-digit values, and `Mrn`/`Ssn`/`Phone`: the tokens run together as one token
    ///   ("984-96-1001" also matches "984961001");
    /// - `Mrn`: its longest digit token alone when it has at least 4 digits.
    ///
    /// A sequence added twice keeps its first kind.
    pub fn add(&mut self, kind: Kind, value: &str) -> usize {
        let mut tokens = Tokens::new(value);
        let mut toks = Vec::new();
        // The clear tokens run together: used once below, then dropped with the call.
        let mut joined = Vec::new();
        while let Some((_, _, f)) = tokens.next_token() {
            let mut buf = [0; 16];
            let bytes = f.bytes(&mut buf);
            let chars = std::str::from_utf8(bytes).map_or(bytes.len(), |s| s.chars().count());
            let digits = bytes.iter().all(u8::is_ascii_digit);
            joined.extend_from_slice(bytes);
            toks.push(ValueToken { hash: self.key.token(f), sample: Sample::of_bytes(bytes), chars, digits });
        }
        let ignored = |t: &ValueToken| t.chars < self.min_chars || self.stop.contains(&t.hash);
        if toks.iter().all(ignored) {
            return 0;
        }
        let seq = &toks[..toks.len().min(MAX_TOKENS)];
        let whole = seq[1..].iter().fold(seq[0].hash, |h, t| self.key.extend(h, t.hash));
        // Each entry with its first token's sample and what that token starts (for the filters).
        let mut entries = vec![(whole, seq[0].sample, if seq.len() == 1 { Start::Alone } else { Start::Sequence })];
        if kind == Kind::Name {
            entries.extend(toks.iter().filter(|t| !ignored(t)).map(|t| (t.hash, t.sample, Start::Alone)));
        }
        if kind == Kind::Mrn {
            entries.extend(toks.iter().filter(|t| t.digits && t.chars >= 4).max_by_key(|t| t.chars).map(|t| (t.hash, t.sample, Start::Alone)));
        }
        if toks.len() > 1 && (toks.iter().all(|t| t.digits) || matches!(kind, Kind::Mrn | Kind::Ssn | Kind::Phone)) {
            let hash = self.key.token(Folded::of(&joined));
            if !self.stop.contains(&hash) {
                entries.push((hash, Sample::of_bytes(&joined), Start::Alone));
            }
        }
        if seq.len() > 1 {
            // The marker's token is the whole sequence's first token, in the filter already.
            self.table.insert(seq[0].hash & HASH_BITS | MARKER | seq.len() as u64, Merge::Max);
            self.pairs.insert(seq[0].sample, seq[1].sample);
        }
        entries.into_iter().map(|(h, first, start)| self.entry(h, first, start, kind)).sum()
    }

    /// Adds every entry and marker of `other`, which must share this builder's keys (every
    /// builder of the process does); returns the entries added, or None for other keys.
    pub fn absorb(&mut self, other: &DictionaryBuilder) -> Option<usize> {
        self.absorb_parts(&other.key, &other.table, &other.starts, &other.pairs)
    }

    /// `absorb` of a frozen dictionary, read in place (no copy of its table).
    pub fn absorb_frozen(&mut self, other: &Dictionary) -> Option<usize> {
        self.absorb_parts(&other.key, &other.table, &other.starts, &other.pairs)
    }

    fn absorb_parts(&mut self, key: &Key, table: &Table, starts: &StartBits, pairs: &PairSet) -> Option<usize> {
        if key.seeds != self.key.seeds || !starts.same_keys(&self.starts) || !pairs.same_keys(&self.pairs) {
            return None;
        }
        self.starts.absorb(starts);
        self.pairs.absorb(pairs);
        let before = self.table.entries;
        for s in table.occupied() {
            self.table.insert(s, if s & MARKER == 0 { Merge::KeepFirst } else { Merge::Max });
        }
        Some(self.table.entries - before)
    }

    /// The shareable dictionary, its table sized to the entries.
    pub fn freeze(mut self) -> Dictionary {
        let filter = self.starts.filter();
        let pair_filter = self.pairs.filter();
        Dictionary {
            key: self.key,
            table: self.table.compact(),
            starts: self.starts,
            filter,
            pairs: self.pairs,
            pair_filter,
            stop: self.stop,
            min_chars: self.min_chars,
        }
    }
}

/// A builder that adds to `d`: same key, stop words and minimum length, a copy of its entries.
impl From<&Dictionary> for DictionaryBuilder {
    fn from(d: &Dictionary) -> Self {
        DictionaryBuilder {
            key: d.key.clone(),
            table: d.table.clone(),
            starts: d.starts.clone(),
            pairs: d.pairs.clone(),
            stop: d.stop.clone(),
            min_chars: d.min_chars,
        }
    }
}

#[cfg(test)]
#[path = "dictionary_tests.rs"]
mod tests;
