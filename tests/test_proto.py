"""The generated gRPC stubs committed beside engine.proto are what `make proto` makes now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("engine_pb2.py", "engine_pb2.pyi", "engine_pb2_grpc.py")


def test_generated_stubs_are_up_to_date(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "proto"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/kvops/v1/engine.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "kvops/v1" / name).read_text()
        committed = (ROOT / "proto/kvops/v1" / name).read_text()
        assert fresh == committed, f"proto/kvops/v1/{name} is stale: run `make proto`"


def test_stubs_import_as_kvops_v1():
    from kvops.v1 import engine_pb2, engine_pb2_grpc

    assert engine_pb2.DESCRIPTOR.package == "kvops.v1"
    assert hasattr(engine_pb2_grpc, "EngineServicer")
