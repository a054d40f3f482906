//! The content detectors' prefilter with SSE2, 64 bytes per step: whether a text holds
//! anything a built-in pattern needs (detectors::builtin_may_match_scalar is the reference
//! and says what; a proptest checks both agree on every input).
//!
//! Layer 2 runs it over every unclassified text value going to a masked identity, so on a
//! bulk read of clinical notes it is the data plane's largest per-row cost. Vitals and doses
//! make digits dense, which defeats a byte-skipping loop; here digits, separators and marker
//! letters become three 64-bit masks per block, the "3 digits, separator, 2 digits" shape is
//! a handful of shifts and ANDs, and only marker letters ('@', 'b', 'm') are checked one by one.

/// True when some built-in detector may match `b` (false means certainly none).
#[cfg(target_arch = "x86_64")]
pub fn may_match(b: &[u8]) -> bool {
    // SAFETY: SSE2 is part of the x86_64 baseline; every load reads 16 bytes inside `b` or
    // inside a zero-padded copy of its tail.
    unsafe { sse2::may_match(b) }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn may_match(b: &[u8]) -> bool {
    crate::masking::detectors::builtin_may_match_scalar(b)
}

/// A marker letter at `i`: '@', "mrn", or a birth keyword whose 'b' is at `i` (ASCII case
/// folded). Each keyword is one masked compare of 8 bytes read at once: clinical notes have a
/// 'b' or an 'm' every few words ("mg", "mmol", "bilaterally"), so this runs dozens of times
/// per note.
#[inline(always)]
fn marker_at(b: &[u8], i: usize) -> bool {
    /// Little-endian bytes of a keyword, as one u64.
    const fn word(k: &[u8]) -> u64 {
        let mut w = 0u64;
        let mut j = 0;
        while j < k.len() {
            w |= (k[j] as u64) << (8 * j);
            j += 1;
        }
        w
    }
    /// The low `n` bytes.
    const fn low(n: u32) -> u64 {
        u64::MAX >> (64 - 8 * n)
    }
    // OR 0x20 lowercases a letter and turns no other byte into one, so on letters it is an
    // exact case fold; "d.o.b"'s dots are compared as they are.
    const FOLD: u64 = 0x2020_2020_2020_2020;
    const DOTS_KEPT: u64 = word(&[0x20, 0, 0x20, 0, 0x20]);
    if b[i] == b'@' {
        return true;
    }
    let at = load8(b, i) | FOLD;
    (at & low(3) == word(b"mrn"))
        || (at & low(5) == word(b"birth"))
        || (at & low(4) == word(b"born"))
        || (i >= 2 && (load8(b, i - 2) | FOLD) & low(3) == word(b"dob"))
        || (i >= 4 && (load8(b, i - 4) | DOTS_KEPT) & low(5) == word(b"d.o.b"))
}

/// The 8 bytes of `b` at `i` as a little-endian u64, zero-padded past the end.
#[inline(always)]
fn load8(b: &[u8], i: usize) -> u64 {
    match b.get(i..i + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
        None => {
            let mut w = [0u8; 8];
            let rest = &b[i.min(b.len())..];
            w[..rest.len()].copy_from_slice(rest);
            u64::from_le_bytes(w)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    /// Digit, separator and marker masks of the 64 bytes at `p` (bit j = byte j).
    #[inline(always)]
    unsafe fn block(p: *const u8) -> (u64, u64, u64) {
        let (zero, nine) = (_mm_set1_epi8(b'0' as i8), _mm_set1_epi8(b'9' as i8));
        let (dash, dot, space) = (_mm_set1_epi8(b'-' as i8), _mm_set1_epi8(b'.' as i8), _mm_set1_epi8(b' ' as i8));
        let (at, low_b, low_m, fold) =
            (_mm_set1_epi8(b'@' as i8), _mm_set1_epi8(b'b' as i8), _mm_set1_epi8(b'm' as i8), _mm_set1_epi8(0x20));
        let (mut d, mut s, mut m) = (0u64, 0u64, 0u64);
        for k in 0..4 {
            let v = _mm_loadu_si128(p.add(16 * k) as *const __m128i);
            // Unsigned range check: min(max(v, '0'), '9') == v exactly for '0'..='9'.
            let digit = _mm_cmpeq_epi8(_mm_min_epu8(_mm_max_epu8(v, zero), nine), v);
            let sep = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, dash), _mm_cmpeq_epi8(v, dot)), _mm_cmpeq_epi8(v, space));
            // OR 0x20 folds exactly 'B'->'b' and 'M'->'m' among the bytes that reach 'b'/'m'.
            let f = _mm_or_si128(v, fold);
            let mark = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, at), _mm_cmpeq_epi8(f, low_b)), _mm_cmpeq_epi8(f, low_m));
            d |= u64::from(_mm_movemask_epi8(digit) as u16) << (16 * k);
            s |= u64::from(_mm_movemask_epi8(sep) as u16) << (16 * k);
            m |= u64::from(_mm_movemask_epi8(mark) as u16) << (16 * k);
        }
        (d, s, m)
    }

    /// The masks of block `k` of `b`; bytes past the end count as nothing.
    #[inline(always)]
    unsafe fn masks(b: &[u8], k: usize) -> (u64, u64, u64) {
        let start = 64 * k;
        if start >= b.len() {
            return (0, 0, 0);
        }
        if start + 64 <= b.len() {
            return block(b.as_ptr().add(start));
        }
        let mut tail = [0u8; 64];
        tail[..b.len() - start].copy_from_slice(&b[start..]);
        block(tail.as_ptr())
    }

    pub unsafe fn may_match(b: &[u8]) -> bool {
        let blocks = b.len().div_ceil(64);
        let mut prev_d = 0u64;
        let (mut d, mut s, mut m) = masks(b, 0);
        for k in 0..blocks {
            let (next_d, next_s, next_m) = masks(b, k + 1);
            // A separator with digits at the three bytes before it and the two after.
            let before = (d << 1 | prev_d >> 63) & (d << 2 | prev_d >> 62) & (d << 3 | prev_d >> 61);
            let after = (d >> 1 | next_d << 63) & (d >> 2 | next_d << 62);
            if s & before & after != 0 {
                return true;
            }
            let mut marks = m;
            while marks != 0 {
                let j = marks.trailing_zeros() as usize;
                if super::marker_at(b, 64 * k + j) {
                    return true;
                }
                marks &= marks - 1;
            }
            (prev_d, d, s, m) = (d, next_d, next_s, next_m);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Exactly the scalar reference, on texts dense in the shapes that matter and long
        /// enough to cross 64-byte blocks (a shape split across two blocks included).
        #[test]
        fn agrees_with_the_scalar_reference(s in "([0-9]{1,4}|[-. ]|[a-zA-Z]{1,3}|@|mrn|MRN|dob|D\\.O\\.B|birth|Born|b|m|\\n){0,80}") {
            prop_assert_eq!(may_match(s.as_bytes()), crate::masking::detectors::builtin_may_match_scalar(s.as_bytes()), "{:?}", s);
        }

        #[test]
        fn agrees_on_any_bytes(v in prop::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(may_match(&v), crate::masking::detectors::builtin_may_match_scalar(&v));
        }
    }

    #[test]
    fn shapes_at_block_edges() {
        for at in 55..75 {
            let mut t = vec![b'x'; 140];
            t[at..at + 6].copy_from_slice(b"123-45");
            assert!(may_match(&t), "digits shape at {at}");
            let mut t = vec![b'x'; 140];
            t[at..at + 3].copy_from_slice(b"dob");
            assert!(may_match(&t), "keyword at {at}");
            let mut t = vec![b'x'; 140];
            t[at..at + 6].copy_from_slice(b"12-345");
            assert!(!may_match(&t), "not a shape at {at}");
        }
        assert!(!may_match(b""));
        assert!(may_match(b"123 45"));
        assert!(!may_match(b"12 345"));
    }
}
