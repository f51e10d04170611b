"""The offline tokenizer: shipped vocabularies, tiktoken's own counts, chat framing, truncation."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import tiktoken

from leaky_tokens.shared import tokenizer
from leaky_tokens.shared.tokenizer import (
    GEMINI_SAFETY_MARGIN,
    VOCABULARIES,
    Tokenizer,
    VocabFile,
    VocabularyCorrupted,
    count_messages,
    count_text,
    tokenizer_for,
)

SAMPLES = [
    "Hello",
    "Hello, world! How are you today?",
    "def add(a: int, b: int) -> int:\n    return a + b\n\n\nprint(add(2, 3))\n",
    "令牌网关为每个提供者计量人工智能令牌。这句话用中文写成。",
    "Ünïcödé ñ 😀 emoji and   multiple   spaces\r\n\ttabs 12345678 1,234.56",
    "<|endoftext|> is ordinary text in a prompt",
    "x" * 5000,
]

# Where tiktoken would download each file from; its cache names a file after sha1(url).
BLOB = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def shipped_bytes(name: str) -> bytes:
    packed = resources.files("leaky_tokens.shared").joinpath("vocab", VOCABULARIES[name].file)
    return gzip.decompress(packed.read_bytes())


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_openai_encodings_match_tiktokens_own_token_for_token(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Give tiktoken the shipped file in its cache, so its own get_encoding (its regex and special
    # tokens) runs offline and can be compared with the encoding built here.
    cache_name = hashlib.sha1(BLOB.format(name).encode()).hexdigest()
    (tmp_path / cache_name).write_bytes(shipped_bytes(name))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding(name)
    ours = Tokenizer(name)

    for text in SAMPLES:
        assert ours.encode(text) == reference.encode_ordinary(text), text
    assert ours.encoding.n_vocab == reference.n_vocab


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_each_shipped_file_has_the_expected_sha256(name: str) -> None:
    assert hashlib.sha256(shipped_bytes(name)).hexdigest() == VOCABULARIES[name].sha256


def test_a_file_with_another_hash_is_refused() -> None:
    tampered = VocabFile("cl100k_base.tiktoken.gz", "0" * 64, "x", {})
    with pytest.raises(VocabularyCorrupted, match="expected 0000"):
        tokenizer._build("tampered", tampered)


def test_loading_needs_no_network_and_no_tiktoken_cache(tmp_path: Path) -> None:
    # A fresh interpreter whose every proxy points at a closed port and whose tiktoken cache
    # is empty: any download attempt would fail.
    script = (
        "from leaky_tokens.shared.tokenizer import preload, count_text\n"
        "preload()\n"
        "print(count_text('openai', 'gpt-4o', 'Hello world'),"
        " count_text('qwen', 'qwen-plus', 'Hello world'))\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]
    assert list(tmp_path.iterdir()) == []


def test_qwen_vocabulary_has_its_specials_after_the_merges() -> None:
    qwen = Tokenizer("qwen").encoding
    assert qwen.n_vocab == 151643 + 208
    assert qwen.eot_token == 151643


def test_qwen_counts_chinese_tighter_than_cl100k() -> None:
    text = SAMPLES[3] * 10
    qwen, cl100k = count_text("qwen", "qwen-max", text), Tokenizer("cl100k_base").count(text)
    assert 0 < qwen < cl100k
    assert count_text("qwen", "qwen-max", "Hello, world!") == 4


@pytest.mark.parametrize(
    ("provider", "model", "encoding", "exact"),
    [
        ("openai", "gpt-4o-mini", "o200k_base", True),
        ("openai", "gpt-4.1", "o200k_base", True),
        ("openai", "gpt-5-mini", "o200k_base", True),
        ("openai", "o3-mini", "o200k_base", True),
        ("openai", "gpt-4", "cl100k_base", True),
        ("openai", "gpt-3.5-turbo", "cl100k_base", True),
        ("openai", "text-embedding-3-small", "cl100k_base", True),
        ("openai", "some-future-model", "o200k_base", True),
        ("qwen", "qwen-plus", "qwen", True),
        ("qwen", "qwen3-max", "qwen", True),
        ("gemini", "gemini-2.5-flash", "o200k_base", False),
    ],
)
def test_each_provider_and_model_gets_its_encoding(
    provider: str, model: str, encoding: str, exact: bool
) -> None:
    chosen = tokenizer_for(provider, model)
    assert chosen.encoding_name == encoding
    assert chosen.exact is exact


def test_an_unknown_provider_has_no_tokenizer() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        tokenizer_for("anthropic", "claude")


def test_gemini_reservations_carry_the_safety_margin() -> None:
    gemini = tokenizer_for("gemini", "gemini-2.5-pro")
    counted = gemini.count(SAMPLES[2])
    assert gemini.upper_bound(counted) >= counted * GEMINI_SAFETY_MARGIN
    assert gemini.upper_bound(0) == 0
    assert tokenizer_for("openai", "gpt-4o").upper_bound(17) == 17


# --- chat framing ---------------------------------------------------------------------------


def test_a_message_costs_three_plus_its_text_and_the_reply_primes_three() -> None:
    openai = tokenizer_for("openai", "gpt-4o")
    messages = [{"role": "user", "content": "Hello"}]
    # "user" and "Hello" are one token each
    assert openai.count_messages(messages) == 3 + 1 + 1 + 3
    assert count_messages("openai", "gpt-4o", messages) == 8
    assert openai.count_messages([]) == 3


def test_a_name_costs_one_more_than_its_text() -> None:
    openai = tokenizer_for("openai", "gpt-4o")
    plain = [{"role": "user", "content": "Hi there"}]
    named = [{"role": "user", "content": "Hi there", "name": "bob"}]
    assert openai.count_messages(named) == openai.count_messages(plain) + 1 + openai.count("bob")


def test_text_parts_and_tool_calls_are_counted_and_images_are_not() -> None:
    openai = tokenizer_for("openai", "gpt-4o")
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
                {"type": "text", "text": " this"},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "x"}'},
                }
            ],
        },
    ]
    expected = (
        3
        + 3
        + openai.count("user")
        + openai.count("Describe this")
        + 3
        + openai.count("assistant")
        + openai.count('lookup{"q": "x"}')
    )
    assert openai.count_messages(parts) == expected


# --- encode, decode, truncate ----------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "qwen", "gemini"])
def test_truncate_keeps_at_most_n_tokens_and_says_how_many(provider: str) -> None:
    chosen = tokenizer_for(provider, "any")
    text = SAMPLES[1] * 5
    total = chosen.count(text)

    cut, kept = chosen.truncate(text, 7)
    assert kept == 7
    assert text.startswith(cut)
    assert chosen.count(cut) == 7
    assert chosen.truncate(text, total) == (text, total)
    assert chosen.truncate(text, 0) == ("", 0)


def test_decode_inverts_encode() -> None:
    for name in VOCABULARIES:
        chosen = Tokenizer(name)
        for text in SAMPLES:
            assert chosen.decode(chosen.encode(text)) == text


def test_empty_text_is_zero_tokens() -> None:
    assert count_text("openai", "gpt-4o", "") == 0


def test_huge_text_is_counted_in_pieces_with_the_same_total() -> None:
    openai = Tokenizer("o200k_base")
    text = "lorem ipsum dolor sit amet " * 12_000  # 324,000 characters
    assert openai.count(text) == len(openai.encoding.encode_ordinary(text))
    assert openai.count("y" * 250_000) > 0
