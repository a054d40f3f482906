//! Word tokens of text for the identifier dictionary: maximal runs of Unicode letters and digits,
//! folded so that case and accents do not matter ("Müller", "MULLER" and "muller" fold alike).
//!
//! The scanner runs over every text value going to a masked identity, so ASCII text takes a
//! fast path: 64 bytes at a time become bit masks (ASCII letter or digit; non-ASCII byte) and
//! tokens are found by counting bits, with no branch per byte; an ASCII token up to 16 bytes is
//! folded by two loads and an OR (lowercase = `| 0x20` for ASCII letters and digits alike). A
//! token with a non-ASCII character, or longer than 16 bytes, is folded char by char.

use unicode_normalization::char::{decompose_compatible, is_combining_mark};

/// A folded token in a form that does not depend on how it was found: up to 16 bytes as one
/// zero-padded little-endian u128 (tokens never contain a zero byte, so this is exact), longer
/// ones as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folded<'a> {
    Short(u128),
    Long(&'a [u8]),
}

impl<'a> Folded<'a> {
    /// The canonical form of folded bytes.
    pub fn of(bytes: &'a [u8]) -> Self {
        if bytes.len() <= 16 {
            let mut w = [0u8; 16];
            w[..bytes.len()].copy_from_slice(bytes);
            Folded::Short(u128::from_le_bytes(w))
        } else {
            Folded::Long(bytes)
        }
    }

    /// The folded bytes (`buf` holds a short token's).
    pub fn bytes<'b>(&'b self, buf: &'b mut [u8; 16]) -> &'b [u8] {
        match *self {
            Folded::Short(w) => {
                *buf = w.to_le_bytes();
                let n = buf.iter().position(|&c| c == 0).unwrap_or(16);
                &buf[..n]
            }
            Folded::Long(b) => b,
        }
    }
}

/// A letter or digit: starts and continues a token.
#[inline]
fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// Continues a token without starting one: combining marks, so that decomposed text
/// ("Mu\u{308}ller") is the same token as precomposed text ("Müller").
#[inline]
fn continues_word(c: char) -> bool {
    is_word(c) || is_combining_mark(c)
}

/// Appends the fold of `c`: compatibility decomposition (NFKD: accents become combining marks,
/// full-width and other compatibility forms their plain letter), lowercase, "ß" as "ss" (so
/// "Straße" and "STRASSE" meet), and only letters and digits kept (combining marks dropped, and
/// the punctuation some forms decompose to: "½" is "1⁄2"), so a fold is one token again.
pub fn fold_char(c: char, out: &mut Vec<u8>) {
    if c.is_ascii() {
        out.push(c.to_ascii_lowercase() as u8);
        return;
    }
    decompose_compatible(c, |d| {
        if is_combining_mark(d) {
            return;
        }
        // to_lowercase can itself yield a mark ('İ' → "i\u{307}").
        for l in d.to_lowercase().filter(|&l| is_word(l)) {
            if l == 'ß' {
                out.extend_from_slice(b"ss");
            } else {
                let mut b = [0u8; 4];
                out.extend_from_slice(l.encode_utf8(&mut b).as_bytes());
            }
        }
    });
}

/// What the dictionary's start filter reads of a fold: its first 8 bytes (little-endian,
/// zero-padded) and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub head: u64,
    pub len: usize,
}

impl Sample {
    pub fn of(f: Folded<'_>) -> Sample {
        let mut buf = [0; 16];
        Sample::of_bytes(f.bytes(&mut buf))
    }

    /// The sample of folded bytes.
    pub fn of_bytes(b: &[u8]) -> Sample {
        Sample { head: load8(&b[..b.len().min(8)], 0), len: b.len() }
    }
}

/// The 8 bytes of `b` at `i` as a little-endian u64, zero-padded past the end of `b`.
#[inline(always)]
pub(crate) fn load8(b: &[u8], i: usize) -> u64 {
    match b.get(i..i + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
        None => {
            let mut w = [0u8; 8];
            let rest = b.get(i..).unwrap_or(&[]);
            w[..rest.len()].copy_from_slice(rest);
            u64::from_le_bytes(w)
        }
    }
}

