"""How the event pipeline is set up: which transport the settings pick, and the internal token
that processes sharing a data directory agree on without configuration."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from leaky_tokens.settings import Settings, SettingsError, load_settings
from leaky_tokens.shared.events import resolve_internal_token


def test_redis_streams_when_redis_is_configured_else_http_push() -> None:
    assert Settings(redis_url="").event_transport() == "http"
    assert Settings(redis_url="redis://127.0.0.1:6379/0").event_transport() == "redis"


def test_an_explicit_transport_wins() -> None:
    redis = "redis://127.0.0.1:6379/0"
    assert Settings(redis_url=redis, events={"transport": "http"}).event_transport() == "http"
    assert Settings(redis_url=redis, events={"transport": "redis"}).event_transport() == "redis"


def test_redis_streams_without_redis_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("LEAKY_REDIS_URL", raising=False)
    monkeypatch.setenv("LEAKY_EVENTS__TRANSPORT", "redis")
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings()


def test_a_configured_token_is_used_and_nothing_is_written(tmp_path: Path) -> None:
    assert resolve_internal_token("from-settings", tmp_path / "var") == "from-settings"
    assert not (tmp_path / "var").exists()


def test_a_generated_token_is_kept_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    first = resolve_internal_token("", data_dir)
    assert len(first) >= 40
    path = data_dir / "internal_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_internal_token("", data_dir) == first  # a restart, another process
    assert [p.name for p in data_dir.iterdir()] == ["internal_token"]  # no temp files left


def test_processes_starting_together_agree_on_one_token(tmp_path: Path) -> None:
    found: list[str] = []
    start = threading.Barrier(8)

    def resolve() -> None:
        start.wait()
        found.append(resolve_internal_token("", tmp_path))

    threads = [threading.Thread(target=resolve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 8
    assert len(set(found)) == 1


def test_an_emptied_token_file_is_an_error_not_an_open_door(tmp_path: Path) -> None:
    (tmp_path / "internal_token").write_text("\n")
    with pytest.raises(RuntimeError, match="internal_token"):
        resolve_internal_token("", tmp_path)
