//! The identifier dictionary's start filter: a small keyed bitset that says, from a cheap
//! sample of a token (its first 8 folded bytes and its length), "this token cannot
//! start any entry", so that most tokens of ordinary text skip the keyed hash and the table.
//!
//! Every token that starts an entry or a longer sequence sets its bit when the value is added;
//! a token whose bit is clear cannot be the first token of anything stored (no false negative).
//! A set bit only sends the token to the exact look-up. A second bitset of the same shape marks
//! the tokens that are entries alone: a token that passes the first but not the second can only
//! start a multi-token sequence, so the scan asks the pair filter (pair_filter.rs) about the
//! token after it before hashing anything (a 3-digit dose is an SSN's first group, rarely its
//! first two groups).
//!
//! Each class (numbers, everything else: `CLASSES`) also keeps the length of its shortest
//! start: a token of one or two bytes shorter than that is ruled out by its length alone, which
//! the walk applies to a whole block of tokens at once (`trim`).
//!
//! The builder keeps the bitsets at full resolution; a frozen dictionary scans with them folded
//! down to the smallest size that stays sparse (a few hundred names fit in 4 KB), or without a
//! filter when even the full size is mostly ones (millions of tokens: then the batched,
//! prefetched scan is faster).

use crate::masking::tokens::Sample;

/// Full resolution: 2^21 bits (256 KB per bitset), so that a dictionary with tens of thousands
/// of starting tokens (20,000 SSNs run together) still has a sparse filter.
const FULL_LOG: u32 = 21;
/// The smallest folded size: 2^12 bits (512 bytes, 8 cache lines).
const MIN_LOG: u32 = 12;
/// A folded size is chosen when at most 1 bit in 64 is set: about 1.5% of the tokens of
/// ordinary text go on to the keyed hash and the table (at 1 in 16, a 1 KB note sent half a
/// dozen tokens there for nothing).
const SPARSE: usize = 64;
/// Beyond 1 bit in 4 set at full resolution the filter is not used.
const DENSE: usize = 4;
/// Tokens shorter than every start of their class are ruled out by length alone, up to this
/// length: a token of one or two bytes is told by a shift of the block's end mask, so the walk
/// drops them all at once per block, before any bitset is read (ordinary text is about one
/// token in three of one or two bytes: "of", "mg", "BP", the digits of "36.7").
const SHORT: usize = 3;

/// Tokens are kept in two classes, each in bitsets of its own: those whose first folded byte
/// is a digit and all others. A dictionary with tens of thousands of numbers (SSNs and phone
/// numbers run together, MRNs) needs a large sparse bitset for them, but the words of ordinary
/// text (four tokens in five) then read a small one that stays in the CPU's cache: on a masked
/// bulk read, waiting for the one large bitset was half of the walk's time.
const CLASSES: usize = 2;

/// The class of a sample: 1 when its first folded byte is an ASCII digit.
#[inline(always)]
fn class_of(s: Sample) -> usize {
    usize::from((s.head as u8).wrapping_sub(b'0') < 10)
}

/// Which token fingerprints start an entry, at full resolution (builders; kept by the frozen
/// dictionary so a builder started from it continues exactly), per class: the bit indexes
/// set, not the bitsets (2^21 bits each would be a megabyte per dictionary however small).
#[derive(Clone)]
pub struct StartBits {
    keys: [u64; 2],
    /// Per class: the index of every start, and of those set by tokens that are entries alone.
    bits: [Indexes; CLASSES],
    alone: [Indexes; CLASSES],
    /// Per class: the length in bytes of its shortest start (usize::MAX: none yet).
    shortest: [usize; CLASSES],
}

/// Full-resolution bit indexes, deduplicated whenever they doubled since the last time.
#[derive(Clone, Default)]
struct Indexes {
    set: Vec<u32>,
    distinct: usize,
}

impl Indexes {
    fn insert(&mut self, i: u32) {
        self.set.push(i);
        if self.set.len() >= 2 * self.distinct + 1024 {
            self.compact();
        }
    }

    fn compact(&mut self) {
        self.set.sort_unstable();
        self.set.dedup();
        self.distinct = self.set.len();
    }

    fn absorb(&mut self, other: &Indexes) {
        self.set.extend_from_slice(&other.set);
        self.compact();
    }

