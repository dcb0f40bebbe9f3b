"""The `kvops` command line."""

from __future__ import annotations

import argparse
import sys


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default", help="default, a HF folder, a .gguf file, or dummy:<preset>"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-chunked-prefill", action="store_true")


def engine_config_from_args(args: argparse.Namespace):
    from kvops.worker.config import EngineConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill,
    )


def generate_command(args: argparse.Namespace) -> int:
    from kvops.worker.engine import LLMEngine
    from kvops.worker.request import SamplingParams

    engine = LLMEngine(engine_config_from_args(args))
    prompt = args.prompt
    if not args.raw and engine.tokenizer.has_chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt_token_ids = engine.tokenizer.encode(
            engine.tokenizer.apply_chat_template(messages), add_special_tokens=False
        )
    else:
        prompt_token_ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    engine.add_request(sampling_params=params, prompt_token_ids=prompt_token_ids)
    while engine.has_unfinished_requests():
        for output in engine.step():
            sys.stdout.write(output.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvops", description="kvops: LLMOps on Kubernetes")
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
    from kvops.operator.cli import add_operator_commands  # kopf itself is imported lazily

    add_operator_commands(commands)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvops: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
