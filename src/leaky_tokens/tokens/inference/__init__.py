"""The OpenAI-compatible /v1 API of the token service: catalogue, provider adapters, metering."""
