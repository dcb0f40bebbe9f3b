"""The GGUF-converted tokenizer against transformers, chat templates, caching, streaming text."""

from __future__ import annotations

import json
import logging
import os
import random
import time

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvops.worker import tokenizer as tokenizer_module
from kvops.worker.tokenizer import IncrementalDetokenizer, Tokenizer

BYTE_CHARS = tokenizer_module._bytes_to_unicode()

TEXTS = [
    "Hello world",
    "Hello, World! How are you?",
    "  leading spaces",
    "trailing spaces   ",
    "a\n\nb\r\n c\t\td",
    "   \n   ",
    "",
    " ",
    "12345 3.14159 1,000,000 0x1F 2024-01-31",
    "  4 \n\n7 x9",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    'for (int i = 0; i < n; ++i) { a[i] = "x"; }',
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "I'm you're they'll it's WE'VE she'd",
    "naïve café résumé Ωμέγα Привет",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "almost special <|im_start and <|im_end|",
    "<repo_name>kvops<filename>main.py",
    "a" * 300,
    "nbsp\u00a0em\u2003space\u3000ideographic",
    "\x00\x01 control \x07\x1b[0m",
]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVOPS_CACHE_DIR", str(tmp_path_factory.mktemp("kvops-cache")))
        yield


@pytest.fixture(scope="module")
def gguf_path():
    from kvops.worker.weights import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="module")
