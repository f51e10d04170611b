"""The offline tokenizer: first-load time per shipped encoding and microseconds per count.

`python -m bench.bench_tokenizer` prints one line per figure. Each load is measured in a fresh
interpreter (the encodings are cached for the life of a process)."""

from __future__ import annotations

import subprocess
import sys
import time

from leaky_tokens.shared.tokenizer import VOCABULARIES, tokenizer_for

TEXTS = {
    "chat 5 words": "Hello, how are you today?",
    "1 KB English": "The quick brown fox jumps over the lazy dog. " * 23,
    "1 KB Chinese": "令牌网关为每个提供者计量人工智能令牌。" * 18,
}
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Summarise the plot of Hamlet in two sentences."},
]


def first_load_seconds(name: str) -> float:
    script = (
        "import time; t = time.perf_counter()\n"
        "from leaky_tokens.shared.tokenizer import load_encoding\n"
        f"load_encoding({name!r}); print(time.perf_counter() - t)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return float(done.stdout)


def micros_per_call(call: object, repeat: int = 2000) -> float:
    assert callable(call)
    call()
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat * 1e6


def main() -> None:
    for name in VOCABULARIES:
        print(f"tokenizer load {name}: {first_load_seconds(name) * 1000:.0f} ms")
    for provider, model in (("openai", "gpt-4o-mini"), ("qwen", "qwen-plus")):
        chosen = tokenizer_for(provider, model)
        for label, text in TEXTS.items():
            micros = micros_per_call(lambda chosen=chosen, text=text: chosen.count(text))
            print(f"tokenizer count {chosen.encoding_name} {label}: {micros:.1f} us")
        micros = micros_per_call(lambda chosen=chosen: chosen.count_messages(MESSAGES))
        print(f"tokenizer count_messages {chosen.encoding_name} 2 messages: {micros:.1f} us")


if __name__ == "__main__":
    main()
