"""Vector search: kvops' index (worker/rag/index.py) against faiss-cpu on the same vectors in the
same run.

- Build throughput: the whole `kvops index build` pipeline on a real corpus (docstrings of
  standard-library modules: chunking, MiniLM embeddings, index, save), in chunks/s.
- Per size (10k, 100k, 1M vectors, dimension 384, by default): build time, then single-query
  latency p50/p99 and batched queries/s for exact search (kvops flat against IndexFlatIP) and
  IVF (against IndexIVFFlat with the same number of lists, each at the smallest power-of-two
  nprobe whose recall@10 against exact search reaches --target-recall).

The vectors are random points around random centres (normalised: cosine = inner product), as in
tests/test_rag_index.py: embeddings cluster by topic; isotropic random vectors have no near
neighbours for IVF to find. Results go to bench/results/vector_search-<date>.json.

    python bench/vector_search.py [--sizes 10000 100000 1000000] [--queries 1000] [--single 100]
        [--ivf-max N] [--repeats 3] [--threads N]

Timings alternate kvops and FAISS back to back (--repeats times) and keep each figure's median.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from records import write_record  # noqa: E402

from kvops.worker.rag.chunking import Chunk, chunk_text  # noqa: E402
from kvops.worker.rag.embedding import MiniLMEmbedder  # noqa: E402
from kvops.worker.rag.index import VectorIndex, default_nlist  # noqa: E402

CORPUS_MODULES = ("json", "textwrap", "shutil", "pathlib", "os", "collections", "itertools")


def corpus_texts() -> list[tuple[str, str]]:
    texts = []
    for module_name in CORPUS_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc:
                texts.append((f"{module_name}.{name}", doc))
    return texts


def build_throughput() -> dict:
    embedder = MiniLMEmbedder()
    started = time.perf_counter()
    chunks = [
        chunk
        for source, text in corpus_texts()
        for chunk in chunk_text(source, text, embedder.tokenizer, size=256, overlap=32)
    ]
    vectors = embedder.embed([chunk.text for chunk in chunks])
    index = VectorIndex.build(vectors, chunks, embedder="builtin://minilm")
    with tempfile.TemporaryDirectory() as folder:
        index.save(Path(folder) / "index")
    seconds = time.perf_counter() - started
    print(f"build pipeline: {len(chunks)} chunks in {seconds:.1f} s", flush=True)
    return {
        "row": "build pipeline (MiniLM, CPU)",
        "chunks": len(chunks),
        "seconds": round(seconds, 2),
        "chunks_per_s": round(len(chunks) / seconds, 1),
    }


def clustered(count: int, centres: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    picked = torch.randint(len(centres), (count,), generator=generator)
    points = centres[picked] + 2.0 * torch.randn(count, centres.shape[1], generator=generator)
    return F.normalize(points, dim=1)


def recall(truth: torch.Tensor, found: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(truth.tolist(), found.tolist(), strict=True))
    return hits / truth.numel()


def timed(search, queries: torch.Tensor, single: int) -> dict:
    """p50/p99 of one-query searches, and queries/s of one batched call over all queries."""
    search(queries[:1])  # warm-up
    latencies = []
    for row in range(single):
        started = time.perf_counter()
        search(queries[row : row + 1])
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    started = time.perf_counter()
    search(queries)
    batched = time.perf_counter() - started
    return {
        "p50_ms": round(1000 * statistics.median(latencies), 3),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, math.ceil(0.99 * single) - 1)], 3),
        "batch_qps": round(len(queries) / batched, 1),
    }


def paired(kvops_search, faiss_search, queries: torch.Tensor, args) -> tuple[dict, dict]:
    """`timed` for kvops then FAISS, back to back, --repeats times; each figure the median of
    its repeats (the machine is shared: alternating spreads its load over both systems)."""
    kvops_runs, faiss_runs = [], []
    for _ in range(args.repeats):
        kvops_runs.append(timed(kvops_search, queries, args.single))
        faiss_runs.append(timed(faiss_search, queries, args.single))

    def medians(runs: list[dict]) -> dict:
        keys = ("p50_ms", "p99_ms", "batch_qps")
        return {key: round(statistics.median(run[key] for run in runs), 3) for key in keys} | {
            "repeats": len(runs)
        }

    return medians(kvops_runs), medians(faiss_runs)


def smallest_nprobe(search, truth: torch.Tensor, queries: torch.Tensor, nlist: int, target: float):
    nprobe = 1
    while True:
        found = search(queries, nprobe)
        achieved = recall(truth, found)
        if achieved >= target or nprobe >= nlist:
            return nprobe, achieved
        nprobe = min(nlist, nprobe * 2)


def exact_rows(count: int, vectors, chunks, queries, args, rows: list[dict]) -> torch.Tensor:
    """Exact search, kvops flat and IndexFlatIP: appends their rows, returns the true top 10."""
    import faiss

    k = 10
    started = time.perf_counter()
    flat = VectorIndex.build(vectors, chunks)
    kvops_flat_build = time.perf_counter() - started
    started = time.perf_counter()
    faiss_flat = faiss.IndexFlatIP(vectors.shape[1])
    faiss_flat.add(vectors.numpy())
    faiss_flat_build = time.perf_counter() - started
    _, truth = flat.search_ids(queries, k)
    _, faiss_truth = faiss_flat.search(queries.numpy(), k)
    agreement = recall(truth, torch.from_numpy(faiss_truth))
    kvops_exact, faiss_exact = paired(
        lambda q: flat.search_ids(q, k), lambda q: faiss_flat.search(q.numpy(), k), queries, args
    )
    for system, build, figures in (
        ("kvops flat", kvops_flat_build, kvops_exact),
        ("faiss IndexFlatIP", faiss_flat_build, faiss_exact),
    ):
        rows.append(
            {
                "vectors": count,
                "system": system,
                "build_s": round(build, 2),
                "recall_at_10": 1.0,
                **figures,
            }
        )
    rows[-1]["agreement_with_kvops"] = agreement
    print(rows[-2], rows[-1], sep="\n", flush=True)
    return truth


def run_size(count: int, args, generator: torch.Generator) -> list[dict]:
    import faiss
    import numpy as np

    dimension = args.dim
    centres = torch.randn(max(10, count // 100), dimension, generator=generator)
    vectors = clustered(count, centres, generator)
    queries = clustered(args.queries, centres, generator)
    vectors_np = vectors.numpy()
    chunks = [Chunk(f"v#{i}", "v", "", 0, 0) for i in range(count)]
    rows = []
    k = 10

    truth = exact_rows(count, vectors, chunks, queries, args, rows)
    if args.ivf_max is not None and count > args.ivf_max:
        return rows

    # IVF, the same number of lists for both; each at its own smallest nprobe for the target.
    nlist = default_nlist(count)
    started = time.perf_counter()
    ivf = VectorIndex.build(vectors, chunks, index_type="ivf", nlist=nlist, nprobe=1)
    kvops_ivf_build = time.perf_counter() - started
    started = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dimension)
    faiss_ivf = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    # The same training sample size as kvops' k-means (64 vectors per list).
    sample = np.random.default_rng(0).permutation(count)[: min(count, 64 * nlist)]
    faiss_ivf.train(vectors_np[np.sort(sample)])
    faiss_ivf.add(vectors_np)
    faiss_ivf_build = time.perf_counter() - started

    def faiss_ivf_search(q, nprobe):
        faiss_ivf.nprobe = nprobe
        return torch.from_numpy(faiss_ivf.search(q.numpy(), k)[1])

    kvops_nprobe, kvops_recall = smallest_nprobe(
        lambda q, p: ivf.search_ids(q, k, nprobe=p)[1], truth, queries, nlist, args.target_recall
    )
    faiss_nprobe, faiss_recall = smallest_nprobe(
        faiss_ivf_search, truth, queries, nlist, args.target_recall
    )
    faiss_ivf.nprobe = faiss_nprobe
    kvops_ivf, faiss_ivf_figures = paired(
        lambda q: ivf.search_ids(q, k, nprobe=kvops_nprobe),
        lambda q: faiss_ivf.search(q.numpy(), k),
        queries,
        args,
    )
    for system, build, nprobe, achieved, figures in (
        ("kvops ivf", kvops_ivf_build, kvops_nprobe, kvops_recall, kvops_ivf),
        ("faiss IndexIVFFlat", faiss_ivf_build, faiss_nprobe, faiss_recall, faiss_ivf_figures),
    ):
        rows.append(
            {
                "vectors": count,
                "system": system,
                "build_s": round(build, 2),
                "nlist": nlist,
                "nprobe": nprobe,
                "recall_at_10": round(achieved, 4),
                **figures,
            }
        )
    print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000, help="queries of the batched run")
    parser.add_argument("--single", type=int, default=100, help="one-query searches timed")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating kvops/FAISS timings, medians kept"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch's and FAISS's threads (default torch's)"
    )
    parser.add_argument("--no-build-pipeline", action="store_true")
    parser.add_argument(
        "--ivf-max",
        type=int,
        default=None,
        help="exact search only above this many vectors (IVF training at 1M takes ~15 min on "
        "2 busy cores, for each system)",
    )
    args = parser.parse_args()
    import faiss

    # The same thread count for both: torch's (kvops' exact search) and FAISS's OpenMP. kvops'
    # IVF search runs on the calling thread whatever this is (worker/rag/ivf_scan.py); run with
    # --threads 1 for FAISS on one thread too.
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    rows = [] if args.no_build_pipeline else [build_throughput()]
    generator = torch.Generator().manual_seed(0)
    for count in args.sizes:
        rows += run_size(count, args, generator)
    write_record(
        "vector_search",
        rows,
        threads=str(threads),
        faiss=faiss.__version__,
        torch=torch.__version__,
    )


if __name__ == "__main__":
    main()
