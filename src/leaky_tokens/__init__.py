"""Leaky Tokens: a token API gateway for AI providers."""

__version__ = "0.1.0"
