"""``rankopt dashboard``: optuna-dashboard behind a small read-only, Host-checked WSGI layer.

optuna-dashboard has no authentication and serves a write API (rename and delete studies,
notes, tell trials). Anything that can send an HTTP request to its port can use it,
including a web page in the user's own browser: directly (a cross-site ``POST`` needs no
CORS to have its effect) or through DNS rebinding (a foreign name resolving to
127.0.0.1). :func:`guard` therefore wraps the dashboard's WSGI app so that:

- only ``GET`` and ``HEAD`` reach it (``405`` otherwise) unless ``allow_writes``;
- the ``Host`` header must name the bound address (or a loopback form of it), which
  defeats DNS rebinding; with ``allow_writes`` an ``Origin`` header, which browsers send
  with every write, must name it too (no cross-site writes).

Written by hand: optuna-dashboard offers no read-only mode and bottle no Host check; a
WSGI middleware is the seam its docs point to (``optuna_dashboard.wsgi``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["guard", "allowed_hosts", "is_loopback", "dashboard_app", "READ_METHODS"]

READ_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _bracket(host: str) -> str:
    """A host as it appears in a Host header (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches only this machine."""
    bare = host.strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(bare, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values the dashboard answers: loopback forms, the bound host, and
    (bound to every interface) this machine's names and addresses; each with and without
    the port, lower-case."""
    names = set(LOOPBACK_NAMES)
    if host.strip("[]") in WILDCARDS:
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            names |= {_bracket(info[4][0].split("%")[0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    else:
        names.add(_bracket(host.strip("[]")))
    return frozenset(n.lower() for name in names for n in (name, f"{name}:{port}"))


def _refuse(start_response: Callable[..., Any], status: str, text: str,
            extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(extra or [])])
    return [body]


def guard(app: WSGIApp, *, host: str, port: int, allow_writes: bool = False) -> WSGIApp:
    """``app`` answering only requests whose Host is the bound address, and (unless
    ``allow_writes``) only GET and HEAD."""
    hosts = allowed_hosts(host, port)
    origins = frozenset(f"{scheme}://{h}" for h in hosts for scheme in ("http", "https"))

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = str(environ.get("HTTP_HOST", "")).strip().lower()
        if given not in hosts:
            return _refuse(start_response, "403 Forbidden",
                           f"rankopt dashboard: Host {given or '(none)'!r} is not the address it serves "
                           f"({host}:{port}); open http://127.0.0.1:{port}/ or the bound address")
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        if method not in READ_METHODS:
            if not allow_writes:
                return _refuse(start_response, "405 Method Not Allowed",
                               f"rankopt dashboard is read-only: {method} is refused; restart it with "
                               "--allow-writes to edit notes or studies", [("Allow", "GET, HEAD")])
            origin = str(environ.get("HTTP_ORIGIN", "")).strip().lower()
            if origin and origin not in origins:
                return _refuse(start_response, "403 Forbidden",
                               f"rankopt dashboard: a write from the page {origin!r} is refused "
                               "(only the dashboard's own pages may write)")
        return app(environ, start_response)

    return guarded


def dashboard_app(storage: Any, *, host: str, port: int, allow_writes: bool = False) -> WSGIApp:
    """optuna-dashboard's WSGI app on ``storage`` (a URL or an Optuna storage), guarded."""
    from optuna_dashboard import wsgi

    return guard(wsgi(storage), host=host, port=port, allow_writes=allow_writes)


def serve(app: WSGIApp, *, host: str, port: int) -> None:
    """Serve ``app`` until interrupted (bottle's wsgiref server, as optuna-dashboard's
    ``run_server`` does)."""
    from bottle import run

    run(app, host=host, port=port)