/// OR-ed into 8 ASCII letters and digits, lowercases them (and changes no digit).
pub(crate) const FOLD: u64 = 0x2020_2020_2020_2020;
/// The bytes of a head of 0..=8 bytes.
pub(crate) const KEEP: [u64; 9] = [0, 0xFF, 0xFFFF, 0xFF_FFFF, 0xFFFF_FFFF, 0xFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF, 0xFF_FFFF_FFFF_FFFF, u64::MAX];

/// The sample of the fold of the ASCII letters and digits `b[start..end]`, read from the text:
/// the same bytes `Sample::of` reads from the token's fold.
#[inline(always)]
pub(crate) fn ascii_sample(b: &[u8], start: usize, end: usize) -> Sample {
    let len = end - start;
    Sample { head: (load8(b, start) | FOLD) & KEEP[len.min(8)], len }
}

/// The masks (ASCII letters and digits; non-ASCII bytes) of the 64 bytes of `b` at `base`;
/// bytes from `to` on count as neither.
#[inline]
pub(crate) fn masks_at(b: &[u8], base: usize, to: usize) -> (u64, u64) {
    if base + 64 <= to {
        masks::of(b[base..base + 64].try_into().expect("64 bytes")).word_high()
    } else {
        let mut tail = [0u8; 64];
        tail[..to - base].copy_from_slice(&b[base..to]);
        masks::of(&tail).word_high()
    }
}

/// The fold of the ASCII letters and digits `b[start..end]`, at most 16 of them, as
/// `Folded::Short` holds it: two little-endian loads, bytes past the token masked off.
#[inline]
pub(crate) fn ascii_fold_short(b: &[u8], start: usize, end: usize) -> u128 {
    let len = end - start;
    debug_assert!(len <= 16);
    let mut w = [0u8; 16];
    if start + 16 <= b.len() {
        w.copy_from_slice(&b[start..start + 16]);
    } else {
        w[..b.len() - start].copy_from_slice(&b[start..]);
    }
    let keep = if len == 16 { u128::MAX } else { (1u128 << (8 * len)) - 1 };
    (u128::from_le_bytes(w) | 0x2020_2020_2020_2020_2020_2020_2020_2020) & keep
}

/// The sample of the first token of `text[from..to]` (`from` not inside a token), or None.
///
/// The pair filter's question about the token after a candidate: usually one or two separator
/// bytes and a short ASCII token, read byte by byte here; anything non-ASCII near it goes
/// through `Tokens` (a non-ASCII letter starts a token, a combining mark continues one).
#[inline]
pub fn sample_after(text: &str, from: usize, to: usize) -> Option<Sample> {
    let b = &text.as_bytes()[..to];
    let mut i = from;
    while i < b.len() && b[i] < 0x80 && !b[i].is_ascii_alphanumeric() {
        i += 1;
    }
    if i == b.len() {
        return None;
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_alphanumeric() {
        i += 1;
    }
    if i == start || (i < b.len() && b[i] >= 0x80) {
        let mut t = Tokens::within(text, from, to);
        return t.next_token().map(|(_, _, f)| Sample::of(f));
    }
    Some(ascii_sample(b, start, i))
}

/// A token found by `Tokens::fill`: its byte range and the hash of its fold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tok {
    pub start: usize,
    pub end: usize,
    pub hash: u64,
}

/// The tokens of `text[from..to]`, one at a time (`next_token`) or many (`fill`), with folds.
pub struct Tokens<'a> {
    text: &'a str,
    from: usize,
    to: usize,
    pos: usize,
    /// The 64-byte block being read: its first byte's index and its masks (bit j = byte
    /// `block + j`): ASCII letters and digits, and non-ASCII bytes, both within the window.
    block: usize,
    word: u64,
    high: u64,
    /// Folds of long or non-ASCII tokens; allocated the first time one occurs.
    spill: Vec<u8>,
}

