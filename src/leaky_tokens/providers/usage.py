"""Deterministic token counting for stub replies: ceil(characters / 4) over the request's text."""

from __future__ import annotations

from typing import Any

# Keys whose string values are prompt text in the request shapes we accept: OpenAI chat
# (messages[].content, possibly a list of {"type": "text", "text": ...} parts), OpenAI
# responses (input, instructions), Gemini (contents[].parts[].text, systemInstruction), Qwen
# DashScope (input.prompt) and our token service ({"prompt": ...}). Metadata such as "model"
# and "role" is not text the model reads, so it is not counted.
TEXT_KEYS = frozenset({"prompt", "content", "text", "input", "system", "instructions"})

CHARS_PER_TOKEN = 4


def count_tokens(text: str) -> int:
    """ceil(len / 4): 0 for empty text, at least 1 otherwise."""
    return -(-len(text) // CHARS_PER_TOKEN)


def prompt_text(body: Any) -> str:
    """All prompt text in a request body, in document order.

    A string counts when the nearest enclosing object key is a text key (list items inherit
    their list's key). Walked with an explicit stack so deeply nested bodies cannot exhaust
    the recursion limit.
    """
    pieces: list[str] = []
    stack: list[tuple[Any, str | None]] = [(body, None)]
    while stack:
        node, key = stack.pop()
        if isinstance(node, str):
            if key in TEXT_KEYS:
                pieces.append(node)
        elif isinstance(node, dict):
            stack.extend((value, str(k)) for k, value in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend((item, key) for item in reversed(node))
    return "".join(pieces)


def count_prompt_tokens(body: Any) -> int:
    return count_tokens(prompt_text(body))
