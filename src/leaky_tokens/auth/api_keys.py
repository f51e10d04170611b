"""API key format and hashing: `leaky_<userId>_<48 hex>`, stored only as a SHA-256 digest."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid

_FORMAT = re.compile(
    r"^leaky_([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})_([0-9a-f]{48})$"
)


def new_raw_key(user_id: uuid.UUID) -> str:
    return f"leaky_{user_id}_{secrets.token_hex(24)}"


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def looks_like_key(raw_key: str) -> bool:
    return _FORMAT.match(raw_key) is not None


def display_prefix(raw_key: str) -> str:
    """What a listing may show to recognise a key: the last 8 hex digits."""
    return "…" + raw_key[-8:]