impl<'a> Tokens<'a> {
    /// Tokens of the whole text.
    pub fn new(text: &'a str) -> Self {
        Self::within(text, 0, text.len())
    }

    /// Tokens of `text[from..to]` (both char boundaries): a token never crosses either end.
    pub fn within(text: &'a str, from: usize, to: usize) -> Self {
        assert!(from <= to && text.is_char_boundary(from) && text.is_char_boundary(to));
        let mut t = Tokens { text, from, to, pos: from, block: from, word: 0, high: 0, spill: Vec::new() };
        t.load(from);
        t
    }

    /// Reads the masks of the block starting at `block` (blocks are 64-byte steps from `from`).
    #[inline]
    fn load(&mut self, block: usize) {
        self.block = block;
        (self.word, self.high) = if block < self.to { self.masks_at(block) } else { (0, 0) };
    }

    /// Moves the block so that it holds `pos`; false when `pos` is past the window.
    #[inline]
    fn reach(&mut self, pos: usize) -> bool {
        if pos >= self.to {
            return false;
        }
        if pos >= self.block + 64 || pos < self.block {
            self.load(self.from + (pos - self.from) / 64 * 64);
        }
        true
    }

    #[inline]
    fn char_at(&self, i: usize) -> char {
        self.text[i..self.to].chars().next().unwrap_or('\0')
    }

    /// The next token: its byte range in the text and its fold.
    #[inline]
    pub fn next_token(&mut self) -> Option<(usize, usize, Folded<'_>)> {
        // The start: the first letter or digit at or after `pos`.
        let start = loop {
            if !self.reach(self.pos) {
                self.pos = self.to;
                return None;
            }
            let off = self.pos - self.block;
            let found = (self.word | self.high) >> off;
            if found == 0 {
                self.pos = self.block + 64;
                continue;
            }
            let i = self.pos + found.trailing_zeros() as usize;
            if self.word >> (i - self.block) & 1 == 1 {
                break i;
            }
            let c = self.char_at(i);
            if is_word(c) {
                return Some(self.fold_from(i));
            }
            self.pos = i + c.len_utf8();
        };
        // The end: the first byte at or after `start` that is not an ASCII letter or digit.
        let mut end = start;
        loop {
            if !self.reach(end) {
                end = self.to;
                break;
            }
            let rest = !self.word >> (end - self.block);
            if rest != 0 {
                end += rest.trailing_zeros() as usize;
                break;
            }
            end = self.block + 64;
        }
        let end = end.min(self.to);
        if end < self.to && self.high >> (end - self.block) & 1 == 1 && continues_word(self.char_at(end)) {
            return Some(self.fold_from(start));
        }
        self.pos = end;
        Some((start, end, self.ascii_fold(start, end)))
    }