def ours(cache_env, gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own tokenizer for the GGUF file."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(gguf_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def original(reference):
    """transformers' GGUF tokenizer with SmolLM2's original pre-tokenizer.

    transformers ignores tokenizer.ggml.pre == "smollm" and splits with GPT-2's regex only;
    SmolLM2's own tokenizer.json (and llama.cpp) split off every digit first. That changes
    whitespace before digits: "  4" is "ĠĠ" "4" in SmolLM2 but "Ġ" "Ġ" "4" in transformers' GGUF
    conversion. This fixture restores the original pipeline.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(reference.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


# ------------------------------------------------------------------------------ encoding


@pytest.mark.slow
def test_encode_equals_transformers_gguf_tokenizer(ours, reference):
    # Texts without digits: transformers' GGUF pre-tokenizer is right there (see `original`).
    compared = 0
    for text in TEXTS:
        if any(c.isdigit() for c in text):
            continue
        assert ours.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False
        ), text
        compared += 1
    assert compared > 15


@pytest.mark.slow
def test_encode_equals_smollm2_original_pipeline(ours, original):
    for text in TEXTS:
        expected = original.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == expected, text


def test_digits_are_split_as_in_smollm2(ours):
    ids = ours.encode("  4 12", add_special_tokens=False)
    tokens = [ours.id_to_token(i) for i in ids]
    assert tokens == ["ĠĠ", "4", "Ġ", "1", "2"]


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_random_text_encodes_like_the_original_and_round_trips(ours, original, text):
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == original.encode(text, add_special_tokens=False).ids
    # SmolLM2's vocabulary lacks a few bytes (0xF1, 0xF2 lead bytes, some C0 controls): text
    # using them loses those bytes, in the original tokenizer too
    if all(ours.token_to_id(BYTE_CHARS[b]) is not None for b in text.encode("utf-8")):
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_matched_whole(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == ours.token_to_id("<|im_start|>") == 1
    assert ids[-1] == ours.token_to_id("<|im_end|>") == 2
    assert ours.decode(ids) == "user\nhi"  # specials skipped by default
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_decode_round_trips(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_bos_and_eos(ours, reference):
    # The file says bos=<|im_start|> (1), eos=<|im_end|> (2) and add_bos_token=false.
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_id == reference.eos_token_id == 2
    assert not ours.add_bos_token
    assert ours.encode("Hello") == reference.encode("Hello") == [19556]
    # end of generation: <|im_end|> ends a chat turn; <|endoftext|> ends a document
    assert ours.eos_token_ids == frozenset({0, 2})
    assert ours.token_to_id("<|im_start|>") not in ours.eos_token_ids
    assert ours.vocab_size == 49152 and len(ours) == 49152


def test_bos_is_added_when_the_model_asks(ours):
    with_bos = Tokenizer(ours.backend, bos_token_id=1, eos_token_id=2, add_bos_token=True)
    plain = ours.encode("Hello there", add_special_tokens=False)
    assert with_bos.encode("Hello there") == [1, *plain]
    assert with_bos.encode("Hello there", add_special_tokens=False) == plain
    assert with_bos.encode("<|im_start|>x") == ours.encode("<|im_start|>x")  # no double BOS


def test_ids_outside_the_vocabulary_decode_to_nothing(ours):
    assert ours.decode([19556, 60000, -1, 905]) == ours.decode([19556, 905])
    with pytest.raises(ValueError, match="string"):
        ours.encode(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ chat templates

CONVERSATION = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2? Answer with 😀 and 中文."},
]


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(ours, reference, system, add_generation_prompt):
    messages = list(CONVERSATION)
    if system:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert ours.encode(rendered, add_special_tokens=False) == reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )


LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{ raise_exception('unknown role ' + message['role']) }}\n"
    "    {% endif %}\n"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_whitespace_control_and_bos_like_transformers(ours, reference):
    custom = Tokenizer(
        ours.backend, bos_token_id=1, eos_token_id=2, chat_template=LLAMA3_STYLE, source="custom"
    )
    expected = reference.apply_chat_template(
        CONVERSATION, chat_template=LLAMA3_STYLE, tokenize=False, add_generation_prompt=True
    )
    assert custom.apply_chat_template(CONVERSATION) == expected
    # trim_blocks and lstrip_blocks removed the indentation and the newlines after block tags
    assert expected.startswith("<|im_start|><|im_start|>user\nHi there!<|im_end|>\n<|im_start|>")
    with pytest.raises(ValueError, match="unknown role tool"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_errors(ours):
    no_template = Tokenizer(ours.backend, source="bare")
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template(CONVERSATION)
    bad = [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\]"),
        ([{"content": "x"}], "no 'role'"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "user", "content": None}], "null"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
    ]
    for messages, message in bad:
        with pytest.raises(ValueError, match=message):
            ours.apply_chat_template(messages)
    broken = Tokenizer(ours.backend, chat_template="{% for x in %}", source="broken")
    with pytest.raises(ValueError, match="does not compile"):
        broken.apply_chat_template(CONVERSATION)


def test_text_parts_are_joined(ours):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert "a\nb<|im_end|>" in ours.apply_chat_template(parts)


def test_template_is_sandboxed(ours):
    evil = Tokenizer(
        ours.backend,
        chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}",
        source="evil",
    )
    with pytest.raises(ValueError):
        evil.apply_chat_template(CONVERSATION)


# ------------------------------------------------------------------------------ other sources


@pytest.mark.slow
def test_hf_folder_tokenizer_equals_transformers(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    folder_tokenizer = Tokenizer.from_pretrained(str(tmp_path))
    assert folder_tokenizer.bos_token_id == 1 and folder_tokenizer.eos_token_id == 2
    assert folder_tokenizer.eos_token_ids == frozenset({0, 2})
    for text in TEXTS:
        assert folder_tokenizer.encode(text) == reference.encode(text), text
    assert folder_tokenizer.apply_chat_template(CONVERSATION) == reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


def _gguf_with_pre(path, source_metadata: dict, pre: str) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(source_metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(source_metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(source_metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_other_pre_tokenizers_equal_transformers(tmp_path, gguf_path, cache_env, pre):
    from transformers import AutoTokenizer

    from kvops.worker.gguf_file import read_gguf

    path = tmp_path / f"{pre}.gguf"
    _gguf_with_pre(path, read_gguf(gguf_path).metadata, pre)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tokenizer = Tokenizer.from_gguf(str(path))
    for text in [*TEXTS, "1234567 89", "x\n\n\n  y", "don'T STOP"]:
        expected = reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, add_special_tokens=False) == expected, text
    # llama3 keeps up to three digits together, qwen2 one
    pieces = [p for p, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == (["123", "45"] if pre == "llama-bpe" else list("12345"))


def test_unknown_pre_tokenizer_warns(tmp_path, gguf_path, cache_env, caplog):
    from kvops.worker.gguf_file import read_gguf

    path = tmp_path / "odd.gguf"
    _gguf_with_pre(path, read_gguf(gguf_path).metadata, "something-new")
    with caplog.at_level(logging.WARNING):
        tokenizer = Tokenizer.from_gguf(str(path))
    assert "something-new" in caplog.text
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def test_sentencepiece_gguf_is_refused_clearly(tmp_path):
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'llama' is not supported"):
        Tokenizer.from_gguf(str(path))


# ------------------------------------------------------------------------------ cache


def test_converted_tokenizer_is_cached_and_reused(tmp_path, gguf_path, monkeypatch, capsys):
    monkeypatch.setenv("KVOPS_CACHE_DIR", str(tmp_path))
    start = time.perf_counter()
    first = Tokenizer.from_gguf(gguf_path)
    first_seconds = time.perf_counter() - start
    cached = list(tmp_path.glob("tokenizers/*/tokenizer.json"))
    assert len(cached) == 1
    meta = json.loads((cached[0].parent / "kvops_tokenizer.json").read_text())
    assert meta["eos_token_id"] == 2 and meta["chat_template"].startswith("{% for message")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(tokenizer_module, "convert_gguf_tokenizer", no_conversion)
    start = time.perf_counter()
    second = Tokenizer.from_gguf(gguf_path)
    second_seconds = time.perf_counter() - start
    assert second.encode("Hello 😀 world") == first.encode("Hello 😀 world")
    assert second.eos_token_ids == first.eos_token_ids
    assert second.chat_template == first.chat_template
    with capsys.disabled():
        print(f"\ntokenizer load: first {first_seconds:.3f}s, cached {second_seconds:.3f}s")

    # a damaged entry is rebuilt rather than fatal
    monkeypatch.undo()
    monkeypatch.setenv("KVOPS_CACHE_DIR", str(tmp_path))
    cached[0].write_text("{not json")
    again = Tokenizer.from_gguf(gguf_path)
    assert again.encode("Hello") == [19556]
    assert json.loads(cached[0].read_text())  # rewritten


def test_unwritable_cache_is_not_fatal(tmp_path, gguf_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KVOPS_CACHE_DIR", str(blocker))
    assert Tokenizer.from_gguf(gguf_path).encode("Hello") == [19556]


# ------------------------------------------------------------------------------ streaming


STREAM_TEXTS = [
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧‍👦 in a row 🇯🇵🇫🇷",
    "中文句子，包含罕见字：龘靐齉爨。日本語も少し。",
    "Mixed: naïve 😀 中 ❤️ ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end",
    "plain ascii text with code: for i in range(10): print(i)",
]


def _stream(tokenizer, prompt, ids, chunks, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas = []
    position = 0
    for size in chunks:
        delta = detok.add(ids[position : position + size])
        position += size
        assert "\ufffd" not in delta
        deltas.append(delta)
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer_one_token_at_a_time(ours, text):
    prompt = ours.encode(ours.apply_chat_template([{"role": "user", "content": "Say it"}]))
    ids = ours.encode(text, add_special_tokens=False)
    detok, deltas = _stream(ours, prompt, ids, [1] * len(ids))
    assert "".join(deltas) == detok.text == ours.decode(ids) == text
    if any(ord(c) > 0x7FF for c in text):
        # some characters were split across tokens, so some steps held text back
        assert "" in deltas[:-1]
    assert detok.output_token_ids == ids


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_incremental_detokenizer_random_chunks(data):
    tokenizer = _shared_tokenizer()
    pieces = st.sampled_from([*"ab 😀👍🏽中文é\n龘∑", "<|im_end|>", "<|im_start|>"])
    text = "".join(data.draw(st.lists(pieces, max_size=40)))
    skip = data.draw(st.booleans())
    ids = tokenizer.encode(text, add_special_tokens=False)
    chunks = []
    remaining = len(ids)
    while remaining:
        size = data.draw(st.integers(1, min(4, remaining)))
        chunks.append(size)
        remaining -= size
    detok, deltas = _stream(tokenizer, [], ids, chunks, skip_special_tokens=skip)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)


_TOKENIZER: list[Tokenizer] = []


def _shared_tokenizer() -> Tokenizer:
    if not _TOKENIZER:
        from kvops.worker.weights import resolve_model

        _TOKENIZER.append(Tokenizer.from_gguf(resolve_model("default")))
    return _TOKENIZER[0]


def test_incremental_detokenizer_holds_a_split_character_until_complete(ours):
    ids = ours.encode("龘", add_special_tokens=False)
    assert len(ids) > 1  # a rare character: several byte-level tokens
    detok = IncrementalDetokenizer(ours, [])
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "龘"
    # an incomplete character at the very end comes out on flush, as decode() shows it
    detok = IncrementalDetokenizer(ours, [])
    assert detok.add(ids[:1]) == ""
    assert detok.flush() == ours.decode(ids[:1])


def test_incremental_detokenizer_window_stays_small(ours):
    rng = random.Random(0)
    words = ["hello", " world", " 😀", " 中文", "\n", " <|im_end|>", " x"]
    text = "".join(rng.choice(words) for _ in range(3000))
    ids = ours.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, ids[:10])
    longest = 0
    for token in ids:
        detok.add([token])
        longest = max(longest, len(detok._ids))
    detok.flush()
    assert detok.text == ours.decode(ids)
    assert longest < 80  # a bounded window, never the whole sequence