    /// The bitset of 2^log bits: bit j is set when an index has `j` as its top `log` bits.
    fn fold(&self, log: u32) -> Vec<u64> {
        let mut bits = vec![0u64; (1usize << log).div_ceil(64)];
        let drop = FULL_LOG - log;
        for &i in &self.set {
            let j = (i >> drop) as usize;
            bits[j / 64] |= 1 << (j % 64);
        }
        bits
    }
}

/// One class's folded bitsets (the same folding for both, so `alone` stays a subset).
struct Part {
    bits: Vec<u64>,
    alone: Vec<u64>,
    shift: u32,
    /// Tokens of fewer bytes start nothing in this class (at most `SHORT`).
    min_len: usize,
}

/// The folded bitsets a scan reads, per class.
pub struct StartFilter {
    keys: [u64; 2],
    parts: [Part; CLASSES],
    /// `min_len` as the walk's block masks: all ones where a class rules out one-byte
    /// (`[0]`) or two-byte (`[1]`) tokens, per class.
    short: [[u64; 2]; CLASSES],
}

/// What a token may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// An entry of this one token (and maybe longer sequences too).
    Alone,
    /// Only sequences of two tokens or more.
    Sequence,
}

/// The keyed fingerprint of a sample: multiply-shift of the mixed sample, so its top bits are
/// the bitset index at any size.
#[inline(always)]
fn fingerprint(keys: &[u64; 2], s: Sample) -> u64 {
    // The length only tells tokens of more than 8 bytes apart (shorter heads are zero-padded).
    ((s.head ^ keys[0]) ^ (s.len as u64).rotate_right(6)).wrapping_mul(keys[1] | 1)
}

fn ones(bits: &[u64]) -> usize {
    bits.iter().map(|w| w.count_ones() as usize).sum()
}

impl StartBits {
    /// An empty set under `keys` (random per dictionary, like the table's hash key).
    pub fn new(keys: [u64; 2]) -> Self {
        StartBits { keys, bits: Default::default(), alone: Default::default(), shortest: [usize::MAX; CLASSES] }
    }

    pub fn same_keys(&self, other: &StartBits) -> bool {
        self.keys == other.keys
    }

    /// Marks the token with this fold sample as one that starts an entry (`Start::Alone`: is
    /// one) or a longer sequence.
    pub fn insert(&mut self, s: Sample, start: Start) {
        let c = class_of(s);
        let i = (fingerprint(&self.keys, s) >> (64 - FULL_LOG)) as u32;
        self.bits[c].insert(i);
        self.shortest[c] = self.shortest[c].min(s.len);
        if start == Start::Alone {
            self.alone[c].insert(i);
        }
    }

    /// Adds every token of `other` (same keys).
    pub fn absorb(&mut self, other: &StartBits) {
        for c in 0..CLASSES {
            self.bits[c].absorb(&other.bits[c]);
            self.alone[c].absorb(&other.alone[c]);
            self.shortest[c] = self.shortest[c].min(other.shortest[c]);
        }
    }

    pub fn memory_bytes(&self) -> usize {
        (0..CLASSES).map(|c| (self.bits[c].set.capacity() + self.alone[c].set.capacity()) * 4).sum()
    }

    /// The filter a scan uses: per class the smallest sparse folding, or None when a class is
    /// too dense to help.
    pub fn filter(&self) -> Option<StartFilter> {
        let full: Vec<usize> = self.bits.iter().map(|b| ones(&b.fold(FULL_LOG))).collect();
        if full.iter().any(|&n| n * DENSE > 1 << FULL_LOG) {
            return None;
        }
        let part = |c: usize| {
            for log in MIN_LOG..=FULL_LOG {
                let p = self.folded_part(c, log);
                if ones(&p.bits) * SPARSE <= 1 << log || log == FULL_LOG {
                    return p;
                }
            }
            unreachable!("the full size is always accepted")
        };
        Some(StartFilter::of_parts(self.keys, [part(0), part(1)]))
    }

    /// Class `c`'s bitsets of 2^log bits: bit i is set when any full-resolution bit whose
    /// index has `i` as its top `log` bits is (the index is the fingerprint's top bits at
    /// every size).
    fn folded_part(&self, c: usize, log: u32) -> Part {
        Part { bits: self.bits[c].fold(log), alone: self.alone[c].fold(log), shift: 64 - log, min_len: self.shortest[c].min(SHORT) }
    }
}