    /// Appends tokens to `out` until it is full or the text ends, each with `hash` of its fold;
    /// returns how many (fewer than `out.len()` only at the end of the text).
    ///
    /// A block of 64 ASCII bytes yields all its tokens from two bit masks (token starts: a
    /// letter or digit after something else; ends: the reverse), with no branch per byte.
    /// Blocks with a non-ASCII byte, and tokens of 64 bytes or more, go through `next_token`.
    #[inline]
    pub fn fill(&mut self, out: &mut [Tok], mut hash: impl FnMut(Folded<'_>) -> u64) -> usize {
        let mut n = 0;
        while n < out.len() && self.pos < self.to {
            let base = self.pos;
            let (word, high) = self.masks_at(base);
            if high != 0 {
                let Some((start, end, f)) = self.next_token() else { break };
                out[n] = Tok { start, end, hash: hash(f) };
                n += 1;
                continue;
            }
            // `pos` is never inside a token, so bit 0 needs no carry from the byte before.
            let mut starts = word & !(word << 1);
            let mut ends = !word & (word << 1);
            loop {
                if starts == 0 {
                    self.pos = (base + 64).min(self.to);
                    break;
                }
                let s = starts.trailing_zeros() as usize;
                if ends == 0 {
                    // The last token runs past the block: read it again from its start, or
                    // (64 bytes or longer) through the general path.
                    if s > 0 {
                        self.pos = base + s;
                    } else if let Some((start, end, f)) = self.next_token() {
                        out[n] = Tok { start, end, hash: hash(f) };
                        n += 1;
                    }
                    break;
                }
                let e = ends.trailing_zeros() as usize;
                starts &= starts - 1;
                ends &= ends - 1;
                let (start, end) = (base + s, base + e);
                out[n] = Tok { start, end, hash: hash(self.ascii_fold(start, end)) };
                n += 1;
                if n == out.len() {
                    self.pos = end;
                    break;
                }
            }
        }
        n
    }

    /// The token starting at `start` (a token's first byte) and its fold; the scan continues
    /// after it.
    #[inline]
    pub fn token_at(&mut self, start: usize) -> Option<(usize, usize, Folded<'_>)> {
        self.pos = start;
        self.next_token()
    }

    /// Continues the scan at `pos` (not inside a token: a token's end, or a separator).
    #[inline]
    pub fn skip_to(&mut self, pos: usize) {
        self.pos = pos.min(self.to);
    }

    /// The masks of the 64 bytes at `base` (bytes from `to` on count as neither).
    #[inline]
    fn masks_at(&self, base: usize) -> (u64, u64) {
        masks_at(self.text.as_bytes(), base, self.to)
    }

    /// The fold of the token `text[start..end]` found by a scan; `ascii`: it is ASCII letters
    /// and digits only (folded from the text in place), else it is folded char by char again.
    #[inline]
    pub fn fold_at(&mut self, start: usize, end: usize, ascii: bool) -> Folded<'_> {
        if ascii {
            return self.ascii_fold(start, end);
        }
        match self.token_at(start) {
            Some((_, _, f)) => f,
            None => unreachable!("a token starts at {start}"),
        }
    }

    /// The fold of the ASCII letters and digits `text[start..end]`.
    #[inline]
    fn ascii_fold(&mut self, start: usize, end: usize) -> Folded<'_> {
        let b = self.text.as_bytes();
        let len = end - start;
        if len > 16 {
            self.spill.clear();
            self.spill.extend(b[start..end].iter().map(|c| c | 0x20));
            return Folded::Long(&self.spill);
        }
        Folded::Short(ascii_fold_short(b, start, end))
    }

    /// Folds the token starting at `start` char by char (it has a non-ASCII letter, digit or mark).
    fn fold_from(&mut self, start: usize) -> (usize, usize, Folded<'_>) {
        self.spill.clear();
        let mut end = start;
        for c in self.text[start..self.to].chars() {
            if !(if end == start { is_word(c) } else { continues_word(c) }) {
                break;
            }
            fold_char(c, &mut self.spill);
            end += c.len_utf8();
        }
        self.pos = end;
        (start, end, Folded::of(&self.spill))
    }
}

