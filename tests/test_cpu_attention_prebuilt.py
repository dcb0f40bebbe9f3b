"""The C++ CPU attention kernel built ahead of time for a CPU family (as the worker image does)
and loaded from a read-only folder without writing anything."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from kvops.worker.ops import cpu_attention

# Runs in a fresh process: a process can register the kvops operators once, and the rest of the
# tests load the first-use build.
CHECK = """
import logging, torch
from kvops.worker.ops import attention, cpu_attention
logging.basicConfig(level=logging.INFO)
assert cpu_attention.extension_available()
torch.manual_seed(0)
q = torch.randn(2, 4, 64)
k, v = torch.randn(2, 8, 16, 64), torch.randn(2, 8, 16, 64)
tables, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([20, 9])
args = (k, v, tables, lens, 0.125)
torch.testing.assert_close(
    cpu_attention.paged_decode_attention(q, *args), attention.paged_decode_attention(q, *args)
)
"""


def snapshot(folder) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_prebuilt_kernel_loads_from_a_read_only_folder(tmp_path):
    march = "x86-64-v2" if platform.machine() == "x86_64" else "native"
    kernels = tmp_path / "kernels"
    command = [sys.executable, "-m", "kvops.worker.ops.cpu_attention", "--build", str(kernels)]
    subprocess.run([*command, "--march", march], check=True, capture_output=True)
    name = cpu_attention._prebuilt_name(march)
    assert sorted(p.name for p in kernels.iterdir()) == [f"{name}.json", f"{name}.so"]
    kernels.chmod(0o555)
    before = snapshot(tmp_path)
    env = {
        **os.environ,
        cpu_attention.PREBUILT_ENV: str(kernels),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),  # a first-use build would be here
    }
    result = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert f"prebuilt for {march} loaded from {kernels / name}.so" in result.stderr
    assert snapshot(tmp_path) == before  # root ignores the mode: compare, do not rely on it


def write_stamp(folder, march, **changes) -> None:
    stamp = {**cpu_attention._stamp(march), **changes}
    name = cpu_attention._prebuilt_name(march)
    (folder / f"{name}.json").write_text(json.dumps(stamp))
    (folder / f"{name}.so").write_bytes(b"not a library: it must not be loaded")


def test_a_kernel_for_another_torch_or_cpu_is_passed_over(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_attention.PREBUILT_ENV, str(tmp_path))
    write_stamp(tmp_path, "x86-64-v3", torch="0.0.1")
    assert not cpu_attention._load_prebuilt()
    write_stamp(tmp_path, "x86-64-v4")
    monkeypatch.setattr(cpu_attention, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not cpu_attention._load_prebuilt()


def test_no_prebuilt_folder_means_the_first_use_build(monkeypatch):
    monkeypatch.delenv(cpu_attention.PREBUILT_ENV, raising=False)
    assert not cpu_attention._load_prebuilt()
