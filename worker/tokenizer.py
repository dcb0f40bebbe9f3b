"""Tokenizers: a Hugging Face tokenizer.json, or one rebuilt from a GGUF file's metadata.

`Tokenizer` wraps a `tokenizers.Tokenizer` with what the engine needs: encoding (with the
model's BOS rule), decoding, the model's own Jinja chat template and the set of token ids that end
a generation (`eos_token_ids`).

GGUF files carry no tokenizer.json, only the vocabulary, the merges, the token types and the
name of the pre-tokenizer (`tokenizer.ggml.pre`). For byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`) we build the equivalent `tokenizers` pipeline: the split regex
llama.cpp uses for that pre-tokenizer name, the byte-level alphabet, BPE with the file's merges,
and the CONTROL / USER_DEFINED tokens registered as added tokens so they are matched whole in
text. The result is cached as tokenizer.json under `$KVOPS_CACHE_DIR` (default
`~/.cache/kvops`), keyed by the file's path, size and modification time, so later loads skip the
conversion. SentencePiece GGUF vocabularies (`"llama"`) are not supported: a ValueError says so.

`IncrementalDetokenizer` turns a stream of token ids into a stream of text deltas that never end
in a partial UTF-8 character.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from kvops.worker.gguf_file import read_gguf

logger = logging.getLogger(__name__)

# Bumped whenever the GGUF conversion changes, so stale cache entries are not reused.
_CACHE_VERSION = 1

# Tokens that end a chat turn in common model families. When one of them is a special (control)
# token of the vocabulary it joins eos_token_ids, as in llama.cpp's end-of-generation set.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|return|>",
    "<EOT>",
    "<|END_OF_TURN_TOKEN|>",
    "<｜end▁of▁sentence｜>",  # noqa: RUF001 (DeepSeek's full-width bars)
)

# GGUF token types (llama.cpp's llama_token_type)
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Split regexes of byte-level BPE pre-tokenizers, by the family llama.cpp names them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    # GPT-2's regex
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "default": "gpt2",
    # GPT-2's regex after splitting off every digit (SmolLM, StarCoder)
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    # Llama 3 (tiktoken-like, numbers in groups of up to three)
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "falcon3": "llama3",
    "pixtral": "llama3",
    "dbrx": "llama3",
    # Qwen2 (as Llama 3, single digits)
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "megrez": "qwen2",
}


class Tokenizer:
    """A model's tokenizer: encode, decode, chat template, end-of-generation ids."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        source: str = "",
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.source = source
        self._template = None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        decoder = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, t in decoder.items() if t.special)
        eos = set(extra_eos_token_ids)
        if eos_token_id is not None:
            eos.add(eos_token_id)
        for token_id, token in decoder.items():
            if token.special and token.content in END_OF_TURN_TOKENS:
                eos.add(token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    # ---------------------------------------------------------------------------- basics

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.id_to_token(self.eos_token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def add_eos_token_ids(self, ids: Iterable[int]) -> None:
        """Add end-of-generation ids (e.g. from generation_config.json)."""
        self.eos_token_ids = self.eos_token_ids | frozenset(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched whole.

        With add_special_tokens, the model's BOS is prepended when its config asks for one (a
        tokenizer.json post-processor that adds it already is not doubled).
        """
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary decode to ""."""
        ids = list(ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos_token_ids={sorted(self.eos_token_ids)})"
        )

    # ---------------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render `messages` with the model's own chat template.

        Encode the result with `add_special_tokens=False`: templates write BOS themselves when
        the model wants one. Extra keyword arguments (tools=..., ...) reach the template.
        Raises ValueError when the model has no template, the messages are malformed or the
        template rejects them (`raise_exception`).
        """
        if not self.chat_template:
            raise ValueError(f"the model's tokenizer ({self.source}) has no chat template")
        messages = _check_messages(messages)
        template = self._compiled_template()
        context = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
        }
        context.update(extra)
        import jinja2

        try:
            return template.render(**context)
        except _TemplateRaised as e:
            raise ValueError(f"chat template: {e}") from None
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"chat template failed on these messages: {e}") from None

    def _compiled_template(self):
        if self._template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True,
                lstrip_blocks=True,
                extensions=["jinja2.ext.loopcontrols"],
            )
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"the model's chat template does not compile: {e}") from None
        return self._template

    # ---------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, folder: str) -> Tokenizer:
        """From a Hugging Face folder: tokenizer.json + tokenizer_config.json (+ the rest)."""
        path = os.path.join(folder, "tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} has no tokenizer.json") from None
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))

        def token_id(name: str) -> int | None:
            value = config.get(name) or special_map.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        elif template is None:
            template = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template if isinstance(template, str) else None,
            source=folder,
        )

    @classmethod
    def from_gguf(cls, path: str, metadata: dict[str, Any] | None = None) -> Tokenizer:
        """From a GGUF file's metadata, through the tokenizer.json cache.

        `metadata` (the parsed GGUF key/values) saves re-reading the header on a cache miss.
        """
        cache_dir = _cache_entry(path)
        cached = _load_cached(cache_dir, path) if cache_dir else None
        if cached is not None:
            return cached
        if metadata is None:
            metadata = read_gguf(path).metadata
        backend, meta = convert_gguf_tokenizer(metadata, source=path)
        if cache_dir:
            _store_cached(cache_dir, backend, meta)
        return cls(backend, source=path, **meta)


# ------------------------------------------------------------------------------- GGUF conversion


def convert_gguf_tokenizer(
    metadata: dict[str, Any], source: str = "GGUF file"
) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Build a `tokenizers.Tokenizer` and the Tokenizer keyword arguments from GGUF metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{source} has no tokenizer (no tokenizer.ggml.model in its metadata)")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, "
            "'gpt2'); use the model's Hugging Face folder instead"
        )
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    merges: list[str] = metadata.get("tokenizer.ggml.merges") or []
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens/token_type are missing or inconsistent")

    byte_chars = set(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # Normal tokens are spelled in the byte-level alphabet; an added token with other
        # characters is re-spelled so that it still has an entry (it cannot be typed, though).
        key = token if set(token) <= byte_chars else _byte_level(token)
        vocab.setdefault(key, index)
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) == 2:
            pairs.append((parts[0], parts[1]))

    pre_name = metadata.get("tokenizer.ggml.pre") or "default"
    family = _PRE_TOKENIZERS.get(pre_name)
    if family is None:
        logger.warning(
            "%s: unknown pre-tokenizer %r; using GPT-2's split regex (tokenization may differ "
            "from the original model's)",
            source,
            pre_name,
        )
        family = "gpt2"
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=family == "llama3")
    except Exception as e:  # tokenizers raises a bare Exception for merges it cannot use
        raise ValueError(f"{source}: the GGUF vocabulary and merges do not form a BPE: {e}") from e
    backend = tokenizers.Tokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if family in ("gpt2", "digits"):
        split = pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated")
        steps = [split, byte_level]
        if family == "digits":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    else:
        pattern = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
        steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level]
    if family == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()

    special: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for index, (token, kind_) in enumerate(zip(tokens, types, strict=True)):
        if kind_ not in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED) or vocab.get(token) != index:
            continue
        target = special if kind_ == _TOKEN_CONTROL else user_defined
        target.append(AddedToken(token, special=kind_ == _TOKEN_CONTROL, normalized=False))
    if special:
        backend.add_special_tokens(special)
    if user_defined:
        backend.add_tokens(user_defined)

    def valid_id(key: str) -> int | None:
        value = metadata.get(key)
        return value if isinstance(value, int) and 0 <= value < len(tokens) else None

    extra_eos = [
        i
        for i in (
            valid_id("tokenizer.ggml.eot_token_id"),
            valid_id("tokenizer.ggml.eom_token_id"),
        )
        if i is not None
    ]
    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    meta = {
        "bos_token_id": valid_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": valid_id("tokenizer.ggml.eos_token_id"),
        # llama.cpp adds no BOS to a BPE vocabulary whose file does not ask for one
        "add_bos_token": bool(add_bos) if add_bos is not None else False,
        "chat_template": metadata.get("tokenizer.chat_template"),
        "extra_eos_token_ids": extra_eos,
    }
    return backend, meta


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_CHARS = _bytes_to_unicode()


def _byte_level(text: str) -> str:
    return "".join(_BYTE_CHARS[b] for b in text.encode("utf-8"))


# ------------------------------------------------------------------------------- cache


def cache_dir() -> str:
    """kvops' cache folder: $KVOPS_CACHE_DIR, else ~/.cache/kvops."""
    return os.environ.get("KVOPS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kvops"
    )


def _cache_entry(path: str) -> str | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = f"{_CACHE_VERSION}|{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), "tokenizers", digest)


def _load_cached(entry: str, path: str) -> Tokenizer | None:
    tokenizer_path = os.path.join(entry, "tokenizer.json")
    meta_path = os.path.join(entry, "kvops_tokenizer.json")
    if not (os.path.isfile(tokenizer_path) and os.path.isfile(meta_path)):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        backend = tokenizers.Tokenizer.from_file(tokenizer_path)
        return Tokenizer(backend, source=path, **meta)
    except Exception as e:  # a damaged entry is rebuilt, never fatal
        logger.warning("ignoring damaged tokenizer cache %s: %s", entry, e)
        return None


def _store_cached(entry: str, backend: tokenizers.Tokenizer, meta: dict[str, Any]) -> None:
    try:
        os.makedirs(entry, exist_ok=True)
        for name, text in (
            ("tokenizer.json", backend.to_str()),
            ("kvops_tokenizer.json", json.dumps(meta)),
        ):
            # write-then-rename so that concurrent loaders never see half a file
            fd, tmp = tempfile.mkstemp(dir=entry, prefix=f".{name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, os.path.join(entry, name))
    except OSError as e:
        logger.warning("cannot cache the converted tokenizer in %s: %s", entry, e)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------- chat helpers


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages; text-part lists become plain strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] has no 'role'")
        if "content" not in message:
            raise ValueError(f"messages[{i}] has no 'content'")
        content = message["content"]
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}] has no 'text'")
                texts.append(part["text"])
            message = {**message, "content": "\n".join(texts)}
        elif content is None:
            if not message.get("tool_calls"):
                raise ValueError(f"messages[{i}].content is null")
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        checked.append(message)
    return checked


