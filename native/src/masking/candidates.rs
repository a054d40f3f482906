//! The identifier dictionary's walk over the tokens of a window, stopping only at candidates:
//! tokens the start filter lets through (start_filter.rs). Nearly every token of ordinary text
//! is skipped here, so this loop is the dictionary's main per-row cost.
//!
//! A block of 64 ASCII bytes becomes two bit masks (token starts, token ends) once, and the
//! walk keeps them between candidates: each token costs a few bit operations, one load of its
//! first 8 bytes and one bit of the filter. Blocks with a non-ASCII byte, and tokens of 64
//! bytes or more, go through `Tokens` (folded char by char, sampled from the fold; both paths
//! give the same sample for the same fold).

use crate::masking::start_filter::StartFilter;
use crate::masking::tokens::{load8, masks_at, Folded, Sample, Tokens, FOLD, KEEP};

/// A token the start filter let through.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub start: usize,
    pub end: usize,
    pub sample: Sample,
    /// ASCII letters and digits only: its fold is read from the text in place.
    pub ascii: bool,
}

pub struct Cursor<'a> {
    text: &'a str,
    to: usize,
    /// The ASCII block being read: its first byte, and the token starts and ends (bit j: byte
    /// `base + j`) not read yet.
    base: usize,
    starts: u64,
    ends: u64,
    /// Where the next block starts once this one is read (never inside a token).
    next: usize,
    /// The general path, and folds of tokens that are not short ASCII.
    tokens: Tokens<'a>,
}

impl<'a> Cursor<'a> {
    /// The tokens of `text[from..to]` (both char boundaries).
    pub fn within(text: &'a str, from: usize, to: usize) -> Self {
        Cursor { text, to, base: from, starts: 0, ends: 0, next: from, tokens: Tokens::within(text, from, to) }
    }

    /// The next candidate, or None at the end of the window.
    #[inline(never)]
    pub fn next(&mut self, filter: &StartFilter) -> Option<Candidate> {
        let b = self.text.as_bytes();
        loop {
            if self.starts != 0 {
                // The 8 bytes at any token start of the block are in the text, but for the last
                // block or so: only there does each load check its bounds.
                let found = if self.base + 64 + 8 <= b.len() {
                    // SAFETY: `start` < base + 64, so start + 8 <= b.len().
                    self.drain(filter, |start| u64::from_le(unsafe { b.as_ptr().add(start).cast::<u64>().read_unaligned() }))
                } else {
                    self.drain(filter, |start| load8(b, start))
                };
                if found.is_some() {
                    return found;
                }
                if self.starts != 0 {
                    // The last token runs past the block: the next block starts at it, or (64
                    // bytes or longer) the general path reads it.
                    let s = self.starts.trailing_zeros() as usize;
                    self.starts = 0;
                    if s > 0 {
                        self.next = self.base + s;
                    } else if let Some(c) = self.general(self.base, filter)? {
                        return Some(c);
                    }
                }
            }
            let pos = self.next;
            if pos >= self.to {
                return None;
            }
            let (word, high) = masks_at(b, pos, self.to);
            if high != 0 {
                if let Some(c) = self.general(pos, filter)? {
                    return Some(c);
                }
                continue;
            }
            // `pos` is never inside a token, so bit 0 needs no carry from the byte before.
            self.base = pos;
            self.starts = word & !(word << 1);
            self.ends = !word & (word << 1);
            self.next = (pos + 64).min(self.to);
        }
    }

    /// Reads the block's tokens up to the first candidate (returned) or to a token that runs
    /// past the block (left in `starts`). `load(i)`: the 8 bytes at `i`, zero-padded.
    #[inline(always)]
    fn drain(&mut self, filter: &StartFilter, load: impl Fn(usize) -> u64) -> Option<Candidate> {
        // In registers for the loop, written back once.
        let (mut starts, mut ends, base) = (self.starts, self.ends, self.base);
        let mut found = None;
        while starts != 0 && ends != 0 {
            let (s, e) = (starts.trailing_zeros() as usize, ends.trailing_zeros() as usize);
            starts &= starts - 1;
            ends &= ends - 1;
            let (start, end) = (base + s, base + e);
            let sample = Sample { head: (load(start) | FOLD) & KEEP[(e - s).min(8)], len: e - s };
            if filter.may_start(sample) {
                found = Some(Candidate { start, end, sample, ascii: true });
                break;
            }
        }
        (self.starts, self.ends) = (starts, ends);
        found
    }

    /// The first token at or after `pos` through `Tokens`: None at the end of the window,
    /// Some(None) when the filter rules it out (the walk goes on after it).
    fn general(&mut self, pos: usize, filter: &StartFilter) -> Option<Option<Candidate>> {
        let (start, end, f) = self.tokens.token_at(pos)?;
        let sample = Sample::of(f);
        self.next = end;
        Some(filter.may_start(sample).then_some(Candidate { start, end, sample, ascii: false }))
    }

    /// The fold of candidate `c`.
    #[inline]
    pub fn fold(&mut self, c: &Candidate) -> Folded<'_> {
        self.tokens.fold_at(c.start, c.end, c.ascii)
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

    proptest! {
        /// With a filter every token passes, the walk finds exactly the tokens `Tokens` finds,
        /// each with the sample and the fold of its own fold, in any window; a token ruled out
        /// is skipped without losing the tokens after it.
        #[test]
        fn the_walk_finds_every_token_with_its_sample_and_fold(
            s in "([a-zA-Z0-9]{1,20}|[a-z]{60,70}|[ .,'-]{1,3}|é|Ü|\u{308}|ß|İ|ﹲ|½|\\PC){0,60}",
            cut in any::<(u16, u16)>(),
        ) {
            let bounds: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
            let (a, b) = (bounds[cut.0 as usize % bounds.len()], bounds[cut.1 as usize % bounds.len()]);
            let (from, to) = (a.min(b), a.max(b));
            let mut want = vec![];
            let mut t = Tokens::within(&s, from, to);
            while let Some((start, end, f)) = t.next_token() {
                want.push((start, end, Sample::of(f), f.bytes(&mut [0; 16]).to_vec()));
            }
            let all = StartBits::new(rand::random()).everything_for_tests();
            let mut c = Cursor::within(&s, from, to);
            let mut got = vec![];
            while let Some(k) = c.next(&all) {
                let fold = c.fold(&k).bytes(&mut [0; 16]).to_vec();
                got.push((k.start, k.end, k.sample, fold));
            }
            prop_assert_eq!(&got, &want);
            // A filter of every other token's sample: those, and no token lost after a skip.
            let mut bits = StartBits::new(rand::random());
            for w in want.iter().step_by(2) {
                bits.insert(w.2, crate::masking::start_filter::Start::Alone);
            }
            let some = bits.folded_for_tests(19);
            let mut c = Cursor::within(&s, from, to);
            let mut seen = vec![];
            while let Some(k) = c.next(&some) {
                seen.push((k.start, k.end));
            }
            for w in want.iter().step_by(2) {
                prop_assert!(seen.contains(&(w.0, w.1)), "{:?} missed", (w.0, w.1));
            }
        }
    }
}