/// The masks of a 64-byte block: ASCII letters and digits; bytes >= 0x80; ASCII digits.
pub(crate) mod masks {
    /// A 64-byte block as bit masks (bit j = byte j).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Masks {
        /// ASCII letters and digits: the bytes of tokens.
        pub word: u64,
        /// Non-ASCII bytes.
        pub high: u64,
        /// ASCII digits (a token's start filter class is its first byte's).
        pub digits: u64,
    }

    impl Masks {
        /// What the tokenizer reads: (word, high).
        #[inline(always)]
        pub fn word_high(self) -> (u64, u64) {
            (self.word, self.high)
        }
    }

    /// AVX2 (two 32-byte steps) where the CPU has it, else SSE2 (part of every x86_64).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn of(b: &[u8; 64]) -> Masks {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { of_avx2(b) }
        } else {
            of_sse2(b)
        }
    }

    /// Not inlined, like `of_avx2`: inlined into a loop that shifts the masks, LLVM splits
    /// them into 64 single bits and packs them again (hundreds of instructions a block).
    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    pub fn of_sse2(b: &[u8; 64]) -> Masks {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of the x86_64 baseline; each load reads 16 bytes inside `b`.
        unsafe {
            let (a, z, zero, nine, fold) =
                (_mm_set1_epi8(b'a' as i8), _mm_set1_epi8(b'z' as i8), _mm_set1_epi8(b'0' as i8), _mm_set1_epi8(b'9' as i8), _mm_set1_epi8(0x20));
            let (mut word, mut high, mut digits) = (0u64, 0u64, 0u64);
            for k in 0..4 {
                let v = _mm_loadu_si128(b.as_ptr().add(16 * k) as *const __m128i);
                // Unsigned range checks: min(max(x, lo), hi) == x exactly for lo..=hi. OR 0x20
                // maps 'A'..='Z' onto 'a'..='z' and nothing else into that range.
                let l = _mm_or_si128(v, fold);
                let letter = _mm_cmpeq_epi8(_mm_min_epu8(_mm_max_epu8(l, a), z), l);
                let digit = _mm_cmpeq_epi8(_mm_min_epu8(_mm_max_epu8(v, zero), nine), v);
                word |= u64::from(_mm_movemask_epi8(_mm_or_si128(letter, digit)) as u16) << (16 * k);
                high |= u64::from(_mm_movemask_epi8(v) as u16) << (16 * k);
                digits |= u64::from(_mm_movemask_epi8(digit) as u16) << (16 * k);
            }
            Masks { word, high, digits }
        }
    }

    /// `of_sse2` in two 32-byte steps.
    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    #[target_feature(enable = "avx2")]
    pub unsafe fn of_avx2(b: &[u8; 64]) -> Masks {
        use std::arch::x86_64::*;
        let (a, z, zero, nine, fold) =
            (_mm256_set1_epi8(b'a' as i8), _mm256_set1_epi8(b'z' as i8), _mm256_set1_epi8(b'0' as i8), _mm256_set1_epi8(b'9' as i8), _mm256_set1_epi8(0x20));
        let (mut word, mut high, mut digits) = (0u64, 0u64, 0u64);
        for k in 0..2 {
            // SAFETY: each load reads 32 bytes inside `b`.
            let v = unsafe { _mm256_loadu_si256(b.as_ptr().add(32 * k) as *const __m256i) };
            let l = _mm256_or_si256(v, fold);
            let letter = _mm256_cmpeq_epi8(_mm256_min_epu8(_mm256_max_epu8(l, a), z), l);
            let digit = _mm256_cmpeq_epi8(_mm256_min_epu8(_mm256_max_epu8(v, zero), nine), v);
            word |= u64::from(_mm256_movemask_epi8(_mm256_or_si256(letter, digit)) as u32) << (32 * k);
            high |= u64::from(_mm256_movemask_epi8(v) as u32) << (32 * k);
            digits |= u64::from(_mm256_movemask_epi8(digit) as u32) << (32 * k);
        }
        Masks { word, high, digits }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn of(b: &[u8; 64]) -> Masks {
        scalar(b)
    }

    /// One byte at a time: the reference the SIMD version is tested against.
    #[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
    pub fn scalar(b: &[u8; 64]) -> Masks {
        let (mut word, mut high, mut digits) = (0u64, 0u64, 0u64);
        for (j, &c) in b.iter().enumerate() {
            word |= u64::from(c.is_ascii_alphanumeric()) << j;
            high |= u64::from(c >= 0x80) << j;
            digits |= u64::from(c.is_ascii_digit()) << j;
        }
        Masks { word, high, digits }
    }
}

