"""What keeps the GUI's port safe to expose (see docs/security.md), kept apart from the tabs:

- `password_check`: the login callable Gradio calls with (username, password); every comparison
  is constant-time (hmac.compare_digest) and every user is compared, so timing says nothing.
- `LoginThrottle`: an ASGI middleware on Gradio's `POST /login`. After FREE_TRIES failed logins
  from one client address, that address must wait before it may try again, and the wait doubles
  with each further failure (BASE_DELAY_S, 2x, 4x ... up to MAX_DELAY_S). An attempt made while
  waiting is answered 429 with Retry-After and never reaches the password check, so a guess
  costs the wait whatever the answer. A successful login clears the address's record.
- `HostCheck`: an ASGI middleware that answers only requests whose Host header names an address
  this server may be reached at. A page on another site whose name resolves to 127.0.0.1 (DNS
  rebinding) would otherwise be same-origin with a loopback GUI that has no login.
- `LoginPageFilter`: Gradio's login page (what `/` serves before the login) embeds the app's API
  description, with every field's default value (folder paths among them); without a login the
  page goes out with that description emptied.
- `inside`: a path a browser sent (a dropdown value), accepted only inside the output folder.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FREE_TRIES = int(os.environ.get("LATHE_LOGIN_FREE_TRIES", "3"))
BASE_DELAY_S = float(os.environ.get("LATHE_LOGIN_DELAY_S", "2"))
MAX_DELAY_S = float(os.environ.get("LATHE_LOGIN_MAX_DELAY_S", "300"))
FORGET_AFTER_S = 3600.0  # an address with no failure for this long starts afresh
MAX_TRACKED = 10_000  # addresses remembered at most (the oldest are forgotten first)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def password_check(pairs: list[tuple[str, str]]) -> Callable[[str, str], bool]:
    """The login callable for `pairs` of (user, password): constant-time, all users compared."""
    known = [(u.encode("utf-8"), p.encode("utf-8")) for u, p in pairs]

    def check(username: str, password: str) -> bool:
        user, word = str(username).encode("utf-8"), str(password).encode("utf-8")
        ok = False
        for u, p in known:
            same_user = hmac.compare_digest(user, u)
            same_word = hmac.compare_digest(word, p)
            ok |= same_user and same_word
        return ok

    return check


@dataclass
class _Record:
    failures: int = 0
    wait_until: float = 0.0
    last: float = 0.0


class Throttle:
    """Failed logins per client address and the wait each address owes (thread-safe, pure)."""

    def __init__(self, free: int = FREE_TRIES, base: float = BASE_DELAY_S, cap: float = MAX_DELAY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.free, self.base, self.cap, self.clock = free, base, cap, clock
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def wait_left(self, client: str) -> float:
        """Seconds `client` must still wait before its next login attempt (0: it may try now)."""
        with self._lock:
            rec = self._records.get(client)
            return max(0.0, rec.wait_until - self.clock()) if rec else 0.0

    def delay_after(self, failures: int) -> float:
        """The wait owed after `failures` failed attempts in a row."""
        if failures < self.free:
            return 0.0
        return min(self.cap, self.base * 2 ** (failures - self.free))

    def failed(self, client: str) -> float:
        """Record a failed login; returns the wait now owed."""
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            rec = self._records.setdefault(client, _Record())
            rec.failures += 1
            rec.last = now
            rec.wait_until = now + self.delay_after(rec.failures)
            return rec.wait_until - now

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._records.pop(client, None)

    def _forget_old(self, now: float) -> None:
        stale = [c for c, r in self._records.items() if now - r.last > FORGET_AFTER_S and now >= r.wait_until]
        for c in stale:
            del self._records[c]
        while len(self._records) >= MAX_TRACKED:
            del self._records[min(self._records, key=lambda c: self._records[c].last)]


def is_login(scope: Scope) -> bool:
    return scope.get("type") == "http" and scope.get("method") == "POST" and \
        str(scope.get("path", "")).rstrip("/").endswith("/login")


class LoginThrottle:
    """ASGI middleware: slows password guessing on Gradio's login route (see the module docstring)."""

    throttle = Throttle()  # shared by every app in this process (one GUI per process)

    def __init__(self, app: ASGIApp, throttle: Throttle | None = None):
        self.app = app
        if throttle is not None:
            self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_login(scope):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_left(client)
        if wait > 0:
            await _too_many(send, wait)
            return
        seen: dict[str, int] = {}

        async def watch(message: Message) -> None:
            if message.get("type") == "http.response.start":
                seen["status"] = int(message.get("status", 0))
            await send(message)

        await self.app(scope, receive, watch)
        status = seen.get("status", 0)
        if status == 200:
            self.throttle.succeeded(client)
        elif status in (400, 401, 403):
            self.throttle.failed(client)


async def _too_many(send: Send, wait: float) -> None:
    retry = str(max(1, int(wait + 0.999)))
    await _refuse(send, 429, f"Too many failed logins: try again in {retry} s.", [(b"retry-after", retry.encode())])


async def _refuse(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def host_name(header: str) -> str:
    """The host part of a Host header, lower-cased, without the port ('[::1]:7860' -> '[::1]')."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class HostCheck:
    """ASGI middleware: 421 for a request whose Host is not in `allowed` (None: any host)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] | None = LOOPBACK_HOSTS):
        self.app = app
        self.allowed = None if allowed is None else {a.lower() for a in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed is not None and scope.get("type") in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                if scope["type"] == "http":
                    await _refuse(send, 421, f"this Lathe answers as {', '.join(sorted(self.allowed))} only "
                                             "(start it with --allow-host NAME to add a name)")
                return
        await self.app(scope, receive, send)


API_INFO_RE = re.compile(rb"window\.gradio_api_info\s*=\s*.*?;\s*</script>", re.S)


def logged_in(scope: Scope) -> bool:
    """True when the Gradio app needs no login or the request carries a valid login cookie."""
    app = scope.get("app")
    if getattr(app, "auth", None) is None:
        return True
    cookies = {}
    for name, value in scope.get("headers") or []:
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                cookies[k] = v
    cid = getattr(app, "cookie_id", "")
    token = cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")
    return bool(token) and token in getattr(app, "tokens", {})


class LoginPageFilter:
    """ASGI middleware: an HTML page served without a login loses its embedded API description."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") not in ("GET", "HEAD") or logged_in(scope):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def hold(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                if not _is_html(message):
                    await send(message)
                return
            if not _is_html(start):
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                body = API_INFO_RE.sub(b"window.gradio_api_info = {};</script>", b"".join(chunks))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hold)


def _is_html(start: Message) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in start.get("headers", []))


def inside(path: str | Path | None, root: Path) -> Path | None:
    """`path` when it lies inside `root` once resolved (symlinks followed and `..` applied), else None."""
    if not path or not isinstance(path, (str, Path)):
        return None
    try:
        Path(path).resolve().relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):
        return None
    return Path(path)
