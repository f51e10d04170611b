"""The OpenAI-compatible face at the gateway (issue 11): which paths it has and where they go.

Its routes are served by the token service (which owns the ledger) through an upstream of their
own, `inference`: the same service address with a longer deadline for the answer's headers and
for silences mid-stream (`gateway.inference_upstream_timeout_seconds`, 150 s) and for the whole
answer (`gateway.inference_answer_timeout_seconds`, 900 s), since a plain completion answers
only once the provider has finished and a stream may pause or run long while a model thinks. Its
own breaker means a slow provider never opens the breaker of the plan's token API. Errors on
these paths, the gateway's own included (401, 429, 503), are OpenAI-shaped (shared/http.py).
"""

from __future__ import annotations

from leaky_tokens.shared.http import go_duration
from leaky_tokens.shared.rate_limit import Decision

INFERENCE_UPSTREAM = "inference"
# (path, upstream): exact, or a prefix ending in "/".
OPENAI_ROUTES: tuple[tuple[str, str], ...] = (
    ("/v1/chat/completions", INFERENCE_UPSTREAM),
    ("/v1/models", INFERENCE_UPSTREAM),
    ("/v1/models/", INFERENCE_UPSTREAM),
    ("/v1/embeddings", INFERENCE_UPSTREAM),  # issue 12
    ("/v1/responses", INFERENCE_UPSTREAM),
    ("/v1/responses/", INFERENCE_UPSTREAM),
)
# The upstream's real address: the token service.
SERVED_BY = {INFERENCE_UPSTREAM: "tokens"}


def openai_request_limits(decision: Decision) -> dict[str, str]:
    """OpenAI's request rate-limit headers from the gateway's window for the caller (the token
    service adds the `-tokens` ones from the caller's leaky bucket)."""
    return {
        "x-ratelimit-limit-requests": str(decision.limit),
        "x-ratelimit-remaining-requests": str(decision.remaining),
        "x-ratelimit-reset-requests": go_duration(decision.reset_after),
    }