# ------------------------------------------------------------------------------- streaming

# How many prompt tokens give the first output tokens their decoding context.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turn generated token ids into text deltas.

    `add(ids)` returns the text those ids complete. Only a short window of recent tokens is
    decoded each time: `prefix_offset..read_offset` is text already emitted (decoded again only as
    context, because how a token decodes can depend on the one before it), `read_offset..` is new.
    Text ending in U+FFFD (a UTF-8 character split between tokens) is held back until a later
    token completes it; `flush()` releases whatever is still held when generation ends. The
    concatenated deltas equal `tokenizer.decode(output ids)` for byte-level BPE tokenizers.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self._ids)
        self.text = ""
        self.output_token_ids: list[int] = []

    def add(self, new_token_ids: Sequence[int]) -> str:
        if not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        self.output_token_ids.extend(new_token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self._ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self._ids[self.prefix_offset :], self.skip_special_tokens)
        if full.endswith("\ufffd"):
            return ""  # a character is still incomplete
        delta = full[len(prefix) :]
        self._advance()
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit what is held back (a dangling partial character becomes U+FFFD)."""
        if self.read_offset >= len(self._ids):
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self._ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self._ids[self.prefix_offset :], self.skip_special_tokens)
        delta = full[len(prefix) :]
        self._advance()
        self.text += delta
        return delta

    def _advance(self) -> None:
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        # keep the list short: drop ids before the window
        if self.prefix_offset > 64:
            del self._ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
