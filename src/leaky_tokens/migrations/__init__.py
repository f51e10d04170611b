"""Alembic histories, one folder per table-owning service."""
