//! The identifier dictionary's pair filter: which (first token, second token) pairs begin a
//! stored sequence of two tokens or more, as a keyed bitset read from the two tokens' fold
//! samples (no keyed hash of either token, no table read).
//!
//! Why: a token that starts sequences (an SSN's first group "164", a first name) is followed in
//! ordinary text by a token that continues none of them ("164/82, HR"). The scan asks this
//! filter before hashing the next tokens and probing the table for each longer sequence; a clear
//! bit is exact (every pair of every stored sequence sets its bit: no false negative), a set bit
//! sends the token on to the exact look-up.
//!
//! The builder keeps each pair as a 32-bit keyed hash (a lossy one: no clear value can be read
//! back), deduplicated; a frozen dictionary scans with a bitset sized to the pairs (about 1 bit
//! in 16 set).

use crate::masking::tokens::Sample;

/// The smallest bitset: 2^12 bits (512 bytes).
const MIN_LOG: u32 = 12;
/// The largest: 2^32 bits would be the full hash; 2^28 (32 MB) is past any real dictionary.
const MAX_LOG: u32 = 28;
/// Bits per pair in the frozen bitset (about 6% of other pairs pass).
const SPARSE: usize = 16;

/// The pairs of a builder (and of the frozen dictionary, so a builder started from it goes on).
#[derive(Clone)]
pub struct PairSet {
    keys: [u64; 3],
    hashes: Vec<u32>,
    /// `hashes` is sorted and deduplicated again when it reaches this length.
    dedup_at: usize,
}

/// The bitset a scan reads.
pub struct PairFilter {
    keys: [u64; 3],
    bits: Vec<u64>,
    shift: u32,
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The keyed 32-bit hash of a pair of samples. Order matters: the two sides are keyed apart.
#[inline]
fn pair_hash(keys: &[u64; 3], first: Sample, second: Sample) -> u32 {
    let side = |s: Sample, k: u64| (s.head ^ k) ^ (s.len as u64).rotate_right(6);
    (folded_multiply(side(first, keys[0]), side(second, keys[1])).wrapping_mul(keys[2] | 1) >> 32) as u32
}

impl PairSet {
    /// An empty set under `keys` (random per dictionary).
    pub fn new(keys: [u64; 3]) -> Self {
        PairSet { keys, hashes: Vec::new(), dedup_at: 1024 }
    }

    pub fn same_keys(&self, other: &PairSet) -> bool {
        self.keys == other.keys
    }

    /// Marks the pair of the first two tokens of a stored sequence.
    pub fn insert(&mut self, first: Sample, second: Sample) {
        self.hashes.push(pair_hash(&self.keys, first, second));
        if self.hashes.len() >= self.dedup_at {
            self.dedup();
        }
    }

    /// Adds every pair of `other` (same keys).
    pub fn absorb(&mut self, other: &PairSet) {
        self.hashes.extend_from_slice(&other.hashes);
        self.dedup();
    }

    /// Names repeat (20,000 patients, a few thousand distinct names): keep each hash once.
    fn dedup(&mut self) {
        self.hashes.sort_unstable();
        self.hashes.dedup();
        self.hashes.shrink_to_fit();
        self.dedup_at = (self.hashes.len() * 2).max(1024);
    }

    pub fn memory_bytes(&self) -> usize {
        self.hashes.capacity() * 4
    }

    /// The bitset a scan reads: 2^log bits with at most 1 in `SPARSE` set.
    pub fn filter(&mut self) -> PairFilter {
        self.dedup();
        let want = (self.hashes.len() * SPARSE).next_power_of_two();
        let log = want.trailing_zeros().clamp(MIN_LOG, MAX_LOG);
        let mut bits = vec![0u64; 1 << (log - 6)];
        for &h in &self.hashes {
            let i = (h >> (32 - log)) as usize;
            bits[i / 64] |= 1 << (i % 64);
        }
        PairFilter { keys: self.keys, bits, shift: 32 - log }
    }
}

impl PairFilter {
    /// False when no stored sequence starts with a token of sample `first` followed by one
    /// of sample `second`.
    #[inline]
    pub fn may_continue(&self, first: Sample, second: Sample) -> bool {
        self.has(self.index(first, second))
    }

    /// The bit `may_continue` reads for the pair: `prefetch` it, `has` it later (a batch of
    /// candidates waits for its bits together, not one after the other).
    #[inline]
    pub fn index(&self, first: Sample, second: Sample) -> usize {
        (pair_hash(&self.keys, first, second) >> self.shift) as usize
    }

    #[inline]
    pub fn prefetch(&self, i: usize) {
        crate::masking::prefetch(&self.bits[i / 64]);
    }

    #[inline]
    pub fn has(&self, i: usize) -> bool {
        self.bits[i / 64] >> (i % 64) & 1 == 1
    }

    pub fn memory_bytes(&self) -> usize {
        self.bits.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(word: &str) -> Sample {
        Sample::of_bytes(word.as_bytes())
    }

    #[test]
    fn stored_pairs_pass_and_few_others_do() {
        let mut p = PairSet::new(rand::random());
        for i in 0..5_000 {
            p.insert(sample(&format!("{}", 100 + i % 800)), sample(&format!("{:02}", i % 97)));
            // Repeats are kept once.
            p.insert(sample("daniel"), sample("harris"));
        }
        let f = p.filter();
        assert!(p.hashes.len() <= 5_001, "{} hashes", p.hashes.len());
        for i in 0..5_000 {
            assert!(f.may_continue(sample(&format!("{}", 100 + i % 800)), sample(&format!("{:02}", i % 97))));
        }
        assert!(f.may_continue(sample("daniel"), sample("harris")));
        let order = (0..1_000).filter(|i| f.may_continue(sample(&format!("{:02}", i % 97)), sample(&format!("{}", 100 + i % 800)))).count();
        assert!(order < 150, "{order} of 1,000 reversed pairs pass");
        let others = (0..10_000).filter(|i| f.may_continue(sample(&format!("{}", 100 + i % 800)), sample(&format!("w{i}")))).count();
        assert!(others < 1_000, "{others} of 10,000 other pairs pass");
        assert!(f.memory_bytes() <= 16 << 10, "{} bytes", f.memory_bytes());
    }

    #[test]
    fn an_empty_set_lets_nothing_through() {
        let f = PairSet::new(rand::random()).filter();
        assert!(!f.may_continue(sample("a"), sample("b")));
    }
}
