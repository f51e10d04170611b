"""The CLI fails fast with a clear message on a busy port or a bad setting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from leaky_tokens.shared.migrations import head_revision
from tests.live_server import closed_port


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leaky_tokens.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAKY_") and k != "REDIS_URL"}
    env["LEAKY_DATA_DIR"] = str(tmp_path / "var")
    return env


def test_a_busy_port_fails_fast_naming_the_service_and_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = clean_env(tmp_path) | {"LEAKY_PORTS__AUTH": str(port)}
        result = run_cli("serve", "auth", env=env)
    assert result.returncode == 3
    assert f"port {port} for auth is already in use" in result.stderr


def test_a_bad_setting_fails_fast_naming_it(tmp_path: Path) -> None:
    env = clean_env(tmp_path) | {"LEAKY_PORTS__GATEWAY": "not-a-port"}
    result = run_cli("up", env=env)
    assert result.returncode == 2
    assert "ports.gateway" in result.stderr


def test_settings_come_from_a_toml_file_and_env_wins(tmp_path: Path) -> None:
    config = tmp_path / "leaky.toml"
    config.write_text('[ports]\ngateway = "nope"\n')
    result = run_cli("up", "--config", str(config), env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "ports.gateway" in result.stderr
    env = clean_env(tmp_path) | {"LEAKY_PORTS__GATEWAY": "0"}
    missing = run_cli("up", "--config", str(tmp_path / "absent.toml"), env=env)
    assert missing.returncode == 2
    assert "config file not found" in missing.stderr


def test_unknown_service_is_refused(tmp_path: Path) -> None:
    result = run_cli("up", "--skip", "tokens,bogus", env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "bogus" in result.stderr


def test_admin_commands_create_a_user_and_a_quota(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    env["LEAKY_URLS__TOKENS"] = f"http://127.0.0.1:{closed_port()}"  # no token service running
    created = run_cli(
        "admin",
        "create-user",
        "--username",
        "root_admin",
        "--email",
        "root@example.com",
        "--password",
        "password123",
        "--admin",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    assert "roles=USER,ADMIN" in created.stdout
    again = run_cli(
        "admin",
        "create-user",
        "--username",
        "ROOT_ADMIN",
        "--email",
        "other@example.com",
        "--password",
        "password123",
        env=env,
    )
    assert again.returncode == 1
    assert "username already exists" in again.stderr
    quota = run_cli(
        "admin",
        "set-quota",
        "--provider",
        "openai",
        "--total",
        "1000",
        "--user-id",
        "550e8400-e29b-41d4-a716-446655440000",
        env=env,
    )
    assert quota.returncode == 0, quota.stderr
    assert "total=1000 remaining=1000" in quota.stdout
    assert "through the running token service" not in quota.stdout
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0
    assert f"auth: at {head_revision('auth')}" in migrated.stdout


async def test_set_quota_goes_through_the_running_token_service(tmp_path: Path) -> None:
    """Issue 9, defect 3: the CLI wrote the service's SQLite file behind its back (and froze
    every service of that process for seconds). With the service up, it asks the service."""
    import asyncio
    import uuid

    from leaky_tokens.settings import Settings
    from leaky_tokens.shared.principal import Principal
    from leaky_tokens.tokens.app import create_tokens_app
    from leaky_tokens.tokens.service import USER_POOL
    from tests.gateway.gateway_harness import FakeAuthenticator
    from tests.live_server import serving

    data_dir = tmp_path / "var"
    settings = Settings(access_log=False, data_dir=data_dir)
    app = create_tokens_app(settings, authenticator=FakeAuthenticator())
    user = uuid.uuid4()
    async with serving(app, lifespan=True) as url:
        env = clean_env(tmp_path)
        env["LEAKY_URLS__TOKENS"] = url
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "leaky_tokens.cli",
            "admin",
            "set-quota",
            "--provider",
            "openai",
            "--total",
            "500",
            "--remaining",
            "200",
            "--user-id",
            str(user),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        admin = Principal(user_id=uuid.uuid4(), roles=frozenset({"USER", "ADMIN"}))
        view = await app.state.token_service.get_quota(admin, USER_POOL, user, "openai")

    assert process.returncode == 0, err.decode()
    assert "through the running token service" in out.decode()
    assert "total=500 remaining=200" in out.decode()
    assert (view.total_tokens, view.remaining_tokens) == (500, 200)
