"""Which `Host` the dashboard answers: the defence against DNS rebinding.

A web page the user visits can make its own host name resolve to 127.0.0.1 and then talk to the
dashboard as if it were the same site: upload a file, tick "I trust this code", start an analysis.
The browser still sends the attacker's name in the `Host` header, so the server refuses every HTTP
request and WebSocket handshake whose host name is not one it was told to answer: localhost, the
loopback addresses, the address it is bound to (unless that is a wildcard such as 0.0.0.0) and the
names allowed with `quantlens dashboard --allow-host NAME` or QUANTLENS_ALLOWED_HOSTS.

`HostGuard` is a plain ASGI middleware; `dashboard/serve.py` installs it in front of Streamlit.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import Any

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")

_LOG = logging.getLogger("quantlens.dashboard")


def host_name(header: str | None) -> str | None:
    """The host name of a `Host` header (port and IPv6 brackets removed, lower case), or None when
    the header is missing or malformed."""
    if header is None:
        return None
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:8501
        end = value.find("]")
        if end < 0 or not re.fullmatch(r"(:\d+)?", value[end + 1:]):
            return None
        name = value[1:end]
        return name if _is_ip(name) else None
    if value.count(":") > 1:  # a bare IPv6 address (no port possible)
        return value if _is_ip(value) else None
    name, sep, port = value.partition(":")
    if sep and not port.isdigit():
        return None
    name = name.removesuffix(".")
    return name if name and (_NAME.match(name) or _is_ip(name)) else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_host_name(name: str) -> str:
    """A name given to --allow-host, normalised; ValueError (one line) for anything else."""
    cleaned = host_name(name)
    if cleaned is None or cleaned != name.strip().lower().removesuffix(".").strip("[]"):
        raise ValueError(f"--allow-host {name!r} is not a host name or IP address (no port, no wildcard); "
                         "give the name the browser's address bar shows, e.g. --allow-host myhost.lan")
    return cleaned


def allowed_hosts(address: str | None, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names to answer when bound to `address`: the loopback names, the address itself
    unless it is a wildcard, and `extra`."""
    names = set(LOCAL_NAMES)
    bound = (address or "").strip().strip("[]").lower()
    if bound not in WILDCARD_ADDRESSES:
        names.add(bound)
    names.update(check_host_name(name) for name in extra if name.strip())
    return frozenset(names)


def is_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    name = host_name(header)
    return name is not None and name in allowed


def _header(scope: dict[str, Any], key: bytes) -> str | None:
    for name, value in scope.get("headers") or ():
        if name.lower() == key:
            return value.decode("latin-1")
    return None


class HostGuard:
    """ASGI middleware: 403 for HTTP requests, a refused handshake (HTTP 403) for WebSockets, whose
    Host is not allowed. `allowed=None` reads the bound address from Streamlit's configuration and
    the extra names from QUANTLENS_ALLOWED_HOSTS at the first request."""

    def __init__(self, app: Any, allowed: Iterable[str] | None = None) -> None:
        self.app = app
        self._allowed = frozenset(allowed) if allowed is not None else None
        self._warned: set[str] = set()

    @property
    def allowed(self) -> frozenset[str]:
        if self._allowed is None:
            from streamlit import config

            from dashboard.settings import extra_allowed_hosts

            self._allowed = allowed_hosts(config.get_option("server.address"), extra_allowed_hosts())
        return self._allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"host")
        if is_allowed(header, self.allowed):
            await self.app(scope, receive, send)
            return
        self._warn(header)
        if scope["type"] == "websocket":
            message = await receive()
            if message.get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        body = (f"quantlens refuses Host {header!r}: not one of its allowed hosts. If you opened the "
                "dashboard under this name, restart it with --allow-host NAME.\n").encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _warn(self, header: str | None) -> None:
        key = header or ""
        if key not in self._warned and len(self._warned) < 100:
            self._warned.add(key)
            _LOG.warning("refused a request for Host %r (allowed: %s; add one with --allow-host NAME)",
                         header, ", ".join(sorted(self.allowed)))
