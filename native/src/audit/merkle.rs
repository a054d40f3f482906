//! RFC 9162 Merkle tree hashing: leaf and node hashes, and the compact range (the roots of the
//! perfect subtrees left of the next leaf), which appends a leaf in O(log n) and gives the root.

use ring::digest::{Context, SHA256};

pub type Hash = [u8; 32];

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut c = Context::new(&SHA256);
    for p in parts {
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// SHA-256(0x00 ‖ line), the line without its "\n".
pub fn leaf_hash(line: &[u8]) -> Hash {
    sha256(&[&[0u8], line])
}

/// SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[1u8], left, right])
}

pub fn to_hex(h: &Hash) -> String {
    let mut out = Vec::with_capacity(64);
    push_hex(&mut out, h);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the lowercase hex of `h` (per record on the writer's path: no formatter).
pub fn push_hex(out: &mut Vec<u8>, h: &Hash) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in h {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

pub fn from_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The tree of the first `size` leaves, kept as the roots of its perfect subtrees, largest
/// first (one per 1-bit of `size`): all a writer needs to append and to compute the root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    hashes: Vec<Hash>,
}

impl CompactRange {
    /// A range restored from a checkpoint record; None if the hash count does not fit `size`.
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Option<Self> {
        (hashes.len() == size.count_ones() as usize).then_some(CompactRange { size, hashes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    pub fn append(&mut self, leaf: Hash) {
        // Like a binary counter: every trailing 1-bit of size merges two equal subtrees.
        let mut h = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.hashes.pop().unwrap_or_default();
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.hashes.push(h);
        self.size += 1;
    }

    /// RFC 9162 MTH of the leaves so far (SHA-256 of nothing for the empty tree).
    pub fn root(&self) -> Hash {
        let Some((last, rest)) = self.hashes.split_last() else { return sha256(&[]) };
        rest.iter().rev().fold(*last, |right, left| node_hash(left, &right))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9162 §2.1.1 by its recursive definition, to check the compact range against.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => sha256(&[]),
            1 => leaves[0],
            n => {
                let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn compact_range_root_matches_the_recursive_definition() {
        let mut r = CompactRange::default();
        let mut leaves = vec![];
        assert_eq!(r.root(), mth(&[]));
        for i in 0..130u32 {
            let l = leaf_hash(format!("line {i}").as_bytes());
            leaves.push(l);
            r.append(l);
            assert_eq!(r.root(), mth(&leaves), "size {}", i + 1);
            assert_eq!(r.hashes().len(), (i + 1).count_ones() as usize);
        }
        let restored = CompactRange::from_parts(r.size(), r.hashes().to_vec()).unwrap();
        assert_eq!(restored, r);
        assert!(CompactRange::from_parts(3, vec![[0; 32]]).is_none());
    }

    #[test]
    fn known_vector_and_hex() {
        // SHA-256 of the empty string, the root of an empty tree.
        assert_eq!(to_hex(&CompactRange::default().root()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let h = leaf_hash(b"x");
        assert_eq!(from_hex(&to_hex(&h)), Some(h));
        assert_eq!(from_hex("AB"), None);
    }
}