#[cfg(test)]
impl StartBits {
    /// The folding of both classes to 2^log bits whatever their density (tests exercise every
    /// size).
    pub(crate) fn folded_for_tests(&self, log: u32) -> StartFilter {
        let log = log.clamp(MIN_LOG, FULL_LOG);
        StartFilter::of_parts(self.keys, [self.folded_part(0, log), self.folded_part(1, log)])
    }

    /// A filter every token passes, as an entry alone (as if the set were full).
    pub(crate) fn everything_for_tests(&self) -> StartFilter {
        let full = || Part { bits: vec![u64::MAX; 1 << (MIN_LOG - 6)], alone: vec![u64::MAX; 1 << (MIN_LOG - 6)], shift: 64 - MIN_LOG, min_len: 0 };
        StartFilter::of_parts(self.keys, [full(), full()])
    }

    /// A filter every token passes, only the real entries alone as such: every other token
    /// goes through the pair filter.
    pub(crate) fn every_start_for_tests(&self) -> StartFilter {
        let part = |c: usize| Part { bits: vec![u64::MAX; 1 << (FULL_LOG - 6)], min_len: 0, ..self.folded_part(c, FULL_LOG) };
        StartFilter::of_parts(self.keys, [part(0), part(1)])
    }
}

/// What the token walk reads of a filter, copied out once per block: each token's class picks
/// its shift and bitset with conditional moves, where `may_start` loads them from the class's
/// part, two loads whose address waits for the class on every token's chain (class -> shift
/// -> bit index -> filter word).
#[derive(Clone, Copy)]
pub struct Probe<'f> {
    keys: [u64; 2],
    word_shift: u32,
    digit_shift: u32,
    word_bits: &'f [u64],
    digit_bits: &'f [u64],
}

impl Probe<'_> {
    /// The same answer as `StartFilter::may_start` for the tokens the walk asks about: those
    /// `StartFilter::trim` left, which pass its length rule (this one reads the bitsets only).
    #[inline(always)]
    pub fn may_start(&self, s: Sample) -> bool {
        let digit = class_of(s) == 1;
        let shift = if digit { self.digit_shift } else { self.word_shift };
        let bits = if digit { self.digit_bits.as_ptr() } else { self.word_bits.as_ptr() };
        let i = (fingerprint(&self.keys, s) >> shift) as usize;
        debug_assert!(i / 64 < if digit { self.digit_bits.len() } else { self.word_bits.len() });
        // SAFETY: as in `StartFilter::may_start`: `i` has the part's `log` bits and its bitset
        // 2^log bits.
        let word = unsafe { *bits.add(i / 64) };
        word >> (i % 64) & 1 == 1
    }
}

impl StartFilter {
    fn of_parts(keys: [u64; 2], parts: [Part; CLASSES]) -> Self {
        let all = |rule: bool| if rule { u64::MAX } else { 0 };
        let short = [0, 1].map(|c| [all(parts[c].min_len > 1), all(parts[c].min_len > 2)]);
        StartFilter { keys, parts, short }
    }

    /// The part of a sample's class and its bit index there (the same index in `bits` and
    /// `alone`).
    #[inline(always)]
    fn bit(&self, s: Sample) -> (&Part, usize) {
        let p = &self.parts[class_of(s)];
        (p, (fingerprint(&self.keys, s) >> p.shift) as usize)
    }

    /// False when no entry or longer sequence starts with a token of this fold sample.
    #[inline(always)]
    pub fn may_start(&self, s: Sample) -> bool {
        let (p, i) = self.bit(s);
        if s.len < p.min_len {
            return false;
        }
        debug_assert!(i / 64 < p.bits.len());
        // SAFETY: `shift` is 64 - log and `bits` has 2^log bits, so `i` (the fingerprint's top
        // log bits) indexes a bit inside it. The bounds check costs a compare and a branch on
        // every token of the text.
        let word = unsafe { *p.bits.get_unchecked(i / 64) };
        word >> (i % 64) & 1 == 1
    }

