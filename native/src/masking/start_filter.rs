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

/// Which token fingerprints start an entry, at full resolution (builders; kept by the frozen
/// dictionary so a builder started from it continues exactly).
#[derive(Clone)]
pub struct StartBits {
    keys: [u64; 2],
    bits: Vec<u64>,
    /// The subset of `bits` set by tokens that are entries alone.
    alone: Vec<u64>,
}

/// The folded bitsets a scan reads (the same folding for both, so `alone` stays a subset).
pub struct StartFilter {
    keys: [u64; 2],
    bits: Vec<u64>,
    alone: Vec<u64>,
    shift: u32,
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

impl StartBits {
    /// An empty set under `keys` (random per dictionary, like the table's hash key).
    pub fn new(keys: [u64; 2]) -> Self {
        StartBits { keys, bits: vec![0; 1 << (FULL_LOG - 6)], alone: vec![0; 1 << (FULL_LOG - 6)] }
    }

    pub fn same_keys(&self, other: &StartBits) -> bool {
        self.keys == other.keys
    }

    /// Marks the token with this fold sample as one that starts an entry (`Start::Alone`: is
    /// one) or a longer sequence.
    pub fn insert(&mut self, s: Sample, start: Start) {
        let i = (fingerprint(&self.keys, s) >> (64 - FULL_LOG)) as usize;
        self.bits[i / 64] |= 1 << (i % 64);
        if start == Start::Alone {
            self.alone[i / 64] |= 1 << (i % 64);
        }
    }

    /// Adds every token of `other` (same keys).
    pub fn absorb(&mut self, other: &StartBits) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
        for (a, b) in self.alone.iter_mut().zip(&other.alone) {
            *a |= b;
        }
    }

    pub fn memory_bytes(&self) -> usize {
        (self.bits.capacity() + self.alone.capacity()) * 8
    }

    /// The filter a scan uses: the smallest sparse folding, or None when too dense to help.
    pub fn filter(&self) -> Option<StartFilter> {
        let ones: usize = self.bits.iter().map(|w| w.count_ones() as usize).sum();
        if ones * DENSE > 1 << FULL_LOG {
            return None;
        }
        for log in MIN_LOG..=FULL_LOG {
            let f = self.folded(log);
            let ones: usize = f.bits.iter().map(|w| w.count_ones() as usize).sum();
            if ones * SPARSE <= 1 << log || log == FULL_LOG {
                return Some(f);
            }
        }
        unreachable!("the full size is always accepted")
    }

    /// The bitset of 2^log bits: bit i is set when any full-resolution bit whose index has
    /// `i` as its top `log` bits is (the index is the fingerprint's top bits at every size).
    fn folded(&self, log: u32) -> StartFilter {
        StartFilter { keys: self.keys, bits: fold(&self.bits, log), alone: fold(&self.alone, log), shift: 64 - log }
    }
}

/// `bits` (2^FULL_LOG of them) folded to 2^log.
fn fold(full: &[u64], log: u32) -> Vec<u64> {
    let mut bits = vec![0u64; (1usize << log).div_ceil(64)];
    let drop = FULL_LOG - log;
    for (w, &word) in full.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let i = (w * 64 + word.trailing_zeros() as usize) >> drop;
            bits[i / 64] |= 1 << (i % 64);
            word &= word - 1;
        }
    }
    bits
}

#[cfg(test)]
impl StartBits {
    /// The folding to 2^log bits whatever its density (tests exercise every size).
    pub(crate) fn folded_for_tests(&self, log: u32) -> StartFilter {
        self.folded(log.clamp(MIN_LOG, FULL_LOG))
    }

    /// A filter every token passes, as an entry alone (as if the set were full).
    pub(crate) fn everything_for_tests(&self) -> StartFilter {
        StartFilter { keys: self.keys, bits: vec![u64::MAX; 1 << (MIN_LOG - 6)], alone: vec![u64::MAX; 1 << (MIN_LOG - 6)], shift: 64 - MIN_LOG }
    }

    /// A filter every token passes, only the real entries alone as such: every other token
    /// goes through the pair filter.
    pub(crate) fn every_start_for_tests(&self) -> StartFilter {
        StartFilter { bits: vec![u64::MAX; 1 << (FULL_LOG - 6)], ..self.folded(FULL_LOG) }
    }
}

impl StartFilter {
    /// False when no entry or longer sequence starts with a token of this fold sample.
    #[inline(always)]
    pub fn may_start(&self, s: Sample) -> bool {
        let i = (fingerprint(&self.keys, s) >> self.shift) as usize;
        debug_assert!(i / 64 < self.bits.len());
        // SAFETY: `shift` is 64 - log and `bits` has 2^log bits, so `i` (the fingerprint's top
        // log bits) indexes a bit inside it. The bounds check costs a compare and a branch on
        // every token of the text.
        let word = unsafe { *self.bits.get_unchecked(i / 64) };
        word >> (i % 64) & 1 == 1
    }

    /// What a token that passed `may_start` may start: `Start::Sequence` means it is certainly
    /// no entry alone.
    #[inline]
    pub fn start(&self, s: Sample) -> Start {
        let i = (fingerprint(&self.keys, s) >> self.shift) as usize;
        if self.alone[i / 64] >> (i % 64) & 1 == 1 {
            Start::Alone
        } else {
            Start::Sequence
        }
    }

    pub fn memory_bytes(&self) -> usize {
        (self.bits.capacity() + self.alone.capacity()) * 8
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
        assert!(f.memory_bytes() <= 8192, "a few hundred tokens fold small: {} bytes", f.memory_bytes());
        for log in MIN_LOG..=FULL_LOG {
            let f = s.folded(log);
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
}
