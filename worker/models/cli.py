"""`kvops model pull`: registered on the `kvops` parser by add_model_commands."""

from __future__ import annotations

import argparse
import sys


def add_model_cache_argument(parser: argparse.ArgumentParser, flag: str) -> None:
    parser.add_argument(
        flag,
        default=None,
        metavar="DIR",
        help="the model cache (default $KVOPS_MODEL_CACHE or ~/.cache/kvops/models)",
    )


def add_model_commands(commands) -> None:
    model = commands.add_parser("model", help="model sources and the model cache")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    pull = model_commands.add_parser(
        "pull",
        help="fetch a model source into the cache; prints one JSON line: source, revision, "
        "path, bytes, files, seconds",
    )
    pull.add_argument(
        "source",
        help="hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path, builtin://smollm2",
    )
    add_model_cache_argument(pull, "--cache")
    pull.add_argument(
        "--progress-interval", type=float, default=5.0, help="seconds between progress lines"
    )
    pull.add_argument(
        "--verify",
        action="store_true",
        help="re-check every cached file's checksum and fetch again those that differ",
    )
    pull.add_argument(
        "--termination-log",
        default=None,
        metavar="PATH",
        help="also write the JSON line (or the error) here (e.g. /dev/termination-log)",
    )
    pull.set_defaults(handler=pull_command)


def pull_command(args: argparse.Namespace) -> int:
    import logging

    from kvops.worker.models.pull import pull
    from kvops.worker.models.sources import ModelSourceError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result = pull(
            args.source, args.cache, progress_interval=args.progress_interval, verify=args.verify
        )
    except ModelSourceError as error:
        _write_termination_log(args.termination_log, f"kvops: error: {error}")
        raise
    print(result.json_line(), flush=True)
    _write_termination_log(args.termination_log, result.json_line())
    return 0


def _write_termination_log(path: str | None, line: str) -> None:
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as error:
            print(f"kvops: cannot write {path}: {error}", file=sys.stderr)
