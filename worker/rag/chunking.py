"""Documents into chunks: windows of `size` tokens that overlap by `overlap` tokens, cut on
token boundaries of the embedder's tokenizer (MiniLM's word pieces), each keeping its source,
its character span in the source and the document's metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer


@dataclass
class Chunk:
    id: str  # "<source>#<n>"
    source: str
    text: str
    start: int  # character offsets of text in the source
    end: int
    metadata: dict[str, str] = field(default_factory=dict)


def chunk_text(
    source: str,
    text: str,
    tokenizer: Tokenizer,
    size: int = 512,
    overlap: int = 64,
    metadata: dict[str, str] | None = None,
) -> list[Chunk]:
    if size < 1:
        raise ValueError(f"chunk size must be at least 1 token, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap must be in [0, size={size}), got {overlap}")
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    chunks: list[Chunk] = []
    step = size - overlap
    for first in range(0, len(offsets), step):
        window = offsets[first : first + size]
        start, end = window[0][0], window[-1][1]
        chunks.append(
            Chunk(
                id=f"{source}#{len(chunks)}",
                source=source,
                text=text[start:end],
                start=start,
                end=end,
                metadata=dict(metadata or {}),
            )
        )
        if first + size >= len(offsets):
            break
    return chunks


def read_documents(path: str | Path) -> list[tuple[str, str, dict[str, str]]]:
    """(source, text, metadata) of each document: a `documents.json` file (a list of {id, text},
    optionally {metadata}) or a folder of text files read recursively, skipping hidden entries
    (a ConfigMap mount's `..data` and its timestamped folders); every other file must be UTF-8
    text. Sources of files are their paths
    relative to the folder; metadata records the file name's suffix as `type`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return _read_documents_json(path)
    documents = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{file}: not UTF-8 text ({error.reason})") from error
        suffix = file.suffix.lower().lstrip(".")
        documents.append((relative.as_posix(), text, {"type": suffix} if suffix else {}))
    return documents


def _read_documents_json(path: Path) -> list[tuple[str, str, dict[str, str]]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of {{id, text}} documents")
    documents = []
    for number, item in enumerate(items):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and isinstance(item.get("text"), str)
        ):
            raise ValueError(f"{path}: document {number} needs a string id and text")
        metadata = item.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: document {item['id']!r}: metadata must be an object")
        documents.append((item["id"], item["text"], {str(k): str(v) for k, v in metadata.items()}))
    return documents
