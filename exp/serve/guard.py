"""The job service's HTTP trust boundary: which requests reach the routes, and which files a route may serve.

`Guard` checks every request before any route sees it: the Host header (a page on a rebound DNS name reaching a
service on 127.0.0.1), where a state-changing request comes from (another site's page: CSRF) and that its body is
JSON, the token (bearer header, `?token=`, or the session cookie `GET /?token=` sets), and the body's size.
`open_inside` opens a file below a folder only when it is a regular file with no symlink on the way.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
OPEN_PATH = "/api/health"  # the only path that needs no token
SESSION_MESSAGE = b"exp.serve session v1"  # the cookie is an HMAC of this under the token, never the token
DEFAULT_PORTS = {"http": "80", "https": "443"}


class Guard:
    """Plain ASGI middleware (cheaper per request than an http-middleware function): the Host header, the origin
    and content type of state-changing requests, the token on every path but /api/health (and the session cookie
    it sets), and bodies over `max_body_bytes` (by Content-Length, or counted when chunked) refused with 413."""

    def __init__(self, app, token: str | None, max_body_bytes: int, hosts: tuple[str, ...] = ()):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes
        self.hosts = {host_name(h) for h in (*LOOPBACK_HOSTS, *hosts)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if self.token and _is_login(request) and _authorized(request, self.token):
            return await _login(request, self.token)(scope, receive, send)
        declared = request.headers.get("content-length")
        too_big = JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"}, 413)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await too_big(scope, receive, send)
        if declared is not None or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read the body here, at most the limit, and hand it on whole
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # http.disconnect, when the client leaves
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        """The answer to a request that must not reach the routes, else None."""
        host = request.headers.get("host", "")
        if host_name(host) not in self.hosts:
            line = f"Host {host!r} is not a name this service answers to (python -m exp.serve --allowed-host NAME)"
            return JSONResponse({"detail": line}, 421)
        if request.method in STATE_CHANGING:
            line = cross_site(request)
            if line is not None:
                return JSONResponse({"detail": line}, 403)
            if _has_body(request) and _media_type(request) != "application/json":
                line = f"request body must be application/json, not {_media_type(request) or 'untyped'}"
                return JSONResponse({"detail": line}, 415)
        if self.token and request.scope["path"] != OPEN_PATH and not _authorized(request, self.token):
            headers = {"WWW-Authenticate": "Bearer"}
            return JSONResponse({"detail": "missing or wrong bearer token"}, 401, headers)
        return None


# --- requests ---------------------------------------------------------------------------------------------


def host_name(host: str) -> str:
    """The name in a Host header value (or an address): lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cross_site(request: Request) -> str | None:
    """Why a state-changing request comes from another site's page (CSRF), else None: an Origin other than this
    service's own, or a Sec-Fetch-Site other than same-origin (a page on another port of this host is same-site)."""
    origin = request.headers.get("origin")
    if origin is not None and _netloc(origin) != _host_netloc(request.headers.get("host", ""), origin):
        return f"cross-origin request from {origin[:100]!r} refused"
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"{fetch_site[:20]} request refused (Sec-Fetch-Site)"
    return None


def _netloc(origin: str) -> str | None:
    """host[:port] of an Origin, without the scheme's default port; None for `null` or a non-web scheme."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return None
    return parts.netloc.removesuffix(":" + DEFAULT_PORTS[parts.scheme])


def _host_netloc(host: str, origin: str) -> str:
    """The Host header as an Origin of the same scheme would write it (a default port left out)."""
    scheme = urlsplit(origin.strip().lower()).scheme
    return host.strip().lower().removesuffix(":" + DEFAULT_PORTS.get(scheme, "-"))


def _has_body(request: Request) -> bool:
    declared = request.headers.get("content-length")
    return (declared is not None and declared != "0") or "transfer-encoding" in request.headers


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# --- the token ----------------------------------------------------------------------------------------------


def session_value(token: str) -> str:
    """The session cookie's value: an HMAC under the token, so a cookie that leaks does not give the token away."""
    return hmac.new(token.encode(), SESSION_MESSAGE, hashlib.sha256).hexdigest()


def cookie_name(request: Request) -> str:
    """One cookie per port: browsers share cookies between the ports of a host, and two services may run there."""
    server = request.scope.get("server")
    return f"exp_session_{server[1]}" if server and server[1] else "exp_session"


def _authorized(request: Request, token: str) -> bool:
    """A bearer token in the Authorization header, `?token=` (scripts, the first visit), or the session cookie
    that visit set (the page, its scripts, the event stream and downloads)."""
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token")
    if given is not None:
        return hmac.compare_digest(given.encode(), token.encode())
    cookie = request.cookies.get(cookie_name(request), "")
    return hmac.compare_digest(cookie.encode(), session_value(token).encode())


def _is_login(request: Request) -> bool:
    return request.method in ("GET", "HEAD") and request.scope["path"] == "/" and "token" in request.query_params


def _login(request: Request, token: str) -> RedirectResponse:
    """`GET /?token=T`: the session cookie, and back to the page without the token in its address (nor in the
    history, nor in a Referer)."""
    rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    response = RedirectResponse("/" + (f"?{rest}" if rest else ""), 303)
    response.set_cookie(
        cookie_name(request),
        session_value(token),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.scope["scheme"] == "https",
    )
    return response


# --- files --------------------------------------------------------------------------------------------------


class Refused(Exception):
    """A file the service does not serve: a symlink on the way, not a regular file, or outside its folder."""


def open_inside(root: Path, relative: str | os.PathLike) -> BinaryIO:
    """`root/relative` opened for reading when it is a regular file and no part of `relative` is a symlink.

    Each folder is opened with O_NOFOLLOW from the one before it, and the file last, so nothing swapped in between
    a check and the open is followed. FileNotFoundError when a part is missing; Refused otherwise."""
    parts = PurePosixPath(relative).parts
    if not parts or parts[0] == "/" or ".." in parts:
        raise Refused(f"{str(relative)[:200]!r} is not a path inside its folder")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            info = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if not (stat.S_ISREG if last else stat.S_ISDIR)(info.st_mode):
                kind = "regular file" if last else "folder"
                raise Refused(f"{'/'.join(parts[: i + 1])} is a symlink or not a {kind}: not served")
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (0 if last else os.O_DIRECTORY)
            try:
                following = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a symlink since the check
                    raise Refused(f"{'/'.join(parts[: i + 1])} is a symlink: not served") from None
                raise
            os.close(fd)
            fd = following
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused(f"{'/'.join(parts)} is not a regular file: not served")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_inside(root: Path, relative: str | os.PathLike) -> bytes:
    """The bytes of `root/relative`, read through open_inside."""
    with open_inside(root, relative) as f:
        return f.read()


def relative_inside(root: Path, path: Path) -> Path:
    """`path` relative to `root`; Refused when it lies elsewhere."""
    try:
        return Path(path).relative_to(root)
    except ValueError:
        raise Refused(f"{Path(path).name} is outside its folder: not served") from None
