"""The vector index: exact search (a batched matrix product; one query in numpy) or IVF (k-means
lists, `nprobe` of them searched per query), cosine, dot or l2, with equality filters on chunk
metadata. Equal scores rank the lower chunk number first, in every exact path.

On disk (one folder, written to a temporary sibling and renamed into place, so a reader never
sees half of it):
- `vectors.safetensors`: `vectors` [n, d] float32 (for IVF grouped by list, `rows` giving each
  row's chunk number, `list_offsets` [nlist + 1] where each list starts, and `centroids`;
  for l2 `squared_norms`);
- `chunks.jsonl`: one Chunk per line, in chunk-number order;
- `manifest.json`: format version, dimension, metric, index type, embedder, counts, nprobe.
`load` memory-maps the tensors (a private, copy-on-write map: the pages are the file's, shared
with every process that maps it, and nothing is read until searched).

Scores are similarities, higher is better: the cosine, the dot product, or for l2 minus the
squared Euclidean distance.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kvops.worker.rag.chunking import Chunk
from kvops.worker.rag.ivf_scan import ListMajorScan, normalised

FORMAT_VERSION = 1
METRICS = ("cosine", "dot", "l2")
INDEX_TYPES = ("flat", "ivf")
# Score blocks of at most this many floats (64 MiB) when scanning the whole index.
SCORE_BLOCK = 1 << 24


@dataclass
class Hit:
    chunk: Chunk
    score: float

    def as_dict(self) -> dict:
        """The wire shape of a hit (HTTP, the search client)."""
        return {
            "chunk_id": self.chunk.id,
            "source": self.chunk.source,
            "text": self.chunk.text,
            "score": self.score,
            "metadata": self.chunk.metadata,
        }


def default_nlist(count: int) -> int:
    """About 4 * sqrt(n) lists (FAISS' guidance is 4-16 * sqrt(n)), at least one vector each."""
    return max(1, min(count, round(4 * math.sqrt(count))))


def calibrated_nprobe(index: VectorIndex, target_recall: float = 0.95, sample: int = 100) -> int:
    """The smallest power-of-two nprobe whose recall@10 against exact search reaches
    `target_recall` for a sample of the indexed vectors used as queries (each one's own row left
    out of both answers, since both would find it)."""
    assert index.centroids is not None
    nlist = index.centroids.shape[0]
    generator = torch.Generator().manual_seed(1)
    picked = torch.randperm(len(index), generator=generator)[: min(sample, len(index))]
    queries = index.vectors[picked].float()
    k = min(11, len(index))
    exact = VectorIndex(index.vectors, index.chunks, index.metric)
    _, truth = exact._exact(queries, k, None)
    truth_sets = [set(row) - {int(own)} for row, own in zip(truth.tolist(), picked, strict=True)]
    total = max(1, sum(len(found) for found in truth_sets))
    nprobe = 1
    while nprobe < nlist:
        _, found = index._ivf(queries.numpy(), k, None, nprobe)
        hits = sum(len(t & set(f)) for t, f in zip(truth_sets, found.tolist(), strict=True))
        if hits / total >= target_recall:
            return nprobe
        nprobe *= 2
    return nlist


def top_k_lowest_first(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest of 1-D `scores` (all if fewer), largest first, and among
    equal scores the lower position first: the one rule for ties, which both exact paths (one
    query in numpy, batches in torch) follow so that they return the same rows."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    kth = np.partition(scores, -k)[-k]
    above = np.flatnonzero(scores > kth)
    picked = np.concatenate([above, np.flatnonzero(scores == kth)[: k - len(above)]])
    picked.sort()
    return picked[np.argsort(-scores[picked], kind="stable")]


def batch_top_k_lowest_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's topk of each row, with ties resolved as `top_k_lowest_first` (torch picks and
    orders among equal scores arbitrarily). Only rows whose (k+1)-th score equals the k-th,
    so that the choice among equal scores matters, are redone, in numpy: with real embeddings
    that is almost never (-inf, filtered out, is left as it is: those become -1 anyway)."""
    values, positions = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    straddling: list[int] = []
    if values.shape[1] > k:
        tied = (values[:, k] == values[:, k - 1]) & (values[:, k - 1] > float("-inf"))
        straddling = tied.nonzero().flatten().tolist()
        values, positions = values[:, :k], positions[:, :k]
    for row in straddling:
        positions[row] = torch.from_numpy(top_k_lowest_first(scores[row].numpy(), k))
        values[row] = scores[row, positions[row]]
    # Order the k by position, then (stable) by score: equal scores lower position first.
    positions, order = positions.sort(1)
    values, by_score = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    return values, positions.gather(1, by_score)


def kmeans(
    vectors: torch.Tensor,
    lists: int,
    metric: str,
    iterations: int = 10,
    sample_per_list: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """Lloyd's k-means on a random sample of `sample_per_list` vectors per list; spherical
    (normalised centroids) for cosine. Empty lists are re-seeded with a random sample vector."""
    generator = torch.Generator().manual_seed(seed)
    count = vectors.shape[0]
    sample_size = min(count, lists * sample_per_list)
    sample = vectors[torch.randperm(count, generator=generator)[:sample_size].sort().values]
    sample = sample.float()
    centroids = sample[torch.randperm(sample_size, generator=generator)[:lists]].clone()
    for _ in range(iterations):
        assignment = nearest(sample, centroids, metric)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, sample)
        counts = torch.bincount(assignment, minlength=lists)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        if empty.any():
            refill = torch.randint(sample_size, (int(empty.sum()),), generator=generator)
            centroids[empty] = sample[refill]
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=-1)
    return centroids


def scores(queries: torch.Tensor, vectors: torch.Tensor, metric: str, norms=None) -> torch.Tensor:
    """[len(queries), len(vectors)] similarities (for l2, minus the squared distance)."""
    dots = queries @ vectors.T
    if metric != "l2":
        return dots
    if norms is None:
        norms = (vectors * vectors).sum(1)
    return 2 * dots - norms - (queries * queries).sum(1, keepdim=True)


def nearest(vectors: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """Each vector's best centroid, in blocks that keep the score matrix small."""
    block = max(1, SCORE_BLOCK // max(1, centroids.shape[0]))
    norms = (centroids * centroids).sum(1) if metric == "l2" else None
    return torch.cat(
        [
            scores(vectors[i : i + block].float(), centroids, metric, norms).argmax(1)
            for i in range(0, vectors.shape[0], block)
        ]
    )


class VectorIndex:
    def __init__(
        self,
        vectors: torch.Tensor,
        chunks: list[Chunk],
        metric: str = "cosine",
        embedder: str = "",
        *,
        centroids: torch.Tensor | None = None,
        list_offsets: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        squared_norms: torch.Tensor | None = None,
        nprobe: int | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
        if vectors.ndim != 2 or vectors.shape[0] != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but vectors of shape {tuple(vectors.shape)}")
        self.vectors = vectors
        self.chunks = chunks
        self.metric = metric
        self.embedder = embedder
        self.centroids = centroids
        self.list_offsets = list_offsets
        self.rows = rows
        if metric == "l2" and squared_norms is None:
            squared_norms = (vectors * vectors).sum(1)
        self.squared_norms = squared_norms
        self.nprobe = nprobe
        self._filter_rows: dict[str, dict[str, list[int]]] = {}
        self._mmaps: list[mmap.mmap] = []
        self._scan: ListMajorScan | None = None

    @property
    def index_type(self) -> str:
        return "flat" if self.centroids is None else "ivf"

    @property
    def dimension(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return self.vectors.shape[0]

    # ---------------------------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        vectors: torch.Tensor,
        chunks: list[Chunk],
        metric: str = "cosine",
        index_type: str = "flat",
        embedder: str = "",
        nlist: int | None = None,
        nprobe: int | None = None,
        seed: int = 0,
    ) -> VectorIndex:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index type {index_type!r}: expected flat or ivf")
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
        vectors = vectors.float().contiguous()
        if metric == "cosine":
            vectors = F.normalize(vectors, dim=-1)
        if index_type == "flat" or len(chunks) == 0:
            return cls(vectors, chunks, metric, embedder)
        nlist = nlist or default_nlist(len(chunks))
        if not 1 <= nlist <= len(chunks):
            raise ValueError(f"nlist {nlist}: expected 1 to the vector count {len(chunks)}")
        centroids = kmeans(vectors, nlist, metric, seed=seed)
        assignment = nearest(vectors, centroids, metric)
        rows = torch.argsort(assignment, stable=True)
        counts = torch.bincount(assignment, minlength=nlist)
        list_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        index = cls(
            vectors[rows].contiguous(),
            chunks,
            metric,
            embedder,
            centroids=centroids,
            list_offsets=list_offsets,
            rows=rows,
            nprobe=nprobe,
        )
        if nprobe is None:
            index.nprobe = calibrated_nprobe(index)
        return index

    # --------------------------------------------------------------------------------- search

    def search(
        self,
        queries: torch.Tensor,
        top_k: int,
        filters: dict[str, str] | None = None,
        nprobe: int | None = None,
    ) -> list[list[Hit]]:
        """The top_k hits of each query row ([n, d] or one [d] vector: then one list)."""
        if queries.ndim == 1:
            queries = queries.unsqueeze(0)
        values, chunk_numbers = self.search_ids(queries, top_k, filters, nprobe)
        return [
            [
                Hit(self.chunks[number], score)
                for score, number in zip(row_values, row_numbers, strict=True)
                if number >= 0
            ]
            for row_values, row_numbers in zip(values.tolist(), chunk_numbers.tolist(), strict=True)
        ]

    def search_ids(
        self,
        queries: torch.Tensor,
        top_k: int,
        filters: dict[str, str] | None = None,
        nprobe: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[nq, k] scores and chunk numbers (-1 where fewer than k vectors pass the filters)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(
                f"queries of shape {tuple(queries.shape)}: this index holds {self.dimension}-d "
                "vectors"
            )
        queries = queries.detach().float()
        allowed = self.allowed_rows(filters) if filters else None
        k = min(top_k, len(self))
        if k == 0:
            empty = torch.empty(queries.shape[0], 0)
            return empty, empty.long()
        if self.centroids is None and queries.shape[0] == 1:
            query = queries.contiguous().numpy()[0]
            if self.metric == "cosine":
                query = normalised(query[None])[0]
            one_values, one_rows = self._exact_one(query, k, allowed)
            return torch.from_numpy(one_values[None]), torch.from_numpy(one_rows[None])
        if self.centroids is None:
            if self.metric == "cosine":
                queries = F.normalize(queries, dim=-1)
            values, rows = self._exact(queries, k, allowed)
            return values, rows.where(values > float("-inf"), -1)
        ivf_queries = queries.contiguous().numpy()
        if self.metric == "cosine":
            ivf_queries = normalised(ivf_queries)
        ivf_values, ivf_rows = self._ivf(ivf_queries, k, allowed, nprobe or self.nprobe or 1)
        assert self.rows is not None
        chunk_numbers = np.where(ivf_rows >= 0, self.rows.numpy()[ivf_rows], -1)
        return torch.from_numpy(ivf_values), torch.from_numpy(chunk_numbers)

    def _exact_one(self, query, k, allowed) -> tuple[np.ndarray, np.ndarray]:
        """One query's k best scores and storage rows (-1 where none), in numpy on a view of the
        (memory-mapped) vectors. Why einsum: its SIMD loop, on the calling thread, read 10k x
        384 vectors in 0.66 ms and 100k in 6.9 ms where OpenBLAS's matrix-vector product took
        1.1 and 13 ms (in pieces, to keep it on one thread), torch's 1.4 and 16 ms and FAISS's
        flat search 1.3 and 11.6 ms (one thread each, measured interleaved on the 2-CPU
        benchmark machine)."""
        similarities = np.einsum("ij,j->i", self.vectors.numpy(), query)
        if self.metric == "l2":
            assert self.squared_norms is not None
            similarities = 2 * similarities - self.squared_norms.numpy() - query @ query
        if allowed is not None:
            similarities[~allowed.numpy()] = -np.inf
        rows = top_k_lowest_first(similarities, k)
        values = similarities[rows]
        return values, np.where(values > -np.inf, rows, -1)

    def _exact(self, queries, k, allowed):
        block = max(k, SCORE_BLOCK // queries.shape[0])
        best_values = best_rows = None
        for start in range(0, len(self), block):
            end = min(start + block, len(self))
            block_scores = self._scores(queries, start, end)
            if allowed is not None:
                block_scores.masked_fill_(~allowed[start:end], float("-inf"))
            values, rows = batch_top_k_lowest_first(block_scores, min(k, end - start))
            rows += start
            if best_values is not None:
                # Candidates in row order, so that equal scores keep the lower row.
                rows, order = torch.cat([best_rows, rows], 1).sort(1)
                values = torch.cat([best_values, values], 1).gather(1, order)
                values, picked = batch_top_k_lowest_first(values, k)
                rows = rows.gather(1, picked)
            best_values, best_rows = values, rows
        return best_values, best_rows

    def _ivf(self, queries, k, allowed, nprobe) -> tuple[np.ndarray, np.ndarray]:
        """[nq, k] scores and storage rows (-1 where none) from the nprobe lists nearest each
        query (ivf_scan.py)."""
        if self._scan is None:
            assert self.centroids is not None and self.list_offsets is not None
            norms = self.squared_norms
            self._scan = ListMajorScan(
                self.centroids.numpy(),
                self.vectors.numpy(),
                self.list_offsets.tolist(),
                self.metric,
                None if norms is None else norms.numpy(),
            )
        return self._scan.search(queries, k, nprobe, None if allowed is None else allowed.numpy())

    def _scores(self, queries, start, end):
        norms = None if self.squared_norms is None else self.squared_norms[start:end]
        return scores(queries, self.vectors[start:end], self.metric, norms)

    def allowed_rows(self, filters: dict[str, str]) -> torch.Tensor:
        """The storage rows whose chunk matches every filter (`source` or a metadata key)."""
        allowed = torch.ones(len(self), dtype=torch.bool)
        for key, value in filters.items():
            matching = torch.zeros(len(self), dtype=torch.bool)
            matching[self._rows_by_value(key).get(value, [])] = True
            allowed &= matching
        return allowed

    def _rows_by_value(self, key: str) -> dict[str, list[int]]:
        """Storage rows by value of one filter key, built on the key's first use."""
        if key not in self._filter_rows:
            chunk_row = range(len(self)) if self.rows is None else torch.argsort(self.rows).tolist()
            by_value: dict[str, list[int]] = {}
            for chunk, row in zip(self.chunks, chunk_row, strict=True):
                value = chunk.source if key == "source" else chunk.metadata.get(key)
                if value is not None:
                    by_value.setdefault(value, []).append(row)
            self._filter_rows[key] = by_value
        return self._filter_rows[key]

    # ------------------------------------------------------------------------------ save/load

    def manifest(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "dimension": self.dimension,
            "metric": self.metric,
            "index_type": self.index_type,
            "embedder": self.embedder,
            "chunks": len(self),
            "documents": len({chunk.source for chunk in self.chunks}),
            "nlist": None if self.centroids is None else self.centroids.shape[0],
            "nprobe": self.nprobe,
        }

    def save(self, folder: str | Path) -> None:
        """Write the index to `folder` atomically: a temporary sibling renamed into place (an
        existing folder is replaced; a crash leaves the old one or none, never half of one)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            tensors = {"vectors": self.vectors.contiguous()}
            for name in ("centroids", "list_offsets", "rows", "squared_norms"):
                value = getattr(self, name)
                if value is not None:
                    tensors[name] = value.contiguous()
            save_file(tensors, temporary / "vectors.safetensors")
            with open(temporary / "chunks.jsonl", "w", encoding="utf-8") as file:
                for chunk in self.chunks:
                    file.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
            (temporary / "manifest.json").write_text(json.dumps(self.manifest(), indent=1) + "\n")
            for written in temporary.iterdir():
                with open(written, "rb") as handle:
                    os.fsync(handle.fileno())
            os.chmod(temporary, 0o755)
            if folder.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
                os.rename(folder, retired / folder.name)
                os.rename(temporary, folder)
                shutil.rmtree(retired)
            else:
                os.rename(temporary, folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str | Path) -> VectorIndex:
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{folder}: not a vector index (no manifest.json)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{folder}: index format {manifest.get('format')!r}, this kvops reads "
                f"{FORMAT_VERSION}"
            )
        tensors, mapping = map_safetensors(folder / "vectors.safetensors")
        with open(folder / "chunks.jsonl", encoding="utf-8") as file:
            chunks = [Chunk(**json.loads(line)) for line in file]
        index = cls(
            tensors["vectors"],
            chunks,
            manifest["metric"],
            manifest["embedder"],
            centroids=tensors.get("centroids"),
            list_offsets=tensors.get("list_offsets"),
            rows=tensors.get("rows"),
            squared_norms=tensors.get("squared_norms"),
            nprobe=manifest.get("nprobe"),
        )
        index._mmaps.append(mapping)
        return index


_SAFETENSORS_DTYPES = {"F32": torch.float32, "I64": torch.int64, "F16": torch.float16}


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], mmap.mmap]:
    """The tensors of a safetensors file as views of one private memory map (safetensors'
    loaders copy into memory; the layout is an 8-byte header length, a JSON header with each
    tensor's dtype, shape and byte range, then the data)."""
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    header_length = int.from_bytes(mapping[:8], "little")
    header = json.loads(mapping[8 : 8 + header_length])
    base = 8 + header_length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = (
            torch.frombuffer(mapping, dtype=dtype, count=count, offset=base + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.view(entry["shape"])
    return tensors, mapping
