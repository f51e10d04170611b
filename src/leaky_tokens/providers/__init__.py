"""Provider stubs: one small FastAPI app per emulated AI provider (qwen, gemini, openai)."""

from leaky_tokens.providers.app import create_provider_app

__all__ = ["create_provider_app"]
