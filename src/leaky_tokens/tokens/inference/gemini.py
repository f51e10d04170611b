"""Gemini's native API (`generateContent`, `streamGenerateContent?alt=sse`) in OpenAI's terms,
both ways: pure functions, tested against recorded bodies.

Requests: system messages -> `systemInstruction`; user/assistant -> `contents` with roles
`user`/`model`; `max_tokens` -> `generationConfig.maxOutputTokens` (thinking tokens are spent
inside it). Answers: the candidate's non-thought text; `finishReason` STOP -> stop, MAX_TOKENS ->
length, the safety family -> content_filter; usage prompt = `promptTokenCount`, completion =
`candidatesTokenCount + thoughtsTokenCount` (thinking is billed and is not in the candidates'
count). Errors: `{"error": {code, message, status, details}}`, sometimes inside a JSON array;
`RESOURCE_EXHAUSTED` is a 429 whose retry hint is `RetryInfo.retryDelay` ("19s", "3.700s").
"""

from __future__ import annotations

import re
from typing import Any

from leaky_tokens.shared.tokenizer import message_text
from leaky_tokens.tokens.inference.wire import ChatCall, FailureKind, ProviderError, Usage

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "LANGUAGE": "content_filter",
    "MALFORMED_FUNCTION_CALL": "stop",
    "OTHER": "stop",
    "FINISH_REASON_UNSPECIFIED": "stop",
}
_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "audio")


def to_request(call: ChatCall) -> dict[str, Any]:
    """The generateContent body for an OpenAI-style chat call. Parameters this translation
    does not carry (tool calling, logprobs, audio) are refused rather than silently dropped."""
    for name in UNSUPPORTED:
        if call.options.get(name) not in (None, False, []):
            raise ProviderError(
                "rejected", f"'{name}' is not supported for Gemini models here yet", param=name
            )
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for message in call.messages:
        role = message.get("role")
        text = message_text(message.get("content", ""))
        if role in ("system", "developer"):
            system.append(text)
            continue
        gemini_role = "model" if role == "assistant" else "user"
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].append({"text": text})  # Gemini wants turns to alternate
        else:
            contents.append({"role": gemini_role, "parts": [{"text": text}]})
    config: dict[str, Any] = {"maxOutputTokens": call.max_tokens}
    options = call.options
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if options.get(ours) is not None:
            config[theirs] = options[ours]
    stop = options.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list):
        config["stopSequences"] = [s for s in stop if isinstance(s, str)]
    response_format = options.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    ):
        config["responseMimeType"] = "application/json"
    body: dict[str, Any] = {"contents": contents or [{"role": "user", "parts": [{"text": ""}]}]}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    body["generationConfig"] = config
    return body


def usage_of(metadata: Any) -> Usage | None:
    """Billable usage from `usageMetadata` (None when it has no prompt count)."""
    if not isinstance(metadata, dict):
        return None
    prompt = metadata.get("promptTokenCount")
    if not isinstance(prompt, int):
        return None
    candidates = metadata.get("candidatesTokenCount")
    thoughts = metadata.get("thoughtsTokenCount")
    cached = metadata.get("cachedContentTokenCount")
    answer = candidates if isinstance(candidates, int) else 0
    thinking = thoughts if isinstance(thoughts, int) else 0
    return Usage(prompt, answer + thinking, thinking, cached if isinstance(cached, int) else 0)


def candidate_of(body: dict[str, Any]) -> tuple[str, str | None]:
    """(answer text without thoughts, OpenAI finish reason or None) of the first candidate."""
    candidates = body.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        return "", None
    candidate = candidates[0]
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    text = ""
    if isinstance(parts, list):
        text = "".join(
            p["text"]
            for p in parts
            if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
        )
    reason = candidate.get("finishReason")
    finish = FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else None
    return text, finish


def to_completion(
    body: dict[str, Any], *, model: str, created: int
) -> tuple[dict[str, Any], Usage | None]:
    """An OpenAI chat.completion from a generateContent answer, and its usage."""
    text, finish = candidate_of(body)
    usage = usage_of(body.get("usageMetadata"))
    completion: dict[str, Any] = {
        "id": f"chatcmpl-{body.get('responseId') or 'gemini'}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish or "stop",
            }
        ],
        "system_fingerprint": None,
    }
    if usage is not None:
        completion["usage"] = usage.as_openai()
    return completion, usage


def retry_delay_seconds(details: Any) -> float | None:
    """`RetryInfo.retryDelay` among an error's details, in seconds."""
    if not isinstance(details, list):
        return None
    for detail in details:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            match = _DELAY.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def error_of(status: int, body: Any) -> ProviderError:
    """Our ProviderError for a Gemini error answer (object or Vertex-style array)."""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    inner = body.get("error") if isinstance(body, dict) else None
    inner = inner if isinstance(inner, dict) else {}
    message = str(inner.get("message") or f"Gemini answered {status}")
    state = str(inner.get("status") or "")
    retry = retry_delay_seconds(inner.get("details"))
    kind: FailureKind
    if status == 429 or state == "RESOURCE_EXHAUSTED":
        kind, status = "rate_limited", 429
    elif status == 503 or state == "UNAVAILABLE":
        kind = "unavailable"
    elif status == 504 or state == "DEADLINE_EXCEEDED":
        kind = "timeout"
    elif status in (401, 403) or state in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        kind, message = "failed", "the provider refused the gateway's credentials"
    elif 400 <= status < 500:
        kind = "rejected"
    else:
        kind = "failed"
    return ProviderError(kind, message, status=status, retry_after_seconds=retry)


def stream_state_chunks(
    body: dict[str, Any], *, completion_id: str, model: str, created: int, first: bool
) -> tuple[list[dict[str, Any]], Usage | None, bool]:
    """The OpenAI chunks one streamed Gemini event stands for, its usage (any event may carry
    some; the last counts), and whether it finished the answer."""
    text, finish = candidate_of(body)
    chunks: list[dict[str, Any]] = []

    def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
        }

    if first:
        chunks.append(chunk({"role": "assistant", "content": ""}, None))
    if text:
        chunks.append(chunk({"content": text}, None))
    if finish is not None:
        chunks.append(chunk({}, finish))
    return chunks, usage_of(body.get("usageMetadata")), finish is not None
