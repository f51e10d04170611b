"""Password hashing with Argon2id, off the event loop, and the policy new passwords meet."""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError


class Passwords:
    def __init__(self, time_cost: int, memory_kib: int, parallelism: int) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism
        )
        # Verifying against this for unknown users keeps their timing like a wrong password.
        self._dummy_hash = self._hasher.hash("leaky-tokens-dummy-password")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        return await asyncio.to_thread(self._verify, password_hash, password)

    def _verify(self, password_hash: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash or self._dummy_hash, password) and (
                password_hash is not None
            )
        except (VerificationError, InvalidHashError):
            return False


COMMON_PASSWORDS = Path(__file__).parent / "data" / "common-passwords.txt.gz"


@functools.cache
def _commonest(count: int) -> frozenset[str]:
    if count <= 0:
        return frozenset()
    with gzip.open(COMMON_PASSWORDS, "rt", encoding="utf-8") as lines:
        return frozenset(line.strip() for line in itertools.islice(lines, count))


class PasswordPolicy:
    """What a new password must be: long enough, not one of the `refuse_commonest` commonest
    passwords of the shipped list (data/NOTICE.md), and not the account's own name or email."""

    def __init__(self, min_length: int, refuse_commonest: int) -> None:
        self.min_length = min_length
        self._common = _commonest(refuse_commonest)

    def problem(self, password: str, *, username: str = "", email: str = "") -> str | None:
        """Why `password` is refused, or None."""
        if len(password) < self.min_length:
            return f"password must be at least {self.min_length} characters"
        lowered = password.lower()
        if lowered in self._common:
            return "password is one of the most common passwords; choose another"
        if lowered in {username.lower(), email.lower(), email.partition("@")[0].lower()}:
            return "password must not be the username or email"
        return None
