"""Token-aware chunking with overlap, and reading a folder or documents.json."""

from __future__ import annotations

import json

import pytest

from kvops.worker.rag.chunking import chunk_text, read_documents
from kvops.worker.rag.embedding import minilm_tokenizer

TEXT = (
    "Kubernetes groups containers into pods. A Deployment keeps a number of identical pods "
    "running and replaces the ones that fail. Services give a set of pods one stable address, "
    "and Ingress routes outside traffic to Services. Nodes run the kubelet, which starts the "
    "containers of the pods scheduled onto them. Ünïcödé and emoji 🎉 keep their offsets."
)


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def test_chunks_are_token_windows_that_overlap_and_point_back_into_the_source(tokenizer):
    chunks = chunk_text("k8s.md", TEXT, tokenizer, size=16, overlap=4, metadata={"team": "a"})
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(chunks) == -(-(len(tokens.ids) - 4) // 12)
    for number, chunk in enumerate(chunks):
        assert chunk.id == f"k8s.md#{number}" and chunk.source == "k8s.md"
        assert chunk.text == TEXT[chunk.start : chunk.end]
        assert chunk.metadata == {"team": "a"}
        assert len(tokenizer.encode(chunk.text, add_special_tokens=False).ids) <= 16
    # Consecutive chunks share exactly `overlap` tokens: the next starts at token 12 of this one.
    offsets = tokens.offsets
    for number in range(len(chunks) - 1):
        assert chunks[number + 1].start == offsets[(number + 1) * 12][0]
        assert chunks[number].end == offsets[min(number * 12 + 15, len(offsets) - 1)][1]
    assert chunks[0].start == 0 and chunks[-1].end == len(TEXT)
    assert chunks[0].metadata is not chunks[1].metadata


def test_short_and_empty_texts(tokenizer):
    [only] = chunk_text("a", "  one short line ", tokenizer, size=512, overlap=64)
    assert (only.text, only.start, only.end) == ("one short line", 2, 16)
    assert chunk_text("empty", " \n ", tokenizer, size=8, overlap=0) == []


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (8, 8), (8, -1)])
def test_bad_sizes_are_refused(tokenizer, size, overlap):
    with pytest.raises(ValueError, match="chunk"):
        chunk_text("a", TEXT, tokenizer, size=size, overlap=overlap)


def test_a_folder_is_read_recursively_without_hidden_entries(tmp_path):
    (tmp_path / "guide.md").write_text("# Guide\nhello")
    (tmp_path / "faq").mkdir()
    (tmp_path / "faq" / "billing.txt").write_text("Invoices are monthly.")
    # A ConfigMap mount: the keys are links into a hidden, timestamped folder.
    (tmp_path / "..2026_11_30").mkdir()
    (tmp_path / "..2026_11_30" / "guide.md").write_text("# Guide\nhello")
    (tmp_path / ".hidden.txt").write_text("no")
    assert read_documents(tmp_path) == [
        ("faq/billing.txt", "Invoices are monthly.", {"type": "txt"}),
        ("guide.md", "# Guide\nhello", {"type": "md"}),
    ]


def test_documents_json(tmp_path):
    path = tmp_path / "documents.json"
    path.write_text(
        json.dumps(
            [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta", "metadata": {"lang": "en"}}]
        )
    )
    assert read_documents(path) == [("a", "alpha", {}), ("b", "beta", {"lang": "en"})]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not JSON"),
        ('{"id": "a"}', "expected a list"),
        ('[{"id": "a"}]', "document 0 needs a string id and text"),
    ],
)
def test_bad_documents_json_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "documents.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_documents(path)


def test_unreadable_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_documents(tmp_path / "missing")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="image.png: not UTF-8"):
        read_documents(tmp_path)
