//! The identifier dictionary's walk over the tokens of a window, stopping only at candidates:
//! tokens the start filter lets through (start_filter.rs). Nearly every token of ordinary text
//! is skipped here, so this loop is the dictionary's main per-row cost.
//!
//! A block of 64 ASCII bytes becomes two bit masks (token starts, token ends) once, and the
//! walk keeps them between calls: each token costs a few bit operations, one load of its first
//! 8 bytes and one bit of the filter. Tokens of one or two bytes that cannot start anything of
//! their class (`StartFilter::trim`) leave the masks before the loop, a few operations for the
//! whole block (with names and SSNs in the dictionary, a third of clinical text's tokens: "of",
//! "mg", the "7" of "36.7"). Candidates are collected a batch at a time, so the walk's state
//! stays in registers across many blocks; the block masks come from AVX2 where the CPU
//! has it (the walk is compiled twice). Blocks with a non-ASCII byte, and tokens of 64 bytes or
//! more, go through `Tokens` (folded char by char, sampled from the fold; both paths give the
//! same sample for the same fold).

use crate::masking::start_filter::{Probe, StartFilter};
use crate::masking::tokens::masks::{self, Masks};
use crate::masking::tokens::{ascii_fold_short, Folded, Sample, Tokens, FOLD, KEEP};

/// The bytes of the head of a token of `len` < 64 bytes: its first min(len, 8).
const KEEP_BLOCK: [u64; 64] = {
    let mut keep = [u64::MAX; 64];
    let mut len = 0;
    while len < 8 {
        keep[len] = KEEP[len];
        len += 1;
    }
    keep
};

/// A token the start filter let through.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub start: usize,
    pub end: usize,
    pub sample: Sample,
    /// ASCII letters and digits only: its fold is read from the text in place.
    pub ascii: bool,
}

/// What an empty slot of a batch holds.
pub const NO_CANDIDATE: Candidate = Candidate { start: 0, end: 0, sample: Sample { head: 0, len: 0 }, ascii: true };

pub struct Cursor<'a> {
    text: &'a str,
    from: usize,
    to: usize,
    /// The ASCII block being read: its first byte, and the token starts and ends (bit j: byte
    /// `base + j`) not read yet.
    base: usize,
    starts: u64,
    ends: u64,
    /// Where the next block starts once this one is read (never inside a token).
    next: usize,
    /// The general path, and folds of tokens that are not short ASCII; made the first time
    /// one is needed (most windows have none).
    tokens: Option<Tokens<'a>>,
}

impl<'a> Cursor<'a> {
    /// The tokens of `text[from..to]` (both char boundaries).
    pub fn within(text: &'a str, from: usize, to: usize) -> Self {
        Cursor { text, from, to, base: from, starts: 0, ends: 0, next: from, tokens: None }
    }