    /// A block's token starts and ends (bit j: byte j) without the tokens of one and two
    /// bytes `may_start` rules out by length (`digits`: the block's ASCII digits, which tell a
    /// token's class from its first byte). A token of one byte at j has its end at j + 1, one
    /// of two bytes at j + 2 (its second byte is a letter or digit, or there would be an end
    /// at j + 1); a token that runs past the block has no end in it and stays.
    #[inline(always)]
    pub fn trim(&self, starts: u64, ends: u64, digits: u64) -> (u64, u64) {
        let [[word_one, word_two], [digit_one, digit_two]] = self.short;
        let one = starts & (ends >> 1) & (digits & digit_one | !digits & word_one);
        let two = starts & (ends >> 2) & (digits & digit_two | !digits & word_two);
        (starts & !(one | two), ends & !(one << 1 | two << 2))
    }

    /// The filter as the token walk reads it.
    #[inline(always)]
    pub fn probe(&self) -> Probe<'_> {
        let [word, digit] = &self.parts;
        Probe { keys: self.keys, word_shift: word.shift, digit_shift: digit.shift, word_bits: &word.bits, digit_bits: &digit.bits }
    }

    /// What a token that passed `may_start` may start: `Start::Sequence` means it is certainly
    /// no entry alone.
    #[inline]
    pub fn start(&self, s: Sample) -> Start {
        let (p, i) = self.bit(s);
        if p.alone[i / 64] >> (i % 64) & 1 == 1 {
            Start::Alone
        } else {
            Start::Sequence
        }
    }

    /// Asks the CPU to fetch the word of the `alone` bitset `start` will read for `s`: a
    /// candidate's `start` comes a batch later, and with tens of thousands of numbers stored
    /// that bitset is too large to stay in cache between rows.
    #[inline]
    pub fn prefetch_start(&self, s: Sample) {
        let (p, i) = self.bit(s);
        crate::masking::prefetch(&p.alone[i / 64]);
    }

    pub fn memory_bytes(&self) -> usize {
        self.parts.iter().map(|p| (p.bits.capacity() + p.alone.capacity()) * 8).sum()
    }

    /// Bytes of the bitset the words of ordinary text read (class "not a digit").
    #[cfg(test)]
    pub(crate) fn word_bytes(&self) -> usize {
        self.parts[0].bits.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masking::tokens::Sample;

    fn sample(word: &str) -> Sample {
        Sample::of_bytes(word.as_bytes())
    }

    #[test]
    fn inserted_tokens_pass_at_every_size_and_few_others_do() {
        let mut s = StartBits::new(rand::random());
        let words: Vec<String> = (0..300).map(|i| format!("name{i}")).collect();
        for (i, w) in words.iter().enumerate() {
            s.insert(sample(w), if i % 2 == 0 { Start::Alone } else { Start::Sequence });
        }
        let f = s.filter().expect("300 tokens are sparse");
        assert!(f.memory_bytes() <= 10_240, "a few hundred tokens fold small: {} bytes", f.memory_bytes());
        for log in MIN_LOG..=FULL_LOG {
            let f = s.folded_for_tests(log);
            assert!(words.iter().all(|w| f.may_start(sample(w))), "no false negative at 2^{log} bits");
            assert!(words.iter().step_by(2).all(|w| f.start(sample(w)) == Start::Alone), "entries alone stay alone at 2^{log} bits");
        }
        let others = (0..10_000).filter(|i| f.may_start(sample(&format!("word{i}")))).count();
        assert!(others < 400, "{others} of 10,000 other tokens pass");
    }

    #[test]
    fn a_saturated_set_turns_the_filter_off() {
        let mut s = StartBits::new(rand::random());
        assert!(s.filter().is_some(), "empty: every token is ruled out");
        for i in 0..1_000_000 {
            s.insert(sample(&format!("t{i}")), Start::Alone);
        }
        assert!(s.filter().is_none());
    }

    #[test]
    fn numbers_do_not_grow_the_bitset_words_read() {
        let mut s = StartBits::new(rand::random());
        for i in 0..300 {
            s.insert(sample(&format!("name{i}")), Start::Alone);
        }
        let small = s.filter().expect("sparse").word_bytes();
        for i in 0..30_000u32 {
            // Eight digits: a sample reads a token's first eight bytes only.
            s.insert(sample(&format!("{}", 10_000_000 + i * 7)), Start::Alone);
        }
        let f = s.filter().expect("sparse");
        assert_eq!(f.word_bytes(), small, "30,000 numbers leave the words' bitset as it was");
        assert!(f.may_start(sample("10000007")) && f.may_start(sample("name7")));
        // How many other numbers pass depends on the keys: one multiply mixes digit strings
        // that differ in their last bytes unevenly (over 300 draws: median 1.2%, 1 in 100 over
        // 4.5%, worst 10%). The median of nine draws is what a filter of numbers does.
        let mut passed: Vec<usize> = (0..9)
            .map(|_| {
                let mut s = StartBits::new(rand::random());
                for i in 0..30_000u32 {
                    s.insert(sample(&format!("{}", 10_000_000 + i * 7)), Start::Alone);
                }
                let f = s.filter().expect("sparse");
                (0..10_000).filter(|i| f.may_start(sample(&format!("{}", 20_000_000 + i)))).count()
            })
            .collect();
        passed.sort_unstable();
        assert!(passed[4] < 400, "a median {} of 10,000 other numbers pass ({passed:?})", passed[4]);
    }

    /// The tokens of `text` (at most 64 bytes) a block of the walk reads after `trim`.
    fn trimmed(f: &StartFilter, text: &str) -> Vec<String> {
        let mut block = [0u8; 64];
        block[..text.len()].copy_from_slice(text.as_bytes());
        let m = crate::masking::tokens::masks::scalar(&block);
        let (mut starts, mut ends) = f.trim(m.word & !(m.word << 1), !m.word & (m.word << 1), m.digits);
        let mut out = vec![];
        while ends != 0 {
            let (s, e) = (starts.trailing_zeros() as usize, ends.trailing_zeros() as usize);
            out.push(text[s..e].to_string());
            (starts, ends) = (starts & (starts - 1), ends & (ends - 1));
        }
        out
    }

    #[test]
    fn tokens_shorter_than_every_start_of_their_class_are_ruled_out() {
        // Words start at three letters at the shortest, numbers at one digit (a house number).
        let mut s = StartBits::new(rand::random());
        s.insert(sample("lee"), Start::Alone);
        s.insert(sample("5"), Start::Sequence);
        let f = s.filter().expect("sparse");
        assert!(!f.may_start(sample("le")) && !f.may_start(sample("l")), "shorter than every word start");
        assert!(f.may_start(sample("lee")) && f.may_start(sample("5")));
        assert_eq!(trimmed(&f, "a of lee 5 12 xy BP 120 I"), ["lee", "5", "12", "120"], "one- and two-byte words dropped");
        // A token running past the block has no end in it: it stays, for the next block to read
        // whole, however short its part in this block ("qq" and "a" at the block's last bytes).
        for (at, len) in [(62, 2), (63, 1)] {
            let mut block = [b'q'; 64];
            block[at - 1] = b' ';
            block[..at - 1].fill(b' ');
            block[0] = b'x';
            let m = crate::masking::tokens::masks::scalar(&block);
            let (starts, ends) = f.trim(m.word & !(m.word << 1), !m.word & (m.word << 1), m.digits);
            assert_eq!((starts, ends), (1 << at, 0), "the {len} letters at the block's end stay; the lone x goes");
        }
        // Two-letter words start entries now; one letter still does not. Numbers: three digits.
        let mut s = StartBits::new(rand::random());
        s.insert(sample("wu"), Start::Alone);
        s.insert(sample("984"), Start::Sequence);
        let f = s.filter().expect("sparse");
        assert_eq!(trimmed(&f, "a of lee 5 12 xy BP 120 I"), ["of", "lee", "xy", "BP", "120"]);
        // Numbers of two digits running past the block stay too.
        let mut block = [b' '; 64];
        block[62..].copy_from_slice(b"12");
        let m = crate::masking::tokens::masks::scalar(&block);
        assert_eq!(f.trim(m.word & !(m.word << 1), !m.word & (m.word << 1), m.digits), (1 << 62, 0));
        // Filters that pass every token rule none out by length.
        for all in [s.everything_for_tests(), s.every_start_for_tests()] {
            assert_eq!(trimmed(&all, "a of 5 12"), ["a", "of", "5", "12"]);
            assert!(all.may_start(sample("a")));
        }
    }
}
