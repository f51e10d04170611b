"""The web dashboard's files, served by the gateway itself at /dashboard (never proxied).

The dashboard is static: HTML, CSS and ES modules shipped inside the package (with a pinned,
vendored charting library), loaded once at start-up. It holds no credentials of its own and
reaches no endpoint the public API does not offer: the browser signs in with
`POST /api/v1/auth/login` and calls the public APIs through this same gateway with the user's
bearer token, so every answer is scoped exactly as the APIs scope it.

A strict Content-Security-Policy keeps it that way: scripts and styles only from this origin
(no inline scripts or style attributes), requests only to this origin, no framing.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from leaky_tokens.shared.http import error_response

PREFIX = "/dashboard"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}
_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str


def default_directory() -> Path:
    return Path(str(resources.files("leaky_tokens.gateway") / "static" / "dashboard"))


def load_files(directory: Path) -> dict[str, StaticFile]:
    """Every servable file under `directory`, by its path relative to it ("vendor/x.js").
    Only files of known types are served; a request can name nothing else."""
    files: dict[str, StaticFile] = {}
    for path in sorted(directory.rglob("*")):
        content_type = _TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            files[path.relative_to(directory).as_posix()] = StaticFile(
                path.read_bytes(), content_type
            )
    return files


class DashboardFiles:
    """ASGI middleware answering GET/HEAD /dashboard/**; every other path goes on to `app`."""

    def __init__(self, app: ASGIApp, *, directory: Path | None = None) -> None:
        self.app = app
        self.files = load_files(directory or default_directory())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            response = error_response(
                405, "METHOD_NOT_ALLOWED", "method not allowed", headers={"Allow": "GET, HEAD"}
            )
            await response(scope, receive, send)
            return
        if path == PREFIX:  # relative URLs in the page resolve against /dashboard/
            await _redirect(send, PREFIX + "/")
            return
        name = path[len(PREFIX) + 1 :] or "index.html"
        found = self.files.get(name)
        if found is None:
            await error_response(404, "NOT_FOUND", "no such resource")(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", found.content_type.encode()),
                    (b"content-length", str(len(found.body)).encode()),
                    *_HEADERS,
                ],
            }
        )
        body = b"" if scope["method"] == "HEAD" else found.body
        await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 308,
            "headers": [(b"location", location.encode()), (b"content-length", b"0"), *_HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": b""})
