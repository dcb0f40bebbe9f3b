"""Paged decode attention and the KV-cache write in C++ for float32 on the CPU
(``csrc/paged_attention_cpu.cpp``).

Decode attention on a CPU is bound by memory traffic: every step reads every running sequence's
whole context from the KV cache. The torch reference gathers the blocks into a copy and runs SDPA
on it; the C++ kernel reads each block where it lies, once, and spreads the (sequence, kv head)
pairs over torch's own OpenMP threads. With SmolLM2 shapes (32 sequences of 32-800 tokens, 30
layers, 2 AVX2 cores) a step's decode attention took 44 ms against the reference's 75 ms.

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (about 10 s, then cached
under ``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, one build per CPU model,
rebuilt only when the source or flags change). Without a working C++ compiler, or for shapes and
dtypes it does not take, the torch reference runs instead.

Container images build the kernel once, at image build time, for a named CPU family instead
(``python -m kvops.worker.ops.cpu_attention --build DIR --march x86-64-v3``) and point
``$KVOPS_PREBUILT_KERNELS`` at DIR: the build machine is not the node (``-march=native`` would
be wrong) and a pod's root filesystem is read-only with no compiler. A prebuilt kernel is loaded
as a plain shared library, writing nothing; when the CPU lacks the family's instructions, or the
build is for another torch or source, the first-use build above runs instead.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kvops.worker.ops import attention

__all__ = ["extension_available", "paged_decode_attention", "write_kv_cache"]

log = logging.getLogger(__name__)

# One extension for all of the CPU kernels: the quantized linear layers
# (csrc/quant_linear_cpu.cpp, used by quant_linear.py) build, cache and ship with attention.
_SOURCES = tuple(
    Path(__file__).with_name("csrc") / name
    for name in ("paged_attention_cpu.cpp", "quant_linear_cpu.cpp", "decode_layer_cpu.cpp")
)
_HEADER = Path(__file__).with_name("csrc") / "kvops_cpu.h"  # the kernels the files share
HEAD_DIMS = (64, 80, 96, 128, 256)  # the head sizes the kernel is instantiated for (attend_for)
MAX_GROUP = 64  # query heads per kv head the kernel takes
PREBUILT_ENV = "KVOPS_PREBUILT_KERNELS"  # a folder of kernels built by `--build`

# The /proc/cpuinfo flags each x86-64 micro-architecture level (the psABI's, as GCC's -march
# names them) needs; another -march (aarch64's, say) is trusted for the machine it was built on.
_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_V3 = (*_V2, "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_MARCH_FLAGS = {
    "x86-64": (),
    "x86-64-v2": _V2,
    "x86-64-v3": _V3,
    "x86-64-v4": (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def _cflags(march: str) -> list[str]:
    # -fopenmp: at::parallel_for runs on torch's OpenMP threads; the extension links the
    # libgomp.so.1 torch has already loaded, so there is one thread pool.
    return ["-O3", f"-march={march}", "-fopenmp"]


@functools.cache
def extension_available() -> bool:
    """Load the prebuilt kernel, or build (or load the cached build of) it, once per process;
    False if that fails."""
    if _load_prebuilt():
        return True
    from torch.utils import cpp_extension  # imports setuptools: only when needed

    _put_ninja_on_path()
    name = _build_name()
    started = time.monotonic()
    try:
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            # -march=native: the build is local to the machine (and cache) that runs it.
            extra_cflags=_cflags("native"),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # a missing compiler or ninja shows up as many exception types
        log.warning(
            "kvops: the C++ CPU attention kernel did not build (%s); using the slower torch "
            "reference",
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
        return False
    # A first start compiles (about 10 s); later ones load the cached build.
    log.info("C++ CPU attention kernel %s ready in %.1f s", name, time.monotonic() - started)
    return True


def _build_name() -> str:
    """The extension's name, one per CPU model. The build uses -march=native, and torch's cache
    is keyed by name and source only: a cache folder shared by different CPUs (a home directory
    on NFS, a volume reused across node types) would otherwise hand one CPU another's
    instructions, and the process would die of an illegal instruction."""
    features = {platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            features.update(
                line.strip()
                for line in cpuinfo
                if line.startswith(("model name", "flags", "Features", "CPU part"))
            )
    except OSError:
        pass  # not Linux: the machine name alone
    digest = hashlib.sha256("\n".join(sorted(features)).encode()).hexdigest()[:12]
    return f"kvops_cpu_attention_{digest}"


def _stamp(march: str) -> dict[str, str]:
    """What a prebuilt kernel must match to be loaded: the C++ ABI is torch's own, so one build
    serves one torch version, one source and one set of flags."""
    return {
        "march": march,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "source_sha256": hashlib.sha256(
            b"".join(s.read_bytes() for s in (*_SOURCES, _HEADER))
        ).hexdigest(),
        "cflags": " ".join(_cflags(march)),
    }


def _prebuilt_name(march: str) -> str:
    """Named after the CPU family it was built for, not the CPU it was built on."""
    return "kvops_cpu_attention_" + "".join(c if c.isalnum() else "_" for c in march)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _load_prebuilt() -> bool:
    """Load a kernel from $KVOPS_PREBUILT_KERNELS that this CPU, torch and source can use.

    ``torch.ops.load_library`` only dlopens the file (``cpp_extension.load`` would take a lock
    file in the build folder, which is read-only in a pod). Several families may sit side by
    side; the highest x86-64 level sorts last and is tried first."""
    directory = os.environ.get(PREBUILT_ENV)
    if not directory:
        return False
    cpu_flags = None
    for stamp_file in sorted(Path(directory).glob("kvops_cpu_attention_*.json"), reverse=True):
        try:
            stamp = json.loads(stamp_file.read_text())
            march = stamp["march"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if stamp != _stamp(march):
            log.info("kvops: prebuilt kernel %s is for another torch or source", stamp_file)
            continue
        if cpu_flags is None:
            cpu_flags = _cpu_flags()
        missing = set(_MARCH_FLAGS.get(march, ())) - cpu_flags
        if missing:
            log.info("kvops: this CPU lacks %s for the %s kernel", " ".join(sorted(missing)), march)
            continue
        library = stamp_file.with_suffix(".so")
        try:
            torch.ops.load_library(str(library))
        except OSError as error:
            log.warning("kvops: prebuilt kernel %s did not load (%s)", library, error)
            continue
        log.info("C++ CPU attention kernel prebuilt for %s loaded from %s", march, library)
        return True
    log.info("kvops: no usable prebuilt kernel in %s; building for this CPU", directory)
    return False


def build_prebuilt(directory: Path, march: str) -> Path:
    """Build the kernel for the CPU family `march` (a GCC -march) into `directory`: the shared
    library and the stamp `_load_prebuilt` checks, nothing else (the objects and ninja files
    stay in a temporary folder). Loads it once, so the build machine must run `march` code."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = _prebuilt_name(march)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as build_dir:
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            extra_cflags=_cflags(march),
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            is_python_module=False,
        )
        library = directory / f"{name}.so"
        shutil.copyfile(Path(build_dir) / f"{name}.so", library)
    (directory / f"{name}.json").write_text(json.dumps(_stamp(march), indent=1) + "\n")
    return library


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a venv that was not activated has the pip-installed one
    (a kvops dependency) only in its own bin folder."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # the build then fails with torch's own message about ninja
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _kernel_takes(k_cache: torch.Tensor, v_cache: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """Whether the C++ kernels apply: float32 CPU caches laid out contiguously, float32 inputs,
    and a kernel that built."""
    return (
        k_cache.device.type == "cpu"
        and all(t.dtype == torch.float32 for t in (k_cache, v_cache, *inputs))
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and extension_available()
    )


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Same contract as :func:`attention.paged_decode_attention`; the C++ kernel when it takes
    the shapes, the torch reference otherwise."""
    num_heads, head_dim = query.shape[1:]
    if not (
        head_dim in HEAD_DIMS
        and num_heads // k_cache.shape[0] <= MAX_GROUP
        and _kernel_takes(k_cache, v_cache, query)
    ):
        return attention.paged_decode_attention(
            query, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len
        )
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    torch.ops.kvops.paged_decode_attention_cpu(
        query.contiguous(),
        k_cache,
        v_cache,
        block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(),
        scale,
        out,
    )
    return out


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as :func:`attention.write_kv_cache`: one row copy per token and kv head
    in C++ when the dtypes and layouts allow, the torch reference otherwise."""
    if not (
        key.stride(-1) == value.stride(-1) == 1 and _kernel_takes(k_cache, v_cache, key, value)
    ):
        attention.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    torch.ops.kvops.write_kv_cache_cpu(
        key, value, k_cache, v_cache, slot_mapping.to(torch.int64).contiguous()
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvops.worker.ops.cpu_attention",
        description="Build the C++ CPU attention kernel ahead of time (container images).",
    )
    parser.add_argument("--build", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--march",
        default=os.environ.get("KVOPS_KERNEL_MARCH", "x86-64-v3"),
        help="GCC -march of the CPUs that will run it (x86-64-v3: AVX2, FMA; %(default)s)",
    )
    args = parser.parse_args(argv)
    print(build_prebuilt(args.build, args.march))


if __name__ == "__main__":
    main()
