"""all-MiniLM-L6-v2 as kvops runs it (worker/rag/embedding.py) against transformers' BertModel
from the same folder with sentence-transformers' pooling: the forward, not only the shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvops.worker.rag.embedding import MiniLMEmbedder, RemoteEmbedder, embedder_for, minilm_folder

TEXTS = [
    "Recursively copy a directory tree.",
    "a",
    "Zürich, naïve café; emoji 🎉 and CJK 日本語 survive the tokenizer.",
    "The quick brown fox jumps over the lazy dog. " * 20,  # ~200 tokens: one window
]


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder(batch_size=3)  # smaller than the inputs: several batches


def reference(texts: list[str], max_length: int = 256) -> torch.Tensor:
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(minilm_folder()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_minilm_matches_transformers_bert_with_mean_pooling(embedder):
    ours = embedder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (ours - reference(TEXTS)).abs().max() < 1e-5


def test_batching_does_not_change_an_embedding(embedder):
    alone = torch.cat([embedder.embed([text]) for text in TEXTS])
    assert (alone - embedder.embed(TEXTS)).abs().max() < 1e-5


@pytest.mark.slow
def test_a_text_longer_than_one_window_is_embedded_whole_not_truncated(embedder):
    first = "Kubernetes schedules pods onto nodes. " * 40  # ~280 tokens: past one window
    second = "Bread is baked from flour, water, salt and yeast. " * 30
    whole = embedder.embed([first + second])[0]
    truncated = reference([first + second])[0]  # sentence-transformers: the first 256 tokens
    about_bread = embedder.embed([second])[0]
    # The second half counts in the vector: closer to the bread text than the truncation is.
    assert whole @ about_bread > truncated @ about_bread + 0.1
    tokens = len(embedder.tokenizer.encode(first + second, add_special_tokens=False).ids)
    windows, owners = embedder.windows([first + second])
    assert len(windows) == -(-tokens // 254) and owners == [0] * len(windows)
    assert all(len(window) <= 256 for window in windows)


def test_empty_input_gives_an_empty_matrix(embedder):
    assert embedder.embed([]).shape == (0, 384)


def test_embedder_specs():
    assert isinstance(embedder_for("builtin://minilm"), MiniLMEmbedder)
    remote = embedder_for("llmd://chat")
    assert isinstance(remote, RemoteEmbedder) and remote.base_url == "http://chat:8000"
    assert embedder_for("https://example.invalid/").base_url == "https://example.invalid"
    for bad in ("hf://x", "llmd://", "minilm"):
        with pytest.raises(ValueError, match="embedding"):
            embedder_for(bad)


def test_an_unreachable_remote_embedder_is_a_clear_connection_error():
    from serve_process import free_port

    remote = RemoteEmbedder(f"http://127.0.0.1:{free_port()}", model="m", timeout=5)
    with pytest.raises(ConnectionError, match="/v1/embeddings"):
        remote.embed(["hello"])
