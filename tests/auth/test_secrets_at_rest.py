"""Secrets at rest (issue 10: "auth.db and its WAL are mode 0644 in a 0755 data directory and hold
the RSA signing key as plain PEM"): the data directory is 0700, every database file (WAL and SHM
too) and the internal token 0600, and with a passphrase the signing keys are stored encrypted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import select

from leaky_tokens.auth.jwt_tokens import SigningKeyLocked
from leaky_tokens.auth.models import SigningKey
from tests.auth.auth_harness import AuthClient, fresh_database, running_auth

pytestmark = pytest.mark.asyncio(loop_scope="module")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def stored_pems(auth: AuthClient) -> list[str]:
    async with auth.service.db.read() as session:
        return list((await session.execute(select(SigningKey.private_pem))).scalars())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_data_directory_and_every_file_in_it_are_private(
    backend: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # as an older version (or a careless operator) left it
    async with (
        fresh_database(backend, data_dir) as url,
        running_auth(url, data_dir) as auth,
    ):
        await auth.register()  # a write: SQLite's WAL and SHM exist from here on
        files = sorted(p.name for p in data_dir.iterdir())
        modes = {name: mode(data_dir / name) for name in files}

    assert mode(data_dir) == 0o700
    assert "internal_token" in modes
    if backend == "sqlite":
        assert any(name.endswith(".db-wal") for name in files), files
        assert any(name.endswith(".db-shm") for name in files), files
    assert modes == dict.fromkeys(files, 0o600)


async def test_files_an_older_version_left_readable_are_narrowed(tmp_path: Path) -> None:
    database = tmp_path / "auth.db"
    async with running_auth(f"sqlite+aiosqlite:///{database}", tmp_path) as auth:
        await auth.register()
    for path in (database, tmp_path / "internal_token"):
        os.chmod(path, 0o644)

    async with running_auth(f"sqlite+aiosqlite:///{database}", tmp_path) as auth:
        await auth.register()
        wal = Path(f"{database}-wal")
        assert (mode(database), mode(wal), mode(tmp_path / "internal_token")) == (0o600,) * 3


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_with_a_passphrase_the_signing_keys_are_stored_encrypted(
    backend: str, tmp_path: Path
) -> None:
    secret_file = tmp_path / "signing.passphrase"
    secret_file.write_text("from-a-file-0123456789\n")
    async with fresh_database(backend, tmp_path) as url:
        async with running_auth(url, tmp_path) as plain:  # keys made before any passphrase
            account = await plain.register()
            assert all("BEGIN PRIVATE KEY" in pem for pem in await stored_pems(plain))

        async with running_auth(url, tmp_path, signing_key_passphrase_file=secret_file) as auth:
            pems = await stored_pems(auth)
            assert pems
            assert all(pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----") for pem in pems)
            assert (await auth.me(account.headers)).status_code == 200  # the same key still
            fresh = await auth.register()  # signs, now decrypted from the database

        with pytest.raises(SigningKeyLocked, match="PASSPHRASE"):
            async with running_auth(url, tmp_path):
                pass
        with pytest.raises(SigningKeyLocked, match="does not open"):
            async with running_auth(url, tmp_path, signing_key_passphrase="wrong"):
                pass

        async with running_auth(
            url, tmp_path, signing_key_passphrase="from-a-file-0123456789"
        ) as again:  # the environment's passphrase is the same secret as the file's
            assert (await again.me(fresh.headers)).status_code == 200
