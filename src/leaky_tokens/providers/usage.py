"""Token usage of the plan's chat route: the offline tokenizer over the request's text."""

from __future__ import annotations

from typing import Any

from leaky_tokens.shared.tokenizer import count_text

# Keys whose string values are prompt text in the request shapes we accept: OpenAI chat
# (messages[].content, possibly a list of {"type": "text", "text": ...} parts), OpenAI
# responses (input, instructions), Gemini (contents[].parts[].text, systemInstruction), Qwen
# DashScope (input.prompt) and our token service ({"prompt": ...}). Metadata such as "model"
# and "role" is not text the model reads, so it is not counted.
TEXT_KEYS = frozenset({"prompt", "content", "text", "input", "system", "instructions"})


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


def count_prompt_tokens(provider: str, body: dict[str, Any]) -> int:
    model = body.get("model")
    return count_text(provider, model if isinstance(model, str) else "", prompt_text(body))