    fn tokens(&mut self) -> &mut Tokens<'a> {
        let (text, from, to) = (self.text, self.from, self.to);
        self.tokens.get_or_insert_with(|| Tokens::within(text, from, to))
    }

    /// Fills `out` with the next candidates; fewer than `out.len()` only at the end of the window.
    #[inline(never)]
    pub fn fill(&mut self, filter: &StartFilter, out: &mut [Candidate]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("bmi1") && std::arch::is_x86_feature_detected!("bmi2") {
            // SAFETY: the CPU has AVX2, BMI1 and BMI2.
            return unsafe { self.fill_bmi(filter, out) };
        }
        self.fill_with(filter, out, masks::of, |head, len| head & KEEP[len.min(8)])
    }

    /// `fill` compiled for AVX2, BMI1 and BMI2 as a whole (x86_64 CPUs of the last decade): the
    /// token loop's bit clearing, shifts and head masking take one instruction each.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,bmi1,bmi2")]
    unsafe fn fill_bmi(&mut self, filter: &StartFilter, out: &mut [Candidate]) -> usize {
        // SAFETY: this function only runs where the CPU has AVX2. `keep` is only called by
        // `drain` with the length of a token inside a 64-byte block (end - start, both bit
        // indexes of the block's masks), so `len` < 64 indexes `KEEP_BLOCK`: one AND with a
        // table entry, where clamping the length for `bzhi` took four instructions a token.
        self.fill_with(filter, out, |b| unsafe { masks::of_avx2(b) }, |head, len| {
            debug_assert!(len < 64);
            head & unsafe { *KEEP_BLOCK.get_unchecked(len) }
        })
    }

    /// `keep(head, len)`: the first min(len, 8) bytes of `head`.
    #[inline(always)]
    fn fill_with(
        &mut self,
        filter: &StartFilter,
        out: &mut [Candidate],
        block_masks: impl Fn(&[u8; 64]) -> Masks,
        keep: impl Fn(u64, usize) -> u64,
    ) -> usize {
        let b = self.text.as_bytes();
        let mut n = 0;
        loop {
            if self.starts != 0 {
                // The 8 bytes at any token start of the block are in the text, but for the last
                // block or so: that one is read from a zero-padded copy (bytes past the text read
                // as zero, as `tokens::load8` reads them), so no load checks its bounds.
                let base = self.base;
                let padded: [u8; 64 + 8];
                let block = if base + 64 + 8 <= b.len() {
                    &b[base..base + 64 + 8]
                } else {
                    padded = {
                        let mut p = [0u8; 64 + 8];
                        p[..b.len() - base].copy_from_slice(&b[base..]);
                        p
                    };
                    &padded[..]
                };
                // The filter's keys, shifts and bitsets in registers for the block.
                let probe = filter.probe();
                let block = block.as_ptr();
                // SAFETY: `block` has 64 + 8 bytes and `s` < 64.
                let before = n;
                n = self.drain(&probe, out, n, |s| u64::from_le(unsafe { block.add(s).cast::<u64>().read_unaligned() }), &keep);
                // What each candidate may start is read a batch later: its word asked for now.
                for c in &out[before..n] {
                    filter.prefetch_start(c.sample);
                }
                if n == out.len() {
                    return n;
                }
                if self.starts != 0 {
                    // The last token runs past the block: the next block starts at it, or (64
                    // bytes or longer) the general path reads it.
                    let s = self.starts.trailing_zeros() as usize;
                    self.starts = 0;
                    if s > 0 {
                        self.next = self.base + s;
                    } else {
                        match self.general_into(self.base, filter, out, n) {
                            Some(m) if m < out.len() => n = m,
                            end => return end.unwrap_or(n),
                        }
                    }
                }
            }
            let pos = self.next;
            if pos >= self.to {
                return n;
            }
            let Masks { word, high, digits } = if pos + 64 <= self.to {
                block_masks(b[pos..pos + 64].try_into().expect("64 bytes"))
            } else {
                let mut tail = [0u8; 64];
                tail[..self.to - pos].copy_from_slice(&b[pos..self.to]);
                block_masks(&tail)
            };
            if high != 0 {
                match self.general_into(pos, filter, out, n) {
                    Some(m) if m < out.len() => n = m,
                    end => return end.unwrap_or(n),
                }
                continue;
            }
            // `pos` is never inside a token, so bit 0 needs no carry from the byte before. The
            // tokens too short to start anything of their class never reach the filter.
            self.base = pos;
            (self.starts, self.ends) = filter.trim(word & !(word << 1), !word & (word << 1), digits);
            self.next = (pos + 64).min(self.to);
        }
    }

    /// Reads the block's tokens into `out` from `out[n]` on, until it is full or the block is
    /// read; a token that runs past the block is left in `starts`. `load(s)`: the 8 bytes at
    /// the block's byte `s`, zero-padded. Returns the new `n`.
    #[inline(always)]
    fn drain(&mut self, filter: &Probe<'_>, out: &mut [Candidate], mut n: usize, load: impl Fn(usize) -> u64, keep: impl Fn(u64, usize) -> u64) -> usize {
        // In registers for the loop, written back once.
        let (mut starts, mut ends, base) = (self.starts, self.ends, self.base);
        // Every end has its start before it in the block (the block starts outside a token),
        // so the ends alone say when the block's whole tokens are read.
        while ends != 0 {
            let (s, e) = (starts.trailing_zeros() as usize, ends.trailing_zeros() as usize);
            starts &= starts - 1;
            ends &= ends - 1;
            let sample = Sample { head: keep(load(s) | FOLD, e - s), len: e - s };
            if filter.may_start(sample) {
                out[n] = Candidate { start: base + s, end: base + e, sample, ascii: true };
                n += 1;
                if n == out.len() {
                    break;
                }
            }
        }
        (self.starts, self.ends) = (starts, ends);
        n
    }

    /// `general`, its candidate (if the filter passes it) written to `out[n]`: the new `n`, or
    /// None at the end of the window.
    fn general_into(&mut self, pos: usize, filter: &StartFilter, out: &mut [Candidate], n: usize) -> Option<usize> {
        Some(match self.general(pos, filter)? {
            Some(c) => {
                out[n] = c;
                n + 1
            }
            None => n,
        })
    }

    /// The first token at or after `pos` through `Tokens`: None at the end of the window,
    /// Some(None) when the filter rules it out (the walk goes on after it).
    #[inline(never)]
    fn general(&mut self, pos: usize, filter: &StartFilter) -> Option<Option<Candidate>> {
        let (start, end, f) = self.tokens().token_at(pos)?;
        let sample = Sample::of(f);
        self.next = end;
        Some(filter.may_start(sample).then_some(Candidate { start, end, sample, ascii: false }))
    }

    /// The fold of candidate `c`.
    #[inline]
    pub fn fold(&mut self, c: &Candidate) -> Folded<'_> {
        if c.ascii && c.end - c.start <= 16 {
            return Folded::Short(ascii_fold_short(self.text.as_bytes(), c.start, c.end));
        }
        self.tokens().fold_at(c.start, c.end, c.ascii)
    }

    /// Goes on at `pos` (not inside a token, past the last candidate returned).
    pub fn skip_to(&mut self, pos: usize) {
        (self.starts, self.ends, self.next) = (0, 0, pos.min(self.to));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masking::start_filter::StartBits;
    use proptest::prelude::*;

    /// A window of `s` from two arbitrary numbers: both ends on char boundaries, in order.
    fn window(s: &str, cut: (u16, u16)) -> (usize, usize) {
        let bounds: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
        let (a, b) = (bounds[cut.0 as usize % bounds.len()], bounds[cut.1 as usize % bounds.len()]);
        (a.min(b), a.max(b))
    }

    proptest! {
        /// With a filter every token passes, the walk finds exactly the tokens `Tokens` finds,
        /// each with the sample and the fold of its own fold, in any window; a token ruled out
        /// is skipped without losing the tokens after it.
        #[test]
        fn the_walk_finds_every_token_with_its_sample_and_fold(
            s in "([a-zA-Z0-9]{1,20}|[a-z]{60,70}|[ .,'-]{1,3}|é|Ü|\u{308}|ß|İ|ﹲ|½|\\PC){0,60}",
            cut in any::<(u16, u16)>(),
        ) {
            let (from, to) = window(&s, cut);
            let mut want = vec![];
            let mut t = Tokens::within(&s, from, to);
            while let Some((start, end, f)) = t.next_token() {
                want.push((start, end, Sample::of(f), f.bytes(&mut [0; 16]).to_vec()));
            }
            let all = StartBits::new(rand::random()).everything_for_tests();
            for portable in [false, true] {
                let mut c = Cursor::within(&s, from, to);
                let mut got = vec![];
                let mut batch = [NO_CANDIDATE; 3];
                loop {
                    // The path this CPU takes, and the one without AVX2 and BMI2.
                    let n = if portable {
                        c.fill_with(&all, &mut batch, crate::masking::tokens::masks::scalar, |head, len| head & KEEP[len.min(8)])
                    } else {
                        c.fill(&all, &mut batch)
                    };
                    for k in &batch[..n] {
                        let fold = c.fold(k).bytes(&mut [0; 16]).to_vec();
                        got.push((k.start, k.end, k.sample, fold));
                    }
                    if n < batch.len() {
                        break;
                    }
                }
                prop_assert_eq!(&got, &want, "portable: {}", portable);
            }
            // A filter of every other token's sample: those, and no token lost after a skip.
            let mut bits = StartBits::new(rand::random());
            for w in want.iter().step_by(2) {
                bits.insert(w.2, crate::masking::start_filter::Start::Alone);
            }
            let some = bits.folded_for_tests(19);
            let mut c = Cursor::within(&s, from, to);
            let mut seen = vec![];
            let mut batch = [NO_CANDIDATE; 8];
            loop {
                let n = c.fill(&some, &mut batch);
                seen.extend(batch[..n].iter().map(|k| (k.start, k.end)));
                if n < batch.len() {
                    break;
                }
            }
            for w in want.iter().step_by(2) {
                prop_assert!(seen.contains(&(w.0, w.1)), "{:?} missed", (w.0, w.1));
            }
        }

        /// Under a filter that passes some tokens, the walk returns exactly the tokens the
        /// simple walk (`Tokens`, then the filter on each token's sample) lets through, in
        /// order, with any batch size: batches that fill up inside a block resume at the next
        /// token, none skipped or returned twice. Dense runs of one-letter tokens put 32 whole
        /// tokens in a block; long and non-ASCII tokens cross block edges.
        #[test]
        fn the_walk_returns_exactly_the_tokens_the_filter_passes(
            s in "([a-zA-Z0-9]{1,20}|[a-z]{60,70}|([a-z0-9] ){1,40}|[ .,'-]{1,3}|é|Ü|ß|İ|½|\\PC){0,80}",
            cut in any::<(u16, u16)>(),
            keep_every in 1usize..5,
            log in 12u32..22,
            batch_len in 1usize..10,
        ) {
            let (from, to) = window(&s, cut);
            let mut all = vec![];
            let mut t = Tokens::within(&s, from, to);
            while let Some((start, end, f)) = t.next_token() {
                all.push((start, end, Sample::of(f)));
            }
            let mut bits = StartBits::new(rand::random());
            for w in all.iter().step_by(keep_every) {
                bits.insert(w.2, crate::masking::start_filter::Start::Sequence);
            }
            let filter = bits.folded_for_tests(log);
            let want: Vec<_> = all.iter().copied().filter(|w| filter.may_start(w.2)).collect();
            for portable in [false, true] {
                let mut c = Cursor::within(&s, from, to);
                let mut got = vec![];
                let mut batch = vec![NO_CANDIDATE; batch_len];
                loop {
                    let n = if portable {
                        c.fill_with(&filter, &mut batch, crate::masking::tokens::masks::scalar, |head, len| head & KEEP[len.min(8)])
                    } else {
                        c.fill(&filter, &mut batch)
                    };
                    got.extend(batch[..n].iter().map(|k| (k.start, k.end, k.sample)));
                    if n < batch.len() {
                        break;
                    }
                }
                prop_assert_eq!(&got, &want, "portable: {}", portable);
            }
        }
    }
}
