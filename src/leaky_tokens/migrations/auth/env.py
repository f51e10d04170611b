"""Alembic environment: delegates to the shared runner (connection given by the caller)."""

from alembic import context

from leaky_tokens.shared.migrations import run_env

run_env(context)
