"""MinHash signatures and LSH band keys for a batch of documents, vectorized with numpy.

SlimPajama's near-dedup (after datasketch / Broder 1997): the features of a document are the
character n-grams (n = 13) of its normalized text; a signature is the minimum hash of those
features under ``num_perm`` (128) hash functions; the signature is cut into ``bands`` (9) of
``rows`` (13) values, and two documents are candidates when any band matches. The
probability of that is ``1 - (1 - J^rows)^bands``: 0.5 at J ~= 0.8 for 9 x 13.

How a batch is hashed (no Python loop over characters or n-grams):

1. The normalized texts are joined into one UTF-32 code-point array, each followed by
   ``n - 1`` zero pads, so every window of ``n`` code points starting inside a document is
   one of its n-grams (a text shorter than ``n`` has exactly one feature: itself, padded).
2. Three code points (21 bits each) are packed into one uint64; an n-gram's 64-bit hash is a
   multilinear sum ``sum_j pack[i + 3j] * M_j`` (wrapping) over the packs, finished by
   MurmurHash3's fmix64 so every output bit depends on every input bit.
3. ``hashing="one_permutation"`` (default): one-permutation hashing (Li, Owen & Zhang 2012,
   "One Permutation Hashing"): the top log2(K) bits of the hash pick one of K bins, the low
   32 bits are the value, and each bin keeps its minimum (``np.minimum.at``). Empty bins
   are filled by optimal densification (Shrivastava 2017, ICML): bin j borrows from bin
   ``R_t[j]``, t = 1, 2, ... with tables ``R_t`` shared by all documents, so two documents'
   values agree in a bin with probability J, as for K independent permutations. Cost: O(n)
   per document instead of O(K n).
   ``hashing="permutations"``: K universal hashes ``(a h + b) mod (2^61 - 1)`` of the
   32-bit feature hash, truncated to 32 bits -- the datasketch construction SlimPajama
   used; O(K n), kept as the reference.
4. A band key is the fmix64 of a multilinear hash of its ``rows`` uint32 values and the
   band index: 8 bytes per band per document.
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
_C1 = _U64(0xFF51AFD7ED558CCD)
_C2 = _U64(0xC4CEB9FE1A85EC53)
_MERSENNE = _U64((1 << 61) - 1)
_EMPTY = np.uint32(0xFFFFFFFF)


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place on a uint64 array (returned)."""
    x ^= x >> _U64(33)
    x *= _C1
    x ^= x >> _U64(33)
    x *= _C2
    x ^= x >> _U64(33)
    return x


def _odd_multipliers(seed: int, tag: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, tag])
    return rng.integers(0, 2**63, n, dtype=np.uint64) * _U64(2) + _U64(1)


