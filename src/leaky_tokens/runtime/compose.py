"""Builds each service's application from settings (the composition root)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from leaky_tokens.settings import SERVICES, Settings
from leaky_tokens.shared.app import exposure_of
from leaky_tokens.shared.authn import RemoteAuthenticator
from leaky_tokens.shared.events import resolve_internal_token


def remote_authenticator(settings: Settings) -> RemoteAuthenticator:
    client = settings.auth_client
    return RemoteAuthenticator(
        settings.url_of("auth"),
        issuer=settings.auth.jwt_issuer,
        api_key_cache_seconds=client.api_key_cache_seconds,
        jwks_min_refresh_seconds=client.jwks_min_refresh_seconds,
        timeout_seconds=client.timeout_seconds,
        # A revoked key stops working at once, whatever the cache time (ARCHITECTURE.md,
        # "Revocation is an event").
        revocation_poll_seconds=client.revocation_poll_seconds,
        feed_grace_seconds=client.feed_grace_seconds,
        redis_url=settings.redis_url,
        internal_token=resolve_internal_token(settings.internal_token, settings.data_dir),
    )


def _auth(settings: Settings) -> FastAPI:
    from leaky_tokens.auth.app import create_auth_app

    return create_auth_app(settings)


def _tokens(settings: Settings) -> FastAPI:
    from leaky_tokens.tokens.app import create_tokens_app

    return create_tokens_app(settings, authenticator=remote_authenticator(settings))


def _analytics(settings: Settings) -> FastAPI:
    from leaky_tokens.analytics.app import create_analytics_app

    return create_analytics_app(settings, authenticator=remote_authenticator(settings))


def _gateway(settings: Settings) -> FastAPI:
    from leaky_tokens.gateway.app import create_gateway_app

    return create_gateway_app(settings, authenticator=remote_authenticator(settings))


def _provider(name: str) -> Callable[[Settings], FastAPI]:
    def build(settings: Settings) -> FastAPI:
        from leaky_tokens.providers import create_provider_app
        from leaky_tokens.shared.events import resolve_internal_token

        return create_provider_app(
            name,  # type: ignore[arg-type]
            internal_token=resolve_internal_token(settings.internal_token, settings.data_dir),
            settings=settings.stubs,
            log_access=settings.access_log,
            exposure=exposure_of(settings),
        )

    return build


FACTORIES: dict[str, Callable[[Settings], FastAPI]] = {
    "gateway": _gateway,
    "auth": _auth,
    "tokens": _tokens,
    "analytics": _analytics,
    "qwen": _provider("qwen"),
    "gemini": _provider("gemini"),
    "openai": _provider("openai"),
}
assert set(FACTORIES) == set(SERVICES)


def build_app(service: str, settings: Settings) -> FastAPI:
    return FACTORIES[service](settings)
