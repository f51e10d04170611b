"""`leaky-tokens`: up | serve SERVICE | migrate | admin …"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from leaky_tokens.settings import SERVICES, Settings, SettingsError, load_settings
from leaky_tokens.shared.logging import configure_logging

app = typer.Typer(
    help="Leaky Tokens: a token API gateway for AI providers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
admin = typer.Typer(help="Administrative tasks run against the databases directly.")
app.add_typer(admin, name="admin")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="LEAKY_CONFIG", help="TOML settings file"),
]
ReadyFile = Annotated[
    Path | None,
    typer.Option(help="Write {pid, ports} as JSON here once every service listens"),
]
TABLE_OWNERS = ("auth", "tokens", "analytics")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"leaky-tokens: {message}", err=True)
    raise typer.Exit(code)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except SettingsError as exc:
        _fail(str(exc))
        raise AssertionError from exc  # unreachable


def _run(coro: object) -> int:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return int(runner.run(coro))  # type: ignore[arg-type]
    except ImportError:
        return int(asyncio.run(coro))  # type: ignore[arg-type]


def _serve(settings: Settings, services: list[str], ready_file: Path | None) -> None:
    from leaky_tokens.runtime.server import StartupError, serve_services

    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        code = _run(serve_services(settings, services, ready_file=ready_file))
    except StartupError as exc:
        _fail(str(exc), 3)
        return
    raise typer.Exit(code)


@app.command()
def up(
    config: ConfigOption = None,
    skip: Annotated[str, typer.Option(help="Comma-separated services not to start")] = "",
    ready_file: ReadyFile = None,
) -> None:
    """Start every service in one process, each on its own port."""
    settings = _settings(config)
    skipped = {s.strip() for s in skip.split(",") if s.strip()}
    unknown = skipped - set(SERVICES)
    if unknown:
        _fail(
            f"unknown service(s) in --skip: {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(SERVICES)}"
        )
    _serve(settings, [s for s in SERVICES if s not in skipped], ready_file)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}")],
    port: Annotated[int | None, typer.Option(min=0, max=65535)] = None,
    config: ConfigOption = None,
    ready_file: ReadyFile = None,
) -> None:
    """Run one service in this process."""
    if service not in SERVICES:
        _fail(f"unknown service {service!r}; choose from {', '.join(SERVICES)}")
    settings = _settings(config)
    if port is not None:
        settings = settings.with_ports({service: port})
    _serve(settings, [service], ready_file)


@app.command()
def migrate(
    services: Annotated[list[str] | None, typer.Argument(help="Default: all")] = None,
    config: ConfigOption = None,
) -> None:
    """Bring each service's database to the newest schema."""
    from leaky_tokens.shared.migrations import head_revision, upgrade_database

    settings = _settings(config)
    chosen = services or list(TABLE_OWNERS)
    for name in chosen:
        if name not in TABLE_OWNERS:
            _fail(f"{name!r} owns no tables; choose from {', '.join(TABLE_OWNERS)}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def run() -> int:
        for name in chosen:
            if head_revision(name) is None:
                continue
            await upgrade_database(settings.database_url(name), name)
            typer.echo(f"{name}: at {head_revision(name)}")
        return 0

    raise typer.Exit(_run(run()))


@admin.command("create-user")
def create_user(
    username: Annotated[str, typer.Option(prompt=True)],
    email: Annotated[str, typer.Option(prompt=True)],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
    make_admin: Annotated[bool, typer.Option("--admin", help="Grant the ADMIN role")] = False,
    config: ConfigOption = None,
) -> None:
    """Create a user (the first ADMIN comes from here or from LEAKY_ADMIN_USERNAME/PASSWORD)."""
    from leaky_tokens.auth.errors import EmailTaken, UsernameTaken, WeakPassword

    settings = _settings(config)

    async def run() -> int:
        body = {"username": username, "email": email, "password": password, "admin": make_admin}
        through_service = await _via_running_service(
            settings, "/internal/users", body, service="auth", method="POST"
        )
        if through_service is not None:
            status, answer = through_service
            if status != 201:
                typer.echo(f"leaky-tokens: {answer.get('message', status)}", err=True)
                return 1
            roles = ",".join(answer["roles"])
            typer.echo(f"created user {answer['username']} ({answer['id']}) roles={roles}")
            return 0
        async with _auth_service(settings) as service:
            try:
                user = await service.create_user(username, email, password, admin=make_admin)
            except (UsernameTaken, EmailTaken, WeakPassword) as exc:
                typer.echo(f"leaky-tokens: {exc.message}", err=True)
                return 1
            typer.echo(f"created user {user.username} ({user.id}) roles={','.join(user.roles)}")
        return 0

    raise typer.Exit(_run(run()))


@admin.command("rotate-signing-key")
def rotate_signing_key(config: ConfigOption = None) -> None:
    """Make a new JWT signing key current; the previous one still verifies."""
    settings = _settings(config)

    async def run() -> int:
        through_service = await _via_running_service(
            settings, "/internal/signing-keys/rotate", {}, service="auth", method="POST"
        )
        if through_service is not None:
            status, answer = through_service
            if status != 200:
                typer.echo(f"leaky-tokens: {answer.get('message', status)}", err=True)
                return 1
            typer.echo(
                f"new signing key {answer['kid']}; running auth services pick it up within "
                f"{settings.auth.signing_key_refresh_seconds:g}s"
            )
            return 0
        async with _auth_service(settings) as service:
            kid = await service.rotate_signing_key()
            typer.echo(
                f"new signing key {kid}; running auth services pick it up within "
                f"{settings.auth.signing_key_refresh_seconds:g}s"
            )
        return 0

    raise typer.Exit(_run(run()))


@admin.command("set-quota")
def set_quota(
    provider: Annotated[str, typer.Option(help="openai, qwen or gemini")],
    total: Annotated[int, typer.Option(min=0, help="totalTokens of the pool")],
    user_id: Annotated[str | None, typer.Option("--user-id", help="A user's pool")] = None,
    org_id: Annotated[str | None, typer.Option("--org-id", help="An organisation's pool")] = None,
    remaining: Annotated[
        int | None, typer.Option(min=0, help="remainingTokens (default: total)")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create or replace a quota pool (what the plan does with SQL inserts)."""
    import uuid

    from leaky_tokens.shared.errors import AppError

    if (user_id is None) == (org_id is None):
        _fail("give exactly one of --user-id or --org-id")
    try:
        owner = uuid.UUID(user_id or org_id or "")
    except ValueError:
        _fail("--user-id/--org-id must be a UUID")
        return
    settings = _settings(config)

    async def run() -> int:
        from leaky_tokens.shared.clock import SystemClock
        from leaky_tokens.shared.database import Database
        from leaky_tokens.shared.migrations import upgrade_database
        from leaky_tokens.tokens.service import TokenService

        owner_field = "userId" if user_id else "orgId"
        body = {owner_field: str(owner), "provider": provider, "totalTokens": total}
        if remaining is not None:
            body["remainingTokens"] = remaining
        through_service = await _via_running_service(
            settings, "/internal/quota" + ("" if user_id else "/org"), body
        )
        if through_service is not None:
            status, answer = through_service
            if status != 200:
                typer.echo(f"leaky-tokens: {answer.get('message', status)}", err=True)
                return 1
            typer.echo(
                f"{'user' if user_id else 'org'} {answer[owner_field]} {answer['provider']}: "
                f"total={answer['totalTokens']} remaining={answer['remainingTokens']} "
                f"resets {answer['resetAt']} (through the running token service)"
            )
            return 0

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.database_url("tokens")
        await upgrade_database(url, "tokens")
        database = Database(url)
        try:
            # Only the quota methods are used: no bucket store or provider client is needed.
            service = TokenService(database, settings.tokens, SystemClock(), None, None)  # type: ignore[arg-type]
            view = await service.put_quota(
                "user" if user_id else "org",
                owner,
                provider,
                total=total,
                remaining=remaining,
                reset_at=None,
            )
        except AppError as exc:
            typer.echo(f"leaky-tokens: {exc.message}", err=True)
            return 1
        finally:
            await database.dispose()
        typer.echo(
            f"{view.kind} {view.owner_id} {view.provider}: total={view.total_tokens} "
            f"remaining={view.remaining_tokens} resets {view.reset_at.isoformat()}"
        )
        return 0

    raise typer.Exit(_run(run()))


async def _via_running_service(
    settings: Settings,
    path: str,
    body: dict[str, object],
    *,
    service: str = "tokens",
    method: str = "PUT",
) -> tuple[int, dict[str, Any]] | None:
    """Send `body` to the running `service`'s internal admin API (/internal, internal token):
    (status, answer), or None when no such service answers (then the caller writes the
    database itself). Going through the service keeps its process the only writer of its
    SQLite file while it runs."""
    import orjson

    from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER, resolve_internal_token
    from leaky_tokens.shared.outbound import OutboundError, client_session, fetch

    token = resolve_internal_token(settings.internal_token, settings.data_dir)
    session = client_session(max_connections=1, connect_seconds=1.0)
    try:
        answer = await fetch(
            session,
            method,
            settings.url_of(service) + path,
            timeout_seconds=30.0,
            headers={INTERNAL_TOKEN_HEADER: token},
            json_body=body,
        )
    except OutboundError as exc:
        if exc.kind == "connect":
            return None
        _fail(f"the running {service} service did not answer ({exc.reason})", code=1)
        raise  # (not reached)
    finally:
        await session.close()
    parsed = orjson.loads(answer.body) if answer.body else {}
    if answer.status == 404:
        return None  # something else listens there (an older service): use the file
    return answer.status, parsed if isinstance(parsed, dict) else {}


def _auth_service(settings: Settings):  # type: ignore[no-untyped-def]
    import contextlib

    from leaky_tokens.auth.service import AuthService
    from leaky_tokens.shared.clock import SystemClock
    from leaky_tokens.shared.database import Database
    from leaky_tokens.shared.migrations import upgrade_database
    from leaky_tokens.shared.rate_limit import MemoryFixedWindowLimiter

    @contextlib.asynccontextmanager
    async def scope():  # type: ignore[no-untyped-def]
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.database_url("auth")
        await upgrade_database(url, "auth")
        database = Database(url)
        try:
            yield AuthService(database, settings.auth, SystemClock(), MemoryFixedWindowLimiter())
        finally:
            await database.dispose()

    return scope()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