/// Every folded token of `text`, as strings (the tests' reference; the builder folds in place).
#[cfg(test)]
pub(crate) fn folded(text: &str) -> Vec<String> {
    let mut t = Tokens::new(text);
    let mut out = Vec::new();
    while let Some((_, _, f)) = t.next_token() {
        out.push(String::from_utf8_lossy(f.bytes(&mut [0; 16])).into_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, char by char: the reference for the block scanner.
    fn reference(text: &str, from: usize, to: usize) -> Vec<(usize, usize, Vec<u8>)> {
        let mut out = vec![];
        let mut it = text[from..to].char_indices().peekable();
        while let Some((i, c)) = it.next() {
            if !is_word(c) {
                continue;
            }
            let mut f = vec![];
            fold_char(c, &mut f);
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = it.peek() {
                if !continues_word(d) {
                    break;
                }
                fold_char(d, &mut f);
                end = j + d.len_utf8();
                it.next();
            }
            out.push((from + i, from + end, f));
        }
        out
    }

    fn scanned(text: &str, from: usize, to: usize) -> Vec<(usize, usize, Vec<u8>)> {
        let mut t = Tokens::within(text, from, to);
        let mut out = vec![];
        while let Some((a, b, f)) = t.next_token() {
            out.push((a, b, f.bytes(&mut [0; 16]).to_vec()));
        }
        out
    }

    /// The tokens `fill` finds, in batches of `batch`, with a "hash" that is an index into the
    /// folds it saw.
    fn filled(text: &str, from: usize, to: usize, batch: usize) -> Vec<(usize, usize, Vec<u8>)> {
        let mut t = Tokens::within(text, from, to);
        let mut folds: Vec<Vec<u8>> = vec![];
        let mut out = vec![];
        let mut buf = vec![Tok::default(); batch];
        loop {
            let n = t.fill(&mut buf, |f| {
                folds.push(f.bytes(&mut [0; 16]).to_vec());
                folds.len() as u64 - 1
            });
            out.extend(buf[..n].iter().map(|k| (k.start, k.end, folds[k.hash as usize].clone())));
            if n < batch {
                return out;
            }
        }
    }

    #[test]
    fn case_and_accents_fold_alike() {
        assert_eq!(folded("Müller MULLER muller Mu\u{308}ller"), ["muller"; 4]);
        assert_eq!(folded("García-López"), ["garcia", "lopez"]);
        assert_eq!(folded("12 Elm Street"), ["12", "elm", "street"]);
        assert_eq!(folded("O'Brien O’Brien"), ["o", "brien", "o", "brien"]);
        assert_eq!(folded("Harris, Daniel"), ["harris", "daniel"]);
        assert_eq!(folded("ＭＵＬＬＥＲ Straße STRASSE İpek"), ["muller", "strasse", "strasse", "ipek"]);
        assert_eq!(folded("ÅSA øst Žofie"), ["asa", "øst", "zofie"]);
        assert_eq!(folded("  ...  "), Vec::<String>::new());
    }

    #[test]
    fn tokens_carry_their_byte_ranges_and_stop_at_the_window() {
        let s = "Dr. Zoë Kim, 02139";
        let ranges: Vec<&str> = scanned(s, 0, s.len()).iter().map(|(a, b, _)| &s[*a..*b]).collect();
        assert_eq!(ranges, ["Dr", "Zoë", "Kim", "02139"]);
        assert_eq!(scanned("abcdef", 1, 4), [(1, 4, b"bcd".to_vec())]);
    }

    #[test]
    fn tokens_across_blocks_and_of_every_length() {
        for len in 1..80 {
            for at in [0, 1, 47, 63, 64, 65, 100] {
                let mut s = ".".repeat(at);
                s.push_str(&"Ab".repeat(len)[..len]);
                s.push_str(" x");
                let want = reference(&s, 0, s.len());
                assert_eq!(scanned(&s, 0, s.len()), want, "len {len} at {at}");
                assert_eq!(filled(&s, 0, s.len(), 3), want, "len {len} at {at}");
                assert_eq!(filled(&s, 0, s.len() - 2, 64), reference(&s, 0, s.len() - 2), "len {len} at {at}");
            }
        }
        let long_accent = format!("{}é", "A".repeat(70));
        assert_eq!(folded(&long_accent), [format!("{}e", "a".repeat(70))]);
    }

    #[test]
    fn short_and_long_folds_have_one_form() {
        let mut b = [0; 16];
        assert_eq!(Folded::of(b"muller"), Folded::of(&folded("MÜLLER")[0].clone().into_bytes()));
        assert_eq!(Folded::of(b"abc").bytes(&mut b), b"abc");
        assert!(matches!(Folded::of(&[b'a'; 17]), Folded::Long(_)));
        let t = "Übermäßiglangername";
        assert_eq!(scanned(t, 0, t.len())[0].2, b"ubermassiglangername");
    }

    #[test]
    fn block_masks_match_the_scalar_reference() {
        let mut b = [0u8; 64];
        for start in (0..=255u8).step_by(64) {
            for (j, c) in b.iter_mut().enumerate() {
                *c = start.wrapping_add(j as u8);
            }
            assert_eq!(masks::of(&b), masks::scalar(&b));
            #[cfg(target_arch = "x86_64")]
            assert_eq!(masks::of_sse2(&b), masks::scalar(&b));
        }
    }

    proptest! {
        /// The block scanner finds exactly the tokens and folds of the definition, in any
        /// window of any text (ASCII-heavy with accents, marks, digits and long runs).
        #[test]
        fn scanner_agrees_with_the_definition(s in "([a-zA-Z0-9]{0,20}|[ .,'-]{1,3}|é|Ü|\u{308}|ß|İ|ﹲ|½|\\PC){0,40}", cut in any::<(u16, u16)>()) {
            let bounds: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
            let (a, b) = (bounds[cut.0 as usize % bounds.len()], bounds[cut.1 as usize % bounds.len()]);
            let (from, to) = (a.min(b), a.max(b));
            let want = reference(&s, from, to);
            prop_assert_eq!(&scanned(&s, from, to), &want);
            prop_assert_eq!(&filled(&s, from, to, 1 + cut.0 as usize % 7), &want);
            prop_assert_eq!(&filled(&s, from, to, 64), &want);
        }

        /// Mostly ASCII text, long enough for whole 64-byte blocks of the fast path, with a
        /// rare accent or mark pushing a block onto the general path.
        #[test]
        fn block_path_agrees_on_ascii_text(s in "([a-zA-Z0-9]{1,30}[ .,;:()/'-]{1,2}){0,60}(é|\u{301}|Ö)?([a-zA-Z0-9]{1,30}[ .,-]){0,30}", batch in 1usize..70) {
            let want = reference(&s, 0, s.len());
            prop_assert_eq!(&filled(&s, 0, s.len(), batch), &want);
            prop_assert_eq!(&scanned(&s, 0, s.len()), &want);
        }

        /// The pair filter's quick look at the next token reads the same sample `Tokens` folds,
        /// from any char boundary of any window.
        #[test]
        fn sample_after_is_the_next_tokens_sample(s in "([a-zA-Z0-9]{0,20}|[ .,'-]{1,3}|é|Ü|\u{308}|ß|İ|ﹲ|½|\\PC){0,30}", cut in any::<(u16, u16)>()) {
            let bounds: Vec<usize> = (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect();
            let (a, b) = (bounds[cut.0 as usize % bounds.len()], bounds[cut.1 as usize % bounds.len()]);
            let (from, to) = (a.min(b), a.max(b));
            let want = Tokens::within(&s, from, to).next_token().map(|(_, _, f)| Sample::of(f));
            prop_assert_eq!(sample_after(&s, from, to), want);
        }

        /// A fold is one token that folds to itself: the fold is a fixed point, so folding in
        /// the builder and in the scan cannot drift apart.
        #[test]
        fn fold_is_idempotent(s in "\\PC{0,40}") {
            for t in folded(&s).into_iter().filter(|t| !t.is_empty()) {
                prop_assert_eq!(folded(&t), vec![t.clone()]);
            }
        }
    }
}
