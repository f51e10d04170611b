"""What every emulated provider API shares: deterministic replies and vectors, the streaming
response (with its faults), and provider-shaped errors.

Replies are a pure function of the request: the prompt's text and model seed a word generator,
the length lies in [reply_min_tokens, reply_max_tokens], and an output cap cuts the reply (the
reply under a cap is a prefix of the reply without one). "Thinking" models first spend some
reasoning tokens, which count against the same cap, as OpenAI's o-series and Gemini 2.5 do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import random
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Send

from leaky_tokens.providers.faults import Decision, FaultInjector
from leaky_tokens.settings import StubSettings
from leaky_tokens.shared.tokenizer import Tokenizer

# How long a "hang" waits for the client to give up before the stub closes the connection.
MAX_HANG_SECONDS = 600.0

# Common words, each one token with its leading space in o200k, cl100k and the Qwen vocabulary,
# so a reply cut at a token boundary is still whole words.
_WORD_LIST = """
the of and to in is that for it as was with be by on not he this are or his from at
which but have an they you were her she there one all we can their has been if more
when will would who so no time out up about into than them only other new some could
these two may first then do any like my now over such our man me even most made after
also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see
men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three
"""
WORDS = tuple(_WORD_LIST.split())

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Reply:
    """One composed answer: visible text in stream-sized pieces, and the hidden reasoning."""

    pieces: tuple[str, ...]
    answer_tokens: int
    reasoning_pieces: tuple[str, ...]
    reasoning_tokens: int
    finish: FinishReason

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning_pieces)

    @property
    def output_tokens(self) -> int:
        """Answer plus reasoning: what OpenAI reports as completion_tokens."""
        return self.answer_tokens + self.reasoning_tokens


def request_seed(model: str, messages: Sequence[Mapping[str, Any]]) -> int:
    """A seed that changes with the prompt and the model, and with nothing else."""
    material = orjson.dumps([model, list(messages)], option=orjson.OPT_SORT_KEYS)
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big")


def compose_reply(
    tokenizer: Tokenizer,
    *,
    seed: int,
    max_output: int | None,
    thinking: bool,
    settings: StubSettings,
) -> Reply:
    rng = random.Random(seed)
    natural = rng.randint(settings.reply_min_tokens, settings.reply_max_tokens)
    reasoning_natural = rng.randint(8, 24) if thinking else 0
    budget = math.inf if max_output is None else max_output
    reasoning = int(min(reasoning_natural, budget))
    answer = int(min(natural, budget - reasoning))
    reasoning_pieces, reasoning = _cut(
        tokenizer, _words(rng, reasoning_natural), reasoning, settings
    )
    pieces, answer = _cut(tokenizer, _words(rng, natural), answer, settings)
    finish: FinishReason = "length" if answer < natural or reasoning < reasoning_natural else "stop"
    return Reply(pieces, answer, reasoning_pieces, reasoning, finish)


def _words(rng: random.Random, count: int) -> str:
    """`count` tokens of text: count - 1 words and a full stop (each one token)."""
    if count <= 1:
        return "Ok" * count
    words = [rng.choice(WORDS) for _ in range(count - 1)]
    return " ".join(words).capitalize() + "."


def _cut(
    tokenizer: Tokenizer, text: str, keep: int, settings: StubSettings
) -> tuple[tuple[str, ...], int]:
    """The first `keep` tokens of `text` in stream-sized pieces, and how many there are."""
    tokens = tokenizer.encode(text)[:keep]
    size = settings.tokens_per_chunk
    pieces = tuple(tokenizer.decode(tokens[i : i + size]) for i in range(0, len(tokens), size))
    return pieces, len(tokens)


# --- embeddings ---------------------------------------------------------------------------


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on the text and the size asked for."""
    digest = hashlib.sha256(f"{dimensions}:{text}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def base64_floats(values: Sequence[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


# --- errors -------------------------------------------------------------------------------


class ProviderApiError(Exception):
    """An error to answer in the emulated provider's own body shape."""

    def __init__(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def response(self) -> Response:
        return json_response(self.body, self.status, self.headers)


class ClientGone(ProviderApiError):
    """The client left while the call hung; the answer goes nowhere (nginx's 499)."""

    def __init__(self) -> None:
        super().__init__(499, {})


async def provider_error_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProviderApiError)
    return exc.response()


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


async def read_json_object(request: Request, invalid: Callable[[str], ProviderApiError]) -> Any:
    """The request body as a JSON object, or the provider's 400."""
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def optional_int(body: Mapping[str, Any], *names: str) -> tuple[str, int | None]:
    """The first of `names` present in `body` (an int >= 1 or null), or ("", None)."""
    for name in names:
        if name in body and body[name] is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(name)
            return name, value
    return "", None


# --- faults before an answer --------------------------------------------------------------


async def admit(
    injector: FaultInjector, request: Request, error_for: Callable[[Decision], Exception]
) -> Decision:
    """Draw this call's faults, wait the latency, hang until the client leaves, or raise the
    decided error as `error_for` renders it; the decision then rules the answer's stream."""
    decision = injector.decide()
    if decision.latency_seconds:
        await asyncio.sleep(decision.latency_seconds)
    if decision.faults.hang:
        await wait_for_disconnect(request)
        raise ClientGone
    if decision.error is not None:
        raise error_for(decision)
    return decision


async def wait_for_disconnect(request: Request) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(MAX_HANG_SECONDS):
            while (await request.receive())["type"] != "http.disconnect":
                pass


# --- streaming ----------------------------------------------------------------------------


class StreamCut(Exception):
    """Raised inside a stream's events: the connection is closed with the body unfinished."""


class EventStream(StreamingResponse):
    """text/event-stream that a `StreamCut` ends without its terminator (or chunked end)."""

    media_type = "text/event-stream"

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.body_iterator:
                assert isinstance(chunk, bytes)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except StreamCut:
            # Returning with the body open makes the server drop the connection mid-message,
            # which clients see as a truncated chunked body: a provider cut off mid-stream.
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def paced_events(
    events: Iterable[bytes],
    decision: Decision,
    *,
    default_delay_ms: int,
    error_event: Callable[[int], bytes],
) -> AsyncIterator[bytes]:
    """Yield SSE events with the chunk delay, breaking off where the faults say.

    `error_event(n)` renders the provider's error event sent after n events."""
    faults = decision.faults
    delay = decision.chunk_delay_seconds(default_delay_ms)
    for sent, event in enumerate(events):
        if faults.cut_stream_after is not None and sent >= faults.cut_stream_after:
            raise StreamCut
        if faults.error_event_after is not None and sent >= faults.error_event_after:
            yield error_event(sent)
            return
        if sent and delay:
            await asyncio.sleep(delay)
        yield event


def sse(payload: Any, *, event: str | None = None, separator: bytes = b"\n\n") -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(payload) + separator


def stream_response(events: AsyncIterator[bytes], headers: Mapping[str, str]) -> EventStream:
    return EventStream(events, headers={"x-accel-buffering": "no", **headers})
