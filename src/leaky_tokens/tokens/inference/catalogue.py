"""The model catalogue of the /v1 API: ids clients send, and the provider model behind each."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from leaky_tokens.settings import CatalogueModel
from leaky_tokens.shared.tokenizer import tokenizer_for
from leaky_tokens.tokens.inference.errors import InvalidInferenceRequest, ModelNotFound

# `created` of every catalogue entry in /v1/models (the SDK needs an integer; ours is fixed).
CATALOGUE_CREATED = 1_700_000_000


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A catalogue entry as a call uses it."""

    id: str  # the catalogue id (what usage events and /v1/models name)
    provider: str  # "openai" | "qwen" | "gemini"
    upstream_model: str
    context_window: int
    max_output_tokens: int
    kind: str = "chat"  # "chat" | "embedding"

    def as_openai(self) -> dict[str, object]:
        return {
            "id": self.id,
            "object": "model",
            "created": CATALOGUE_CREATED,
            "owned_by": self.provider,
        }


class Catalogue:
    """Looks models up by id or by `provider/id`; anything else is `model_not_found`."""

    def __init__(self, models: Mapping[str, CatalogueModel]) -> None:
        self._models = {
            model_id: ModelRoute(
                model_id,
                entry.provider,
                entry.upstream_model,
                entry.context_window,
                entry.max_output_tokens,
                entry.kind,
            )
            for model_id, entry in models.items()
        }

    def __iter__(self) -> Iterator[ModelRoute]:
        return iter(self._models.values())

    def encodings(self) -> set[str]:
        """The offline vocabularies the catalogue's models are counted with."""
        return {tokenizer_for(m.provider, m.upstream_model).encoding_name for m in self}

    def resolve(self, requested: str) -> ModelRoute:
        found = self._models.get(requested)
        if found is None:
            provider, slash, name = requested.partition("/")
            candidate = self._models.get(name) if slash else None
            if candidate is not None and candidate.provider == provider:
                found = candidate
        if found is None:
            raise ModelNotFound(
                f"The model `{requested}` does not exist or you do not have access to it.",
                details=[{"field": "model", "message": "unknown model"}],
            )
        return found

    def resolve_for(self, requested: str, kind: str) -> ModelRoute:
        """`resolve`, and a 400 naming `model` when the model serves another kind of call (an
        embedding model asked to chat, or the reverse)."""
        found = self.resolve(requested)
        if found.kind != kind:
            message = (
                f"The model `{requested}` is an embedding model; it serves /v1/embeddings only."
                if found.kind == "embedding"
                else f"The model `{requested}` does not support embeddings."
            )
            raise InvalidInferenceRequest(message, details=[{"field": "model", "message": message}])
        return found
