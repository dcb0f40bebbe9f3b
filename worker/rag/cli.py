"""`kvops index build|search|serve`. The parser is built without torch (the operator parses the
commands it renders with it, and its image has no torch); each handler imports what it runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_TOP_K = 3


def add_index_commands(commands) -> None:
    index = commands.add_parser("index", help="build, search and serve vector indexes")
    actions = index.add_subparsers(dest="index_command", required=True)

    build = actions.add_parser(
        "build", help="chunk and embed documents into an index folder (written atomically)"
    )
    build.add_argument(
        "--source",
        required=True,
        help="a folder of UTF-8 text files (read recursively) or a documents.json file",
    )
    build.add_argument("--output", required=True, help="the index folder to write")
    build.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk")
    build.add_argument("--chunk-overlap", type=int, default=64, help="tokens shared by neighbours")
    build.add_argument(
        "--embedding",
        default="builtin://minilm",
        help="builtin://minilm, llmd://<LLMDeployment> or an OpenAI-compatible http(s):// URL",
    )
    build.add_argument("--index-type", choices=("flat", "ivf"), default="flat")
    build.add_argument("--metric", choices=("cosine", "dot", "l2"), default="cosine")
    build.add_argument(
        "--termination-log",
        default="/dev/termination-log",
        help="also write the result here when the file exists (Kubernetes creates it)",
    )
    build.set_defaults(handler=build_command)

    search = actions.add_parser("search", help="print the chunks nearest to a query")
    search.add_argument("index", help="an index folder")
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    search.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only chunks whose metadata (or source) has this value; repeatable",
    )
    search.add_argument("--nprobe", type=int, default=None, help="IVF lists to search")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.set_defaults(handler=search_command)

    serve = actions.add_parser(
        "serve", help="serve Search and Embed (gRPC) and /v1/search, /v1/embeddings (HTTP)"
    )
    serve.add_argument("--index", required=True, help="the index folder")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=50051)
    serve.set_defaults(handler=serve_command)


def parse_filters(pairs: list[str]) -> dict[str, str]:
    filters = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"--filter {pair!r}: expected KEY=VALUE")
        filters[key] = value
    return filters


def build_command(args: argparse.Namespace) -> int:
    try:
        result = build_index(args)
    except (ValueError, FileNotFoundError) as error:
        write_termination_log(args.termination_log, {"error": str(error)})
        raise
    except ConnectionError as error:  # the embedding endpoint: worth a retry by the Job
        write_termination_log(args.termination_log, {"error": str(error)})
        print(f"kvops: error: {error}", file=sys.stderr)
        return 1
    line = json.dumps(result)
    print(line, flush=True)
    write_termination_log(args.termination_log, result)
    return 0


def build_index(args: argparse.Namespace) -> dict:
    from kvops.worker.rag.chunking import chunk_text, read_documents
    from kvops.worker.rag.embedding import embedder_for, minilm_tokenizer
    from kvops.worker.rag.index import VectorIndex

    started = time.monotonic()
    if args.chunk_size < 1 or not 0 <= args.chunk_overlap < args.chunk_size:
        raise ValueError(
            f"--chunk-overlap {args.chunk_overlap} must be at least 0 and smaller than "
            f"--chunk-size {args.chunk_size}"
        )
    embedder = embedder_for(args.embedding)  # an unknown scheme fails before any reading
    documents = read_documents(args.source)
    # Sizes count MiniLM's word pieces whatever the embedder (an LLMDeployment's tokenizer
    # would count somewhat differently).
    tokenizer = minilm_tokenizer()
    chunks = [
        chunk
        for source, text, metadata in documents
        for chunk in chunk_text(
            source, text, tokenizer, args.chunk_size, args.chunk_overlap, metadata
        )
    ]
    if not chunks:
        raise ValueError(f"--source {args.source}: no text to index ({len(documents)} documents)")
    vectors = embed_with_progress(embedder, [chunk.text for chunk in chunks])
    index = VectorIndex.build(
        vectors, chunks, args.metric, args.index_type, embedder=args.embedding
    )
    index.save(args.output)
    return {
        "documents": len(documents),
        "chunks": len(chunks),
        "dimension": index.dimension,
        "seconds": round(time.monotonic() - started, 3),
    }


def embed_with_progress(embedder, texts: list[str], batch: int = 256):
    import torch

    parts = []
    for start in range(0, len(texts), batch):
        parts.append(embedder.embed(texts[start : start + batch]))
        if len(texts) > batch:
            done = min(start + batch, len(texts))
            print(f"kvops index build: embedded {done}/{len(texts)} chunks", file=sys.stderr)
    return torch.cat(parts)


def write_termination_log(path: str | None, result: dict) -> None:
    """Kubernetes creates the file in the container; elsewhere (a laptop, where /dev may be
    writable by root) nothing is created."""
    if path and os.path.isfile(path) and os.access(path, os.W_OK):
        with open(path, "w") as file:
            file.write(json.dumps(result) + "\n")


def search_command(args: argparse.Namespace) -> int:
    from kvops.worker.rag.embedding import embedder_for
    from kvops.worker.rag.index import VectorIndex

    filters = parse_filters(args.filter)
    index = VectorIndex.load(args.index)
    query = embedder_for(index.embedder).embed([args.query])
    [hits] = index.search(query, args.top_k, filters, args.nprobe)
    if args.json:
        print(json.dumps([hit.as_dict() for hit in hits], indent=1, ensure_ascii=False))
        return 0
    if not hits:
        print("no hits")
    for rank, hit in enumerate(hits, 1):
        text = " ".join(hit.chunk.text.split())
        print(f"{rank}. {hit.score:.4f}  {hit.chunk.id}")
        print(f"   {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from kvops.worker.rag.server import SearchServerOptions, serve_index

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    options = SearchServerOptions(
        index=args.index, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port
    )
    return asyncio.run(serve_index(options))
