"""IVF search over list-major storage (each list's vectors contiguous, rows `offsets[l]` to
`offsets[l + 1]`), in numpy on views of the index's tensors.

Why numpy: an IVF query scores a few hundred candidate vectors, microseconds of arithmetic, so
its cost is the fixed cost of each operation. On the 2-CPU benchmark machine (100k vectors, 1265
lists, nprobe 2) one query took 185-320 µs as ~25 torch operations (5-10 µs of dispatch each)
and 140-170 µs as these steps in numpy (about 1 µs each); FAISS took 40-60 µs.

Batches are list-major: each probed list is read once, in one product with all the queries
that probe it, its scores put in those queries' candidate buffers; then one top-k per query.
All of it runs on the calling thread (one query's steps are microseconds; see one_thread for
batches), as FAISS's one-query search does.

Scores are similarities, higher is better, as in index.py: the dot product (cosine on
normalised vectors) or, for l2, minus the squared distance. Each result row holds k entries,
best first: storage rows, or -1 (score -inf) where fewer than k candidates pass the filter.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

# Products go to numpy's BLAS (OpenBLAS) in pieces of at most this many multiply-adds, below
# the sizes where OpenBLAS splits one call over its threads (m*n*k >= 262144 for a matrix
# product, m*n >= 460800 for a matrix-vector product in OpenBLAS 0.3.2x-0.3.31): waking them
# costs more than such a product, and on a busy machine a descheduled thread made one query's
# p99 12-16 ms (measured, 1265 centroids x 384).
BLAS_PIECE = 1 << 17
# Batched queries go in groups whose candidate buffer (queries x nprobe x longest list) stays
# within this many floats (64 MiB).
BUFFER_FLOATS = 1 << 24


@contextlib.contextmanager
def one_thread():
    """torch's intra-op parallelism off for the calling thread (a per-thread OpenMP setting),
    restored afterwards. A batch's torch steps are a few milliseconds each; on the busy 2-CPU
    benchmark machine two threads made a 100k-vector, 500-query batch 2-5x slower (2900-6100
    queries/s against 10100-12200 on one thread): every parallel region waits for a
    descheduled worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ListMajorScan:
    """The search side of an IVF index: centroids, list-major vectors, list offsets."""

    def __init__(
        self,
        centroids: np.ndarray,
        vectors: np.ndarray,
        offsets: list[int],
        metric: str,
        squared_norms: np.ndarray | None = None,
    ) -> None:
        self.centroids = centroids
        self.vectors = vectors
        self.offsets = offsets
        self.metric = metric
        self.squared_norms = squared_norms
        self.centroid_norms = (centroids * centroids).sum(1) if metric == "l2" else None

    def similarities(self, queries: np.ndarray, vectors: np.ndarray, norms) -> np.ndarray:
        """[len(queries), len(vectors)], in pieces that keep OpenBLAS on the calling thread."""
        rows = max(1, BLAS_PIECE // (len(queries) * vectors.shape[1]))
        if len(vectors) <= rows:
            dots = queries @ vectors.T
        else:
            dots = np.concatenate(
                [queries @ vectors[i : i + rows].T for i in range(0, len(vectors), rows)], axis=1
            )
        if self.metric != "l2":
            return dots
        return 2 * dots - norms - (queries * queries).sum(1, keepdims=True)

    def search(
        self, queries: np.ndarray, k: int, nprobe: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """[nq, k] scores and storage rows of the best k among each query's nprobe lists
        (queries already normalised for cosine)."""
        nprobe = min(nprobe, len(self.centroids))
        if len(queries) == 1:
            return self._search_one(queries, k, nprobe, allowed)
        # The batch's centroid scores as one product and top-k in torch: numpy's row-wise
        # argpartition took ~40 ms for 500 queries x 1265 lists, torch's topk 3 ms.
        with one_thread():
            centroid_scores = torch.from_numpy(queries) @ torch.from_numpy(self.centroids).T
            if self.centroid_norms is not None:
                centroid_scores = 2 * centroid_scores - torch.from_numpy(self.centroid_norms)
            probes = centroid_scores.topk(nprobe, dim=1).indices.numpy()
            return self._search_batch(queries, k, probes, allowed)

    def _search_one(self, query, k, nprobe, allowed):
        """The probed lists' row ranges concatenated, one product, one partial sort."""
        centroid_scores = self.similarities(query, self.centroids, self.centroid_norms)[0]
        offsets = self.offsets
        ranges = [
            (offsets[p], offsets[p + 1])
            for p in best_first(centroid_scores, nprobe).tolist()
            if offsets[p] < offsets[p + 1]
        ]
        values = np.full((1, k), -np.inf, dtype=np.float32)
        rows = np.full((1, k), -1, dtype=np.int64)
        if not ranges:
            return values, rows
        candidates = np.concatenate([self.vectors[start:end] for start, end in ranges])
        norms = None
        if self.squared_norms is not None:
            norms = np.concatenate([self.squared_norms[start:end] for start, end in ranges])
        scores = self.similarities(query, candidates, norms)[0]
        if allowed is not None:
            scores[~np.concatenate([allowed[start:end] for start, end in ranges])] = -np.inf
        picked = best_first(scores, k)
        picked = picked[scores[picked] > -np.inf]
        # A candidate position back to its storage row: the range it falls in, the offset there.
        lengths = np.array([end - start for start, end in ranges])
        ends = np.cumsum(lengths)
        which = np.searchsorted(ends, picked, side="right")
        firsts = np.array([start for start, _ in ranges])
        values[0, : len(picked)] = scores[picked]
        rows[0, : len(picked)] = firsts[which] + picked - (ends - lengths)[which]
        return values, rows

    def _search_batch(self, queries, k, probes, allowed):
        """List-major: each probed list scored once against all the queries probing it, into
        those queries' buffers [nprobe, longest probed list] at that probe's slot (-inf
        elsewhere); then one top-k per query over its buffer."""
        count, nprobe = probes.shape
        offsets = np.asarray(self.offsets)
        starts = offsets[probes]
        width = max(1, int((offsets[probes + 1] - starts).max()))
        group = max(1, BUFFER_FLOATS // (nprobe * width))
        if count > group:
            parts = [
                self._search_batch(queries[i : i + group], k, probes[i : i + group], allowed)
                for i in range(0, count, group)
            ]
            return np.concatenate([v for v, _ in parts]), np.concatenate([r for _, r in parts])
        buffer = np.full((count, nprobe, width), -np.inf, dtype=np.float32)
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        by_list = flat[order]
        who, slot = order // nprobe, order % nprobe
        bounds = [0, *(np.flatnonzero(np.diff(by_list)) + 1).tolist(), len(order)]
        for first, last in zip(bounds[:-1], bounds[1:], strict=True):
            start, end = self.offsets[by_list[first]], self.offsets[by_list[first] + 1]
            if start == end:
                continue
            members = who[first:last]
            norms = None if self.squared_norms is None else self.squared_norms[start:end]
            buffer[members, slot[first:last], : end - start] = self.similarities(
                queries[members], self.vectors[start:end], norms
            )
        rows = starts[:, :, None] + np.arange(width)
        if allowed is not None:
            buffer[~allowed[np.minimum(rows, len(allowed) - 1)]] = -np.inf
        kept = min(k, nprobe * width)
        top_values, picked = torch.from_numpy(buffer).view(count, -1).topk(kept, dim=1)
        values = np.full((count, k), -np.inf, dtype=np.float32)
        found = np.full((count, k), -1, dtype=np.int64)
        values[:, :kept] = top_values.numpy()
        found[:, :kept] = np.where(
            values[:, :kept] > -np.inf,
            np.take_along_axis(rows.reshape(count, -1), picked.numpy(), 1),
            -1,
        )
        return values, found


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows left zero), as torch's F.normalize."""
    lengths = np.sqrt((vectors * vectors).sum(1, keepdims=True))
    return vectors / np.maximum(lengths, 1e-12)


def best_first(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest of 1-D `scores` (all of them if fewer), largest first."""
    picked = np.argpartition(scores, -k)[-k:] if k < len(scores) else np.arange(len(scores))
    return picked[np.argsort(-scores[picked], kind="stable")]
