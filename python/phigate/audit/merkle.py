"""RFC 9162 §2.1 Merkle trees over the audit trail's leaf hashes: roots, compact ranges,
inclusion and consistency proofs (PATH and PROOF) and their verification."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "CompactRange",
    "MerkleTree",
    "leaf_hash",
    "node_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) = SHA-256 of the empty string


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """k with k < n <= 2k (n > 1): where RFC 9162 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactRange:
    """The roots of the perfect subtrees a tree of ``size`` leaves is made of (one per 1-bit of
    size, largest first): enough to append leaves and compute the root without the leaves."""

    __slots__ = ("_hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1") or any(len(h) != HASH_SIZE for h in hashes):
            raise ValueError(f"a compact range of {size} leaves has {bin(size).count('1')} hashes")
        self.size = size
        self._hashes = list(hashes)

    @property
    def hashes(self) -> list[bytes]:
        return list(self._hashes)

    def append(self, leaf: bytes) -> None:
        """Add a leaf hash: merge equal-sized perfect subtrees, as a binary counter carries."""
        h = leaf
        size = self.size
        while size & 1:
            h = node_hash(self._hashes.pop(), h)
            size >>= 1
        self._hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        """MTH of the leaves so far: the perfect subtrees folded right to left."""
        if not self._hashes:
            return EMPTY_ROOT
        h = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            h = node_hash(left, h)
        return h

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self._hashes)


def root_of(leaves: Iterable[bytes]) -> bytes:
    """MTH of a sequence of leaf hashes."""
    cr = CompactRange()
    for h in leaves:
        cr.append(h)
    return cr.root()


class MerkleTree:
    """Every perfect subtree's root, level by level (level k holds the roots of aligned
    subtrees of 2**k leaves), kept as packed bytes: built once in O(n), after which any
    subtree root, inclusion or consistency proof costs O(log n) hashes."""

    def __init__(self, leaves: Iterable[bytes]) -> None:
        level = bytearray()
        for h in leaves:
            level += h
        self.size = len(level) // HASH_SIZE
        self._levels: list[bytes] = [bytes(level)]
        while len(self._levels[-1]) >= 2 * HASH_SIZE:
            below = self._levels[-1]
            pairs = len(below) // (2 * HASH_SIZE)
            up = bytearray()
            for i in range(pairs):
                o = 2 * HASH_SIZE * i
                up += hashlib.sha256(b"\x01" + below[o : o + 2 * HASH_SIZE]).digest()
            self._levels.append(bytes(up))

    def leaf(self, index: int) -> bytes:
        return self._perfect(0, index)

    def _perfect(self, level: int, index: int) -> bytes:
        o = index * HASH_SIZE
        return self._levels[level][o : o + HASH_SIZE]

    def subtree_root(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for the ranges RFC 9162's recursion visits: ``start`` is aligned
        to the largest power of two not above end - start, so the range is its perfect
        subtrees (one per 1-bit of the length, largest first) folded right to left."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range {start}..{end} is outside a tree of {self.size} leaves")
        if start == end:
            return EMPTY_ROOT
        parts: list[bytes] = []
        pos, remaining = start, end - start
        for level in range(remaining.bit_length() - 1, -1, -1):
            if remaining >> level & 1:
                parts.append(self._perfect(level, pos >> level))
                pos += 1 << level
        h = parts[-1]
        for left in reversed(parts[:-1]):
            h = node_hash(left, h)
        return h

    def root(self, size: int | None = None) -> bytes:
        return self.subtree_root(0, self.size if size is None else size)

    def inclusion_path(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) (RFC 9162 §2.1.3.1), nearest the leaf first."""
        n = self.size if size is None else size
        if not 0 <= index < n <= self.size:
            raise ValueError(f"leaf {index} is not in a tree of {n} leaves")
        path: list[bytes] = []
        start, end = 0, n
        while end - start > 1:
            k = _largest_power_of_two_below(end - start)
            if index - start < k:
                path.append(self.subtree_root(start + k, end))
                end = start + k
            else:
                path.append(self.subtree_root(start, start + k))
                start += k
        path.reverse()  # the recursion adds the top sibling first; PATH lists it last
        return path

    def consistency_path(self, first: int, second: int | None = None) -> list[bytes]:
        """PROOF(first, D[0:second]) (RFC 9162 §2.1.4.1)."""
        n = self.size if second is None else second
        if not 0 <= first <= n <= self.size:
            raise ValueError(f"no consistency proof from {first} to {n} leaves")
        if first in (0, n):
            return []
        path: list[bytes] = []
        m, start, end, whole = first, 0, n, True
        while m != end - start:
            k = _largest_power_of_two_below(end - start)
            if m <= k:
                path.append(self.subtree_root(start + k, end))
                end = start + k
            else:
                path.append(self.subtree_root(start, start + k))
                start, m = start + k, m - k
                whole = False  # SUBPROOF(m - k, D[k:n], false): the right part is not whole
        if not whole:
            path.append(self.subtree_root(start, end))  # SUBPROOF(m, D[m], false) = MTH(D[m])
        path.reverse()
        return path


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, path: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2 (sizes 0 and equal sizes need an empty path)."""
    if first > second:
        return False
    if first == second:
        return not path and first_root == second_root
    if first == 0:
        return not path
    if not path:
        return False
    proof = list(path)
    if first & (first - 1) == 0:  # first is a power of two: its root starts the walk
        proof.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
