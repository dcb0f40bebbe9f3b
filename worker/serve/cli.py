"""The `kvops` command line."""

from __future__ import annotations

import argparse
import os
import sys


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from kvops.worker.config import DTYPES, QUANTIZATIONS, EngineConfig  # no torch: cheap

    defaults = EngineConfig()
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="default, a HF folder, a .gguf file, dummy:<preset>, or a source pulled into "
        "--model-cache: hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path, "
        "builtin://smollm2",
    )
    from kvops.worker.models.cli import add_model_cache_argument  # argparse only

    add_model_cache_argument(parser, "--model-cache")
    parser.add_argument("--dtype", default=defaults.dtype, choices=DTYPES)
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument(
        "--quantization",
        default=defaults.quantization,
        choices=QUANTIZATIONS,
        help="weight format: none (float) or kept quantized; default: the file's own (a GGUF "
        "file's blocks as stored, a float model unquantized); a float model is quantized at load",
    )
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens
    )
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--num-kv-blocks", type=int, default=defaults.num_kv_blocks)
    parser.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        default=defaults.kv_cache_memory_fraction,
        help="share of the GPU memory left after the weights that the KV cache takes (CUDA)",
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-chunked-prefill", action="store_true")


def engine_config_from_args(args: argparse.Namespace):
    from kvops.worker.config import EngineConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill,
    )


def generate_command(args: argparse.Namespace) -> int:
    import asyncio

    from kvops.worker.async_engine import AsyncLLMEngine
    from kvops.worker.request import SamplingParams

    pull_model_source(args)
    engine = AsyncLLMEngine.from_config(engine_config_from_args(args))
    tokenizer = engine.tokenizer
    if tokenizer is None:
        engine.shutdown()
        raise SystemExit(f"kvops generate: the model {engine.model_name!r} has no tokenizer")
    prompt = args.prompt
    if not args.raw and tokenizer.has_chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt_token_ids = tokenizer.encode(
            tokenizer.apply_chat_template(messages), add_special_tokens=False
        )
    else:
        prompt_token_ids = tokenizer.encode(prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )

    async def print_as_generated() -> None:
        async for output in engine.generate(
            sampling_params=params, prompt_token_ids=prompt_token_ids
        ):
            sys.stdout.write(output.new_text)
            sys.stdout.flush()

    try:
        asyncio.run(print_as_generated())
    finally:
        engine.shutdown()
    sys.stdout.write("\n")
    return 0


def pull_model_source(args: argparse.Namespace, inspect_only: bool = False) -> str | None:
    """A `--model` source (hf://, s3://, pvc://, builtin://) is pulled into --model-cache, and
    args.model becomes the local folder or file; with `inspect_only` (`serve --check`) it is only
    resolved and listed. Returns a description of the source, None for a local --model."""
    from kvops.worker.models.sources import is_model_source

    if not is_model_source(args.model):
        return None
    from kvops.worker.models.pull import inspect, pull

    if inspect_only:
        found = inspect(args.model, args.model_cache)
    else:
        found = pull(args.model, args.model_cache)
        args.model = found.path
    return f"{found.source} at {found.revision}: {found.files} files, {found.bytes} bytes"


def check_serve_configuration(args: argparse.Namespace, server):
    """Everything `kvops serve` would refuse, short of loading the weights (`--check`): the
    options, the model source, the files it reads. Returns the engine configuration and the
    resolved model path."""
    from pathlib import Path

    from kvops.worker.weights import check_quantization, resolve_model

    server.validate()
    source = pull_model_source(args, inspect_only=args.check)
    config = engine_config_from_args(args)
    config.validate()
    from kvops.worker.serve.openai_protocol import MAX_RETRIEVAL_TOP_K

    if args.vector_index is not None:
        host, _, port = args.vector_index.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--vector-index {args.vector_index!r}: expected HOST:PORT")
    if not 1 <= args.retrieval_top_k <= MAX_RETRIEVAL_TOP_K:
        raise ValueError(
            f"--retrieval-top-k must be from 1 to {MAX_RETRIEVAL_TOP_K}, got {args.retrieval_top_k}"
        )
    for flag, path in [
        ("--grpc-tls-cert", args.grpc_tls_cert),
        ("--grpc-tls-key", args.grpc_tls_key),
        ("--api-key-file", args.api_key_file),
    ]:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if source is not None and args.check:
        return config, source  # not pulled: no header to read yet
    check_quantization(config.model, config.quantization or "auto", config.device)
    return config, resolve_model(config.model)


