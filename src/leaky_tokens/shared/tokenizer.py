"""Offline token counting for every provider: tiktoken over BPE files shipped in the package.

Nothing is downloaded, ever: tiktoken's own `get_encoding` fetches its vocabularies from the
network on first use, so the encodings are built here from `shared/vocab/*.tiktoken.gz`, each
checked against the sha256 tiktoken itself expects (see `shared/vocab/NOTICE.md` for where the
files come from and their licences).

* OpenAI: `o200k_base` (gpt-4o, gpt-4.1, gpt-5, o-series) or `cl100k_base` (gpt-4, gpt-3.5,
  text-embedding-*), chosen by tiktoken's own model table; unknown models get `o200k_base`.
* Qwen: the Qwen vocabulary (`qwen.tiktoken`, 151,643 merges, shared by Qwen 1 to 3).
* Gemini: no Gemini vocabulary exists offline, so `o200k_base` stands in and
  `Tokenizer.upper_bound` multiplies by `GEMINI_SAFETY_MARGIN` for reservations; the provider's
  reported usage settles the exact figure.

Chat prompts add the framing of OpenAI's cookbook: 3 tokens per message, 1 more per `name`, and
3 priming the reply. Encodings load lazily (about a second for o200k on a busy machine) and are
kept for the life of the process: `preload()` at start-up moves that second off the first request.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import math
import threading
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import tiktoken
from tiktoken.model import encoding_name_for_model

TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

# Gemini counts with its own SentencePiece vocabulary (Gemma's, 262k pieces), which is not on
# PyPI. o200k_base is a close stand-in for English and code; for CJK text the two differ by up
# to ~20 % either way, so reservations for Gemini take o200k's count times this margin.
GEMINI_SAFETY_MARGIN: Final = 1.25

# tiktoken's Rust BPE recurses per regex piece; the Qwen SDK splits text above this size to
# stay clear of stack overflows on huge inputs, and so do we (counts are additive across
# splits made at whitespace, and within a percent at a hard cut).
_MAX_PIECE_CHARS: Final = 100_000

# The regex patterns and special tokens below are tiktoken's (tiktoken_ext/openai_public.py,
# tiktoken 0.14.0) and the Qwen SDK's (dashscope/tokenizers/qwen_tokenizer.py, dashscope 2.0.2);
# tests/shared/test_tokenizer.py checks the OpenAI ones against tiktoken itself.
_CL100K_PAT: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_QWEN_PAT: Final = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN_SPECIALS: Final = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
)


@dataclass(frozen=True, slots=True)
class VocabFile:
    """One shipped vocabulary: its file, the sha256 of its uncompressed bytes, how to split."""

    file: str
    sha256: str
    pat_str: str
    special_tokens: Mapping[str, int]
    normalize_nfc: bool = False  # the Qwen tokenizer NFC-normalises its input first


VOCABULARIES: Final[Mapping[str, VocabFile]] = {
    "o200k_base": VocabFile(
        "o200k_base.tiktoken.gz",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": VocabFile(
        "cl100k_base.tiktoken.gz",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "qwen": VocabFile(
        "qwen.tiktoken.gz",
        "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
        _QWEN_PAT,
        {token: 151643 + i for i, token in enumerate(_QWEN_SPECIALS)},
        normalize_nfc=True,
    ),
}


class VocabularyCorrupted(RuntimeError):
    """A shipped vocabulary file does not have the sha256 it must have."""


# A process-wide cache on purpose: the vocabularies are immutable package data, like tiktoken's
# own registry, and loading one costs about a second of CPU.
_loaded: dict[str, tiktoken.Encoding] = {}
_load_lock = threading.Lock()


def load_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built from the shipped file on first use (thread-safe)."""
    found = _loaded.get(name)
    if found is not None:
        return found
    vocab = VOCABULARIES[name]  # KeyError: not a shipped encoding
    with _load_lock:
        found = _loaded.get(name)
        if found is None:
            found = _build(name, vocab)
            _loaded[name] = found
    return found


