"""The web app (README.md#web-app): ``/`` and ``/assets/<version>/<file>``, static files from ``agentspace/web``.

The page holds no secret and needs no token to load; it signs in with the gateway token (or a client key)
itself and sends it as ``Authorization: Bearer`` on every API call (the security middleware lets ``/`` and
``/assets/`` through). Asset URLs carry a version, a hash of every asset, so they are cached for a year
and a new release is fetched at once: ``index.html`` is never cached and names the current version. The
app's ES modules import each other by relative URL, so they all share the versioned folder.

The Content-Security-Policy allows nothing from outside the gateway: scripts, styles, images and
connections from our own origin only (images also as ``data:`` URLs: the previews of attached files), no
inline script, no frames.
"""

from __future__ import annotations

import hashlib
import mimetypes
from importlib.resources import files
from pathlib import Path

from aiohttp import web

WEB_DIR = Path(str(files("agentspace") / "web"))

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
COMMON_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}


class WebApp:
    """The files, read once at start-up, and their version."""

    def __init__(self, folder: Path = WEB_DIR) -> None:
        assets = folder / "assets"
        self.assets = {
            p.relative_to(assets).as_posix(): p.read_bytes() for p in sorted(assets.rglob("*")) if p.is_file()
        }
        digest = hashlib.sha256()
        for name, body in self.assets.items():
            digest.update(name.encode() + b"\0" + body + b"\0")
        self.version = digest.hexdigest()[:12]
        self.index = (
            (folder / "index.html")
            .read_text(encoding="utf-8")
            .replace("{{ASSETS}}", f"/assets/{self.version}")
            .encode()
        )

    async def index_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.index,
            content_type="text/html",
            charset="utf-8",
            headers={**COMMON_HEADERS, "Cache-Control": "no-cache"},
        )

    async def asset_handler(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = self.assets.get(name)
        if body is None or request.match_info["version"] != self.version:
            # An old page asking for an old version gets a 404, not a stale file under a new name.
            raise web.HTTPNotFound()
        content_type = TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers = {**COMMON_HEADERS, "Cache-Control": "public, max-age=31536000, immutable"}
        return web.Response(body=body, headers={**headers, "Content-Type": content_type})
