"""The models and products sessions can use. The model catalogue belongs to the /v1 API
(issue 11, `settings.inference.models`); `model_catalogue` is the one place that reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leaky_tokens.settings import AgentProduct, Settings


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    model: str
    provider: str
    context_window: int
    max_output_tokens: int


# Until the /v1 catalogue is in settings: the same default models the stubs serve.
_FALLBACK: tuple[CatalogueEntry, ...] = (
    CatalogueEntry("gpt-4o-mini", "openai", 128_000, 16_384),
    CatalogueEntry("gpt-4.1-mini", "openai", 1_047_576, 32_768),
    CatalogueEntry("qwen-turbo", "qwen", 131_072, 8_192),
    CatalogueEntry("qwen-plus", "qwen", 131_072, 8_192),
    CatalogueEntry("gemini-2.5-flash", "gemini", 1_048_576, 65_536),
    CatalogueEntry("gemini-2.0-flash", "gemini", 1_048_576, 8_192),
)


def model_catalogue(settings: Settings) -> dict[str, CatalogueEntry]:
    """Catalogue id -> entry, in the catalogue's order."""
    inference: Any = getattr(settings, "inference", None)
    models: Any = getattr(inference, "models", None)
    if not models:
        return {e.model: e for e in _FALLBACK}
    return {
        model_id: CatalogueEntry(
            model_id, str(m.provider), int(m.context_window), int(m.max_output_tokens)
        )
        for model_id, m in models.items()
    }


def products(settings: Settings) -> list[AgentProduct]:
    """The configured products, else one dynamic product over the whole catalogue (ordered so
    that consecutive models are on different providers, for rotation) and a static product
    per model. Products naming a model the catalogue lacks are left out."""
    catalogue = model_catalogue(settings)
    if settings.agents.products:
        return [p for p in settings.agents.products if all(m in catalogue for m in p.models)]
    by_provider: dict[str, list[str]] = {}
    for entry in catalogue.values():
        by_provider.setdefault(entry.provider, []).append(entry.model)
    interleaved: list[str] = []
    queues = list(by_provider.values())
    while any(queues):
        for queue in queues:
            if queue:
                interleaved.append(queue.pop(0))
    found = [
        AgentProduct(
            product_no="dynamic-chat",
            type="dynamic",
            models=interleaved,
            description="Any catalogue model; rotation moves to the next healthy one",
        )
    ]
    found.extend(
        AgentProduct(
            product_no=f"static-{model}",
            type="static",
            models=[model],
            description=f"Pinned to {model} ({catalogue[model].provider})",
        )
        for model in catalogue
    )
    return found