def _build(name: str, vocab: VocabFile) -> tiktoken.Encoding:
    packed = resources.files("leaky_tokens.shared").joinpath("vocab", vocab.file)
    raw = gzip.decompress(packed.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != vocab.sha256:
        raise VocabularyCorrupted(f"{vocab.file}: sha256 {digest}, expected {vocab.sha256}")
    # The .tiktoken format: one "base64(token) rank" per line (tiktoken.load.load_tiktoken_bpe).
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in raw.splitlines() if line)
    }
    return tiktoken.Encoding(
        name,
        pat_str=vocab.pat_str,
        mergeable_ranks=ranks,
        special_tokens=dict(vocab.special_tokens),
    )


def preload(*names: str) -> float:
    """Load the named encodings (default: all shipped) now; returns the seconds it took."""
    started = time.perf_counter()
    for name in names or tuple(VOCABULARIES):
        load_encoding(name)
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """Counts, encodes and decodes text for one provider's models.

    Special-token text such as "<|endoftext|>" in a prompt is counted as ordinary text, as the
    providers do with user content.
    """

    encoding_name: str
    # > 1 when the encoding only approximates the provider's own vocabulary (Gemini).
    safety_margin: float = 1.0

    @property
    def encoding(self) -> tiktoken.Encoding:
        return load_encoding(self.encoding_name)

    @property
    def exact(self) -> bool:
        """Whether counts are the provider's own (else an estimate, see `upper_bound`)."""
        return self.safety_margin == 1.0

    def encode(self, text: str) -> list[int]:
        encoding = self.encoding
        if VOCABULARIES[self.encoding_name].normalize_nfc:
            text = unicodedata.normalize("NFC", text)
        if len(text) <= _MAX_PIECE_CHARS:
            return encoding.encode_ordinary(text)
        tokens: list[int] = []
        for piece in _split(text):
            tokens.extend(encoding.encode_ordinary(piece))
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of `tokens`; a multi-byte character cut in half decodes as U+FFFD."""
        return self.encoding.decode(tokens)

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def count_messages(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Prompt tokens of an OpenAI-style chat: every message's text plus the framing."""
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if key == "name":
                    total += TOKENS_PER_NAME
                total += self.count(message_text(value))
        return total

    def truncate(self, text: str, max_tokens: int) -> tuple[str, int]:
        """The longest prefix of `text` within `max_tokens` tokens, and its token count."""
        tokens = self.encode(text)
        if len(tokens) <= max_tokens:
            return text, len(tokens)
        kept = tokens[: max(max_tokens, 0)]
        return self.decode(kept), len(kept)

    def upper_bound(self, tokens: int) -> int:
        """A count safe to reserve when the provider counts `tokens` with its own vocabulary."""
        return math.ceil(tokens * self.safety_margin)


def message_text(value: Any) -> str:
    """The text a model reads in one message field: a string, text parts, or tool calls."""
    if isinstance(value, str):
        return value
    pieces: list[str] = []
    if isinstance(value, Mapping):
        for key in ("text", "name", "arguments", "function"):
            if key in value:
                pieces.append(message_text(value[key]))
    elif isinstance(value, list):
        pieces.extend(message_text(item) for item in value)
    return "".join(pieces)


def _split(text: str) -> Iterable[str]:
    """Pieces of at most _MAX_PIECE_CHARS, cut at the last whitespace where there is one."""
    start = 0
    while start < len(text):
        end = min(start + _MAX_PIECE_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if cut > start:
                end = cut
        yield text[start:end]
        start = end


OPENAI: Final = "openai"
QWEN: Final = "qwen"
GEMINI: Final = "gemini"


@functools.lru_cache(maxsize=512)
def tokenizer_for(provider: str, model: str = "") -> Tokenizer:
    """The tokenizer for `model` of `provider` ("openai", "qwen", "gemini")."""
    if provider == QWEN:
        return Tokenizer("qwen")
    if provider == GEMINI:
        return Tokenizer("o200k_base", safety_margin=GEMINI_SAFETY_MARGIN)
    if provider == OPENAI:
        try:
            name = encoding_name_for_model(model)
        except KeyError:
            name = "o200k_base"
        return Tokenizer(name if name in VOCABULARIES else "o200k_base")
    raise ValueError(f"unknown provider {provider!r}")


def count_text(provider: str, model: str, text: str) -> int:
    return tokenizer_for(provider, model).count(text)


def count_messages(provider: str, model: str, messages: Iterable[Mapping[str, Any]]) -> int:
    return tokenizer_for(provider, model).count_messages(messages)