class MinHasher:
    """Signatures and band keys with fixed parameters; the same seed gives the same hashes."""

    def __init__(self, ngram: int = 13, num_perm: int = 128, bands: int = 9, rows: int = 13,
                 seed: int = 1, hashing: str = "one_permutation"):
        if bands * rows > num_perm:
            raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm={num_perm}")
        self.ngram, self.num_perm, self.bands, self.rows = ngram, num_perm, bands, rows
        self.seed, self.hashing = seed, hashing
        self._n_packs = -(-ngram // 3)
        self._mult = _odd_multipliers(seed, 0, self._n_packs)
        self._band_mult = _odd_multipliers(seed, 1, rows)
        rng = np.random.default_rng([seed, 2])
        # permutations: a in [1, p), b in [0, p), as datasketch
        self._a = rng.integers(1, int(_MERSENNE), num_perm, dtype=np.uint64)
        self._b = rng.integers(0, int(_MERSENNE), num_perm, dtype=np.uint64)
        self._bin_bits = max(num_perm.bit_length() - 1, 0)
        self._dens_tables: list[np.ndarray] = []

    # -- features -------------------------------------------------------------------------
    def iter_feature_hashes(self, texts: list[str], chunk: int = 1 << 16):
        """Yield (hashes uint64 [f], doc index int64 [f]) chunk by chunk for all n-grams.

        Work is done in cache-sized chunks with in-place operations: allocating arrays of
        tens of MB costs more (page faults) than the arithmetic itself.
        """
        n = self.ngram
        pad = "\x00" * (n - 1)
        extra = 3 * self._n_packs + 2
        joined = pad.join(texts) + pad + "\x00" * extra
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        starts = np.concatenate(([0], np.cumsum(lengths + n - 1)[:-1]))
        counts = np.maximum(lengths - n + 1, 1)  # a short text is one (padded) feature
        total = len(cps) - extra
        delta = np.zeros(total + 1, dtype=np.int8)
        delta[starts] = 1
        delta[starts + counts] -= 1
        valid = np.cumsum(delta[:-1], dtype=np.int8).astype(bool)
        docid = np.repeat(np.arange(len(texts), dtype=np.int64), lengths + n - 1)
        span = chunk + 3 * self._n_packs
        packs = np.empty(span, dtype=np.uint64)
        tmp = np.empty(span, dtype=np.uint64)
        h = np.empty(chunk, dtype=np.uint64)
        masks = [_U64((1 << (21 * min(3, n - 3 * j))) - 1) for j in range(self._n_packs)]
        for c0 in range(0, total, chunk):
            m = min(chunk, total - c0)
            w = m + 3 * self._n_packs
            # packs[i] = cp[i] | cp[i+1] << 21 | cp[i+2] << 42   (code points are < 2^21)
            np.left_shift(cps[c0 + 1 : c0 + 1 + w], _U64(21), out=packs[:w])
            packs[:w] |= cps[c0 : c0 + w]
            np.left_shift(cps[c0 + 2 : c0 + 2 + w], _U64(42), out=tmp[:w])
            packs[:w] |= tmp[:w]
            h[:m] = 0
            for j in range(self._n_packs):
                np.bitwise_and(packs[3 * j : 3 * j + m], masks[j], out=tmp[:m])
                tmp[:m] *= self._mult[j]
                h[:m] += tmp[:m]
            fmix64(h[:m])
            sel = valid[c0 : c0 + m]
            yield h[:m][sel], docid[c0 : c0 + m][sel]

    def feature_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hashes uint64 [F], doc index int64 [F]) for all n-grams of all ``texts``."""
        parts = list(self.iter_feature_hashes(texts))
        if not parts:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # -- signatures -----------------------------------------------------------------------
    def signatures(self, texts: list[str]) -> np.ndarray:
        """uint32 [len(texts), num_perm] MinHash signatures of the normalized ``texts``."""
        if not texts:
            return np.zeros((0, self.num_perm), dtype=np.uint32)
        if self.hashing == "permutations":
            hashes, doc = self.feature_hashes(texts)
            return self._permutation_signatures(hashes, doc, len(texts))
        return self._oph_signatures(texts)

    def _oph_signatures(self, texts: list[str]) -> np.ndarray:
        k, n_docs = self.num_perm, len(texts)
        sig = np.full(n_docs * k, _EMPTY, dtype=np.uint32)
        shift = _U64(64 - self._bin_bits)
        for hashes, doc in self.iter_feature_hashes(texts):
            slot = doc * k
            if self._bin_bits:
                slot += (hashes >> shift).astype(np.int64)
            np.minimum.at(sig, slot, (hashes & _U64(0xFFFFFFFF)).astype(np.uint32))
        return self._densify(sig.reshape(n_docs, k))

    def _dens_table(self, t: int) -> np.ndarray:
        while len(self._dens_tables) <= t:
            rng = np.random.default_rng([self.seed, 3, len(self._dens_tables)])
            self._dens_tables.append(rng.integers(0, self.num_perm, self.num_perm))
        return self._dens_tables[t]

    def _densify(self, sig: np.ndarray) -> np.ndarray:
        empty = sig == _EMPTY
        rows = np.flatnonzero(empty.any(axis=1))
        if len(rows) == 0:
            return sig
        orig = sig[rows]
        filled = ~empty[rows]
        need = empty[rows].copy()
        out = orig.copy()
        t = 0
        while need.any():
            src = self._dens_table(t)
            take = need & filled[:, src]
            out[take] = orig[:, src][take]
            need &= ~take
            t += 1
        sig[rows] = out
        return sig

    def _permutation_signatures(self, hashes: np.ndarray, doc: np.ndarray, n_docs: int,
                                chunk: int = 4096) -> np.ndarray:
        h32 = hashes >> _U64(32)
        sig = np.empty((n_docs, self.num_perm), dtype=np.uint32)
        bounds = np.searchsorted(doc, np.arange(n_docs + 1))
        for d in range(n_docs):
            best = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
            for c in range(bounds[d], bounds[d + 1], chunk):
                v = h32[c : min(c + chunk, bounds[d + 1]), None] * self._a + self._b
                v = (v & _MERSENNE) + (v >> _U64(61))
                v = np.where(v >= _MERSENNE, v - _MERSENNE, v)
                np.minimum(best, v.min(axis=0), out=best)
            sig[d] = (best & _U64(0xFFFFFFFF)).astype(np.uint32)
        return sig

    # -- LSH ------------------------------------------------------------------------------
    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """uint64 [n_docs, bands]: one key per band; equal keys = a candidate pair."""
        n = sig.shape[0]
        keys = np.empty((n, self.bands), dtype=np.uint64)
        for b in range(self.bands):
            block = sig[:, b * self.rows : (b + 1) * self.rows].astype(np.uint64)
            acc = (block * self._band_mult).sum(axis=1, dtype=np.uint64) + _U64(b)
            keys[:, b] = fmix64(acc)
        return keys


def agreement(sig: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Fraction of equal signature values of document pairs (a[i], b[i]): estimated Jaccard."""
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), chunk):
        e = slice(s, s + chunk)
        out[e] = (sig[a[e]] == sig[b[e]]).mean(axis=1)
    return out
