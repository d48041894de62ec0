"""Global deduplication over the keys of every document: exact, then MinHash LSH.

Both run in one process on small fixed-size keys, never on text, so the memory is bounded
and known: per document 8 B ordinal + 16 B exact key + 8 B x bands LSH keys (72 B for 9
bands) + 4 B source + 8 B size, ~110 B, plus about as much again for sort temporaries; with
``verify`` add the signature, 4 B x num_perm (512 B). A billion documents is ~220 GB
(SlimPajama's 1.21T tokens were ~0.59 billion documents after filtering).

* exact: documents with equal normalized-text keys form a group; the first in input order
  (smallest ordinal = file index << 40 | line) is the representative.
* near: over representatives only, each band's keys are sorted and runs of equal keys are
  LSH buckets. Without verification a bucket is linked as a star to its first member
  (enough for connected components). With verification every pair of a bucket (star for
  buckets above ``max_bucket_pairs``) is kept only if its signatures agree on at least
  ``threshold`` of the values (the MinHash estimate of Jaccard). Connected components
  (``scipy.sparse.csgraph``) are the duplicate clusters; the member with the smallest
  ordinal is kept, so the choice does not depend on the order of the tasks or workers.
* near, ``verify: exact``: the candidate pairs (all pairs of buckets up to
  ``max_bucket_pairs``, as above) are checked by the true Jaccard of their n-gram sets
  (:func:`verify_exact`), computed only for documents in some candidate pair; components
  are taken over the verified pairs only, so no two documents are merged unless a chain of
  pairs each with Jaccard >= ``threshold`` links them -- the definition of the truth.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def exact_groups(order_keys: np.ndarray) -> np.ndarray:
    """For keys [n, 2] uint64 (rows already in input order), the representative of each row."""
    n = len(order_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.lexsort((np.arange(n), order_keys[:, 1], order_keys[:, 0]))
    k = order_keys[idx]
    new = np.ones(n, dtype=bool)
    new[1:] = (k[1:] != k[:-1]).any(axis=1)
    first = idx[np.flatnonzero(new)]
    group = np.cumsum(new) - 1
    rep = np.empty(n, dtype=np.int64)
    rep[idx] = first[group]
    return rep


def _bucket_runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable order of ``keys`` and the [start, end) of each run of >= 2 equal keys."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    brk = np.flatnonzero(k[1:] != k[:-1]) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [len(k)]))
    multi = ends - starts >= 2
    return order, starts[multi], ends[multi]


def candidate_pairs(bands: np.ndarray, all_pairs_upto: int = 0) -> np.ndarray:
    """Unique candidate pairs [m, 2] (i < j) from band keys [n, B]; rows are input order.

    Star edges (each member to its bucket's first member) for every bucket; with
    ``all_pairs_upto`` > 0, also every pair inside buckets of at most that size.
    """
    edges = []
    for b in range(bands.shape[1]):
        order, starts, ends = _bucket_runs(bands[:, b])
        if len(starts) == 0:
            continue
        sizes = ends - starts
        first = np.repeat(order[starts], sizes - 1)
        members = np.concatenate([order[s + 1 : e] for s, e in zip(starts, ends, strict=True)])
        edges.append(np.stack([first, members], axis=1))
        if all_pairs_upto > 2:
            for s, e in zip(starts, ends, strict=True):
                if 2 < e - s <= all_pairs_upto:
                    m = order[s:e]
                    i, j = np.triu_indices(len(m), k=1)
                    edges.append(np.stack([m[i], m[j]], axis=1))
    if not edges:
        return np.zeros((0, 2), dtype=np.int64)
    e = np.concatenate(edges).astype(np.int64)
    e.sort(axis=1)
    return np.unique(e, axis=0)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(edges) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                       shape=(n, n))
    return connected_components(graph, directed=False)[1]


def intersection_size(a: np.ndarray, b: np.ndarray) -> int:
    """|a & b| of two sorted arrays of unique values: one merge (timsort on two runs)."""
    c = np.concatenate((a, b))
    c.sort(kind="stable")
    return int(np.count_nonzero(c[1:] == c[:-1]))


def verify_exact(pairs: np.ndarray, sets: Callable[[int], np.ndarray],
                 threshold: float) -> tuple[np.ndarray, dict]:
    """The candidate ``pairs`` [m, 2] whose exact Jaccard is >= ``threshold``.

    ``sets(i)`` is row i's sorted unique n-gram hashes. Two shortcuts that change no
    component: a pair whose ends are already linked by verified pairs is skipped (union-find
    over the pairs in their given, sorted order), and a pair whose set sizes alone bound
    its Jaccard below the threshold (min/max) is rejected without intersecting. The
    returned pairs are a spanning forest of the verified graph: the same components as
    verifying every candidate pair.
    """
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent.get(x, x)
        return root

    kept: list[tuple[int, int]] = []
    checked = linked = by_size = 0
    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra == rb:
            linked += 1
            continue
        sa, sb = sets(a), sets(b)
        la, lb = len(sa), len(sb)
        if la == 0 or lb == 0 or min(la, lb) / max(la, lb) < threshold:
            by_size += 1
            continue
        checked += 1
        inter = intersection_size(sa, sb)
        if inter / (la + lb - inter) >= threshold:
            kept.append((a, b))
            parent[max(ra, rb)] = min(ra, rb)
    info = {"exact_intersections": checked, "exact_skipped_linked": linked,
            "exact_rejected_by_size": by_size}
    out = np.array(kept, dtype=np.int64).reshape(-1, 2)
    return out, info


def near_dedup(bands: np.ndarray, sig: np.ndarray | None = None, *, verify: bool | str = False,
               threshold: float = 0.8, max_bucket_pairs: int = 64,
               load_sets: Callable[[np.ndarray], Callable[[int], np.ndarray]] | None = None,
               ) -> tuple[np.ndarray, dict]:
    """Component label per row (rows in input order) and counters.

    ``verify``: False (every candidate links), True / ``"signature"`` (signature agreement
    >= threshold; needs ``sig``), ``"exact"`` (exact n-gram Jaccard >= threshold; needs
    ``load_sets(rows) -> sets``, called once with the sorted rows of candidate documents).
    """
    from lmfab.data.curate.minhash import agreement

    mode = "signature" if verify is True else (verify or "none")
    n = len(bands)
    pairs = candidate_pairs(bands, max_bucket_pairs if mode != "none" else 0)
    info = {"candidate_pairs": int(len(pairs))}
    if mode == "signature":
        if sig is None:
            raise ValueError("near_dedup verify needs signatures")
        if len(pairs):
            est = agreement(sig, pairs[:, 0], pairs[:, 1])
            pairs = pairs[est >= threshold]
        info["verified_pairs"] = int(len(pairs))
    elif mode == "exact":
        if load_sets is None:
            raise ValueError("near_dedup verify=exact needs load_sets")
        if len(pairs):
            docs = np.unique(pairs)
            info["exact_candidate_docs"] = int(len(docs))
            pairs, more = verify_exact(pairs, load_sets(docs), threshold)
            info.update(more)
        info["verified_pairs"] = int(len(pairs))
    elif mode != "none":
        raise ValueError(f"near_dedup verify: unknown mode {verify!r}")
    return components(n, pairs), info


def first_of_component(labels: np.ndarray) -> np.ndarray:
    """Boolean mask: True for the first row (smallest index) of each label."""
    keep = np.zeros(len(labels), dtype=bool)
    _, first = np.unique(labels, return_index=True)
    keep[first] = True
    return keep


def global_dedup(ordinal: np.ndarray, exact: np.ndarray | None, bands: np.ndarray | None,
                 sig: np.ndarray | None, near_cfg,
                 load_sets: Callable[[np.ndarray], Callable[[int], np.ndarray]] | None = None,
                 ) -> dict:
    """Decide which documents survive. Arrays are in task order; returns masks in task order.

    ``load_sets(task_rows) -> sets`` (for ``verify: exact``) gives the n-gram sets of rows
    in task order, looked up by task-order row.

    Returns ``exact_keep``, ``near_keep`` (bool [n]), ``cluster`` (int64 [n], -1 for
    documents without a duplicate) and ``info`` counters.
    """
    n = len(ordinal)
    order = np.argsort(ordinal, kind="stable")  # input order: file, then line
    rep = np.arange(n)
    if exact is not None:
        rep_sorted = exact_groups(exact[order])
        rep = order[rep_sorted]  # task-order index of each row's representative (sorted rows)
        rep_task = np.empty(n, dtype=np.int64)
        rep_task[order] = rep
        rep = rep_task
    exact_keep = rep == np.arange(n)
    near_keep = exact_keep.copy()
    cluster = np.full(n, -1, dtype=np.int64)
    info: dict = {"exact_removed": int(n - exact_keep.sum())}
    if bands is not None:
        reps_sorted = order[exact_keep[order]]  # representatives in input order

        def load_rep_sets(rows: np.ndarray) -> Callable[[int], np.ndarray]:
            get = load_sets(reps_sorted[rows])
            return lambda i: get(int(reps_sorted[i]))

        labels, more = near_dedup(
            bands[reps_sorted], None if sig is None else sig[reps_sorted],
            verify=near_cfg.verify, threshold=near_cfg.threshold,
            max_bucket_pairs=near_cfg.max_bucket_pairs,
            load_sets=None if load_sets is None else load_rep_sets,
        )
        info.update(more)
        keep_rep = first_of_component(labels)
        near_keep[:] = False
        near_keep[reps_sorted[keep_rep]] = True
        # cluster of every document = component of its representative
        comp = np.full(n, -1, dtype=np.int64)
        comp[reps_sorted] = labels
        comp = comp[rep]
        sizes = np.bincount(comp, minlength=int(comp.max()) + 1 if n else 0)
        cluster = np.where(sizes[comp] >= 2, comp, -1) if n else cluster
        info["near_removed"] = int(exact_keep.sum() - near_keep.sum())
    elif exact is not None:
        sizes = np.bincount(rep, minlength=n)
        cluster = np.where(sizes[rep] >= 2, rep, -1)
    return {"exact_keep": exact_keep, "near_keep": near_keep, "cluster": cluster, "info": info}