def _exit_on_sigterm(signum: int, _frame) -> None:
    os._exit(128 + signum)


def serve_command(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    # In a container the worker is PID 1, and the kernel spares PID 1 every signal it has no
    # handler for: without this, a pod deleted while the model loads waits out its whole grace
    # period for SIGKILL. serve() replaces it with the draining handler once it listens.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from kvops.worker.serve.server import ServerOptions, serve
    from kvops.worker.serve.service import ServingOptions

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = ServerOptions(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        shutdown_grace=args.shutdown_grace,
        grpc_tls_cert=args.grpc_tls_cert,
        grpc_tls_key=args.grpc_tls_key,
    )
    config, model_path = check_serve_configuration(args, server)
    if args.check:
        print(f"kvops serve: configuration OK (model {model_path})")
        return 0
    # The key comes from a file or the environment, never the command line (process listings).
    api_key = os.environ.get("KVOPS_API_KEY") or None
    if args.api_key_file:
        with open(args.api_key_file) as file:
            api_key = file.read().strip() or None
    from kvops.worker.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_config(config)
    options = ServingOptions(
        served_model_name=args.served_model_name or engine.model_name,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        api_key=api_key,
        prompts_dir=args.prompts_dir,
        feedback_log=args.feedback_log,
        vector_index=args.vector_index,
        retrieval_top_k=args.retrieval_top_k,
    )
    return asyncio.run(serve(engine, options, server))


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser):
    """The whole `kvops` command line. The operator parses the containers it renders with it
    (kvops.operator.contract), so a flag the CLI lacks is refused before any pod runs it."""
    parser = parser_class(prog="kvops", description="kvops: LLMOps on Kubernetes")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="answer one prompt with the engine on this machine"
    )
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--raw", action="store_true", help="no chat template: complete the text")
    add_engine_arguments(generate)
    generate.set_defaults(handler=generate_command)

    serve = commands.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API and the gRPC API on this machine"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=50051)
    serve.add_argument("--served-model-name", default=None, help="the model id clients use")
    serve.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait beyond the running batch; more get HTTP 429",
    )
    serve.add_argument(
        "--request-timeout", type=float, default=None, help="seconds a request may take"
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    serve.add_argument(
        "--api-key-file", default=None, help="require this key (else $KVOPS_API_KEY, if set)"
    )
    serve.add_argument("--grpc-tls-cert", default=None, help="PEM certificate: serve gRPC over TLS")
    serve.add_argument("--grpc-tls-key", default=None, help="PEM private key for --grpc-tls-cert")
    serve.add_argument(
        "--prompts-dir",
        default=os.environ.get("KVOPS_PROMPTS_DIR") or None,
        help="folder of the operator's prompts.json: managed prompts, reloaded when it changes "
        "(default $KVOPS_PROMPTS_DIR)",
    )
    serve.add_argument(
        "--feedback-log",
        default=os.environ.get("KVOPS_FEEDBACK_LOG") or None,
        help="JSON-lines file that POST /v1/feedback and the Feedback RPC append to "
        "(default $KVOPS_FEEDBACK_LOG; unset: feedback is counted and traced only)",
    )
    serve.add_argument(
        "--vector-index",
        default=os.environ.get("KVOPS_VECTOR_INDEX_ADDRESS") or None,
        metavar="HOST:PORT",
        help="gRPC address of a VectorIndex's search server (`kvops index serve`): chat requests "
        "retrieve from it (RAG) and /v1/search proxies to it "
        "(default $KVOPS_VECTOR_INDEX_ADDRESS)",
    )
    serve.add_argument(
        "--retrieval-top-k",
        type=int,
        default=os.environ.get("KVOPS_RETRIEVAL_TOP_K") or "4",
        help="chunks a chat request retrieves unless it says otherwise "
        "(default $KVOPS_RETRIEVAL_TOP_K or 4)",
    )
    serve.add_argument(
        "--check",
        action="store_true",
        help="check the options, the model source and the files they name, then exit "
        "(loads no weights)",
    )
    add_engine_arguments(serve)
    serve.set_defaults(handler=serve_command)
    from kvops.operator.cli import add_operator_commands  # kopf itself is imported lazily
    from kvops.worker.models.cli import add_model_commands  # argparse only
    from kvops.worker.rag.cli import add_index_commands  # argparse only

    add_operator_commands(commands)
    add_model_commands(commands)
    add_index_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvops: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
