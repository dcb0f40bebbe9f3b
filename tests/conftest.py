"""Shared pytest setup."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter. The switch is read when a
# kernel is decorated, so it must be set before anything imports kvops.worker.ops.triton_attention.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Fixtures that load the real default model or start `kvops serve`: a test using one is slow,
# and `make test-fast` leaves it out.
REAL_MODEL_FIXTURES = {
    "smollm2_engine",
    "served_engine",
    "async_engine",
    "default_server",
    "small_server",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_engine():
    """The default model (SmolLM2-135M-Instruct GGUF, float32) in one engine for the session."""
    from kvops.worker.config import EngineConfig
    from kvops.worker.engine import LLMEngine

    return LLMEngine(EngineConfig(quantization="none"))


@pytest.fixture(scope="session")
def served_engine():
    """The default model as `kvops serve` runs it, in the file's own formats (Q4_1 layers, a
    Q8_0 embedding): the answers a server must give. Not the float32 engine: quantized weights
    answer differently where two tokens are near-tied (the prompt's rows of the 4-bit formats
    run in bfloat16 where the CPU has AVX512-BF16)."""
    from kvops.worker.config import EngineConfig
    from kvops.worker.engine import LLMEngine

    return LLMEngine(EngineConfig())


@pytest.fixture(scope="session")
def default_tokenizer_json() -> str:
    """The default model's tokenizer as tokenizer.json text, to put beside random-weight models."""
    from kvops.worker.tokenizer import Tokenizer
    from kvops.worker.weights import resolve_model

    return Tokenizer.from_gguf(resolve_model("default")).backend.to_str()


@pytest.fixture(scope="session")
def otlp_receiver():
    """An OTLP/gRPC trace receiver on loopback (tests/otlp_receiver.py)."""
    from otlp_receiver import OTLPReceiver

    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def default_server(otlp_receiver):
    """`kvops serve` on the default model, exporting its traces to `otlp_receiver`."""
    from serve_process import ServeProcess

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "kvops-test-worker",
    }
    with ServeProcess(env=env) as server:
        yield server
