"""Checks made before a Ray study starts, so that it fails at once in one line instead of
waiting for ever: the cluster address answers, and some node can hold one trial."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from rankopt.core.errors import ConfigError

__all__ = ["is_ray_client", "probe_address", "recorded_address", "probe_configured_address", "largest_node_problem", "PROBE_TIMEOUT_S", "DEFAULT_GCS_PORT"]

PROBE_TIMEOUT_S = 15.0  # the whole probe, DNS included: well within the 30 s users wait
CONNECT_TIMEOUT_S = 8.0
ANSWER_TIMEOUT_S = 4.0  # a GCS answers within milliseconds of the connection
DEFAULT_GCS_PORT = 6379
# HTTP/2's client preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5): the Ray GCS
# is a gRPC server and answers with its own SETTINGS frame. Hand-written because this Ray
# install ships no gRPC client, and ray.init itself retries a dead address for ever.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x4


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [ipv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not port:
        return host, DEFAULT_GCS_PORT
    if not port.isdigit():
        raise ConfigError(f"address: {address!r} is not host:port (the port {port!r} is not a "
                          "number); give e.g. 10.0.0.5:6379, or auto for the local cluster")
    return host, int(port)


def _answer(host: str, port: int) -> str | None:
    """None when a gRPC (HTTP/2) server answers at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(ANSWER_TIMEOUT_S)
            sock.sendall(_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    return "the connection was closed: something other than Ray listens there"
                head += chunk
    except socket.timeout:
        return "no answer"
    except OSError as exc:  # refused, unreachable, unknown host
        return exc.strerror or type(exc).__name__
    if head[3] != _SETTINGS:
        return "something other than Ray answered"
    return None


def recorded_address() -> tuple[str, str] | None:
    """``(address, file)`` of the cluster the last ``ray start`` on this machine recorded
    (``$RAY_TMPDIR/ray/ray_current_cluster``, ``/tmp/ray/...`` by default), which
    ``ray.init`` joins when no address is given; None when there is none."""
    import os
    import sys
    import tempfile

    # Ray's rule (ray._common.utils.get_default_system_temp_dir, private, so mirrored here)
    base = os.environ.get("RAY_TMPDIR")
    if base is None and sys.platform.startswith("linux"):
        base = os.environ.get("TMPDIR")
    if base is None:
        base = "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()
    path = os.path.join(base, "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            found = f.read().strip()
    except OSError:
        return None
    return (found, path) if found else None


def probe_address(address: str | None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`ConfigError` in one line unless a Ray cluster answers at ``address``
    within ``timeout`` seconds. ``local`` is left to ``ray.init``; with ``None`` or ``auto``
    the cluster a ``ray start`` recorded on this machine (which ``ray.init`` would join) is
    probed, since ``ray.init`` waits on a dead one for ever; with none recorded ``ray.init``
    starts a local instance. Ctrl-C interrupts it."""
    recorded = None
    if address is None or address.strip().lower() in ("", "auto"):
        recorded = recorded_address()
        if recorded is None:
            return
        address = recorded[0]
    elif address.strip().lower() == "local":
        return
    host, port = _host_port(address.strip())
    result: list[str | None] = []
    # a thread, so that a resolver that hangs is bounded too and Ctrl-C reaches the caller
    probe = threading.Thread(target=lambda: result.append(_answer(host, port)),
                             name="rankopt-ray-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    why = result[0] if result else f"no answer within {timeout:g} s"
    if why is not None and recorded is not None:
        raise ConfigError(
            f"address: none given, so Ray joins the cluster `ray start` recorded in {recorded[1]} "
            f"({address!r}), which does not answer ({why}); run `ray stop` (or delete that file) "
            "to start a local Ray, or set --address / RAY_ADDRESS to a live cluster")
    if why is not None:
        raise ConfigError(
            f"address: no Ray cluster at {address!r} ({why}); start one with `ray start "
            "--head` there, or fix --address / RAY_ADDRESS (host:port of the head node's GCS, "
            f"port {DEFAULT_GCS_PORT} by default)")


def probe_configured_address(address: str | None) -> None:
    """:func:`probe_address` for the study's ``address`` (``RAY_ADDRESS`` when unset),
    unless this process is already connected to Ray."""
    import os

    import ray

    if not ray.is_initialized():
        probe_address(address or os.environ.get("RAY_ADDRESS") or None)


def is_ray_client() -> bool:
    """True when this process drives Ray through a ``ray://`` client connection."""
    try:
        from ray.util.client import ray as client
    except ImportError:  # pragma: no cover - a Ray without the client
        return False
    return bool(client.is_connected())


def largest_node_problem(nodes: Iterable[Mapping[str, Any]], cpus: float, gpus: float) -> str | None:
    """Why no alive node of ``ray.nodes()`` can hold a trial of ``cpus`` and ``gpus`` (a
    trial runs on one node: the cluster's total does not count), or None."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if any(r.get("CPU", 0.0) >= cpus and r.get("GPU", 0.0) >= gpus for r in alive):
        return None
    total_gpus = sum(r.get("GPU", 0.0) for r in alive)
    total_cpus = sum(r.get("CPU", 0.0) for r in alive)
    most_gpus = max((r.get("GPU", 0.0) for r in alive), default=0.0)
    most_cpus = max((r.get("CPU", 0.0) for r in alive), default=0.0)
    where = f"on {len(alive)} node{'s' if len(alive) != 1 else ''}"
    if gpus > most_gpus:
        return (f"resources.gpus: {gpus:g} GPU(s) per trial requested, but the largest Ray node "
                f"has {most_gpus:g} (the Ray cluster has {total_gpus:g} {where}; a trial runs on "
                "one node); set resources.gpus: 0 or run on a GPU cluster (--address)")
    if cpus > most_cpus:
        return (f"resources.cpus: {cpus:g} CPU(s) per trial requested, but the largest Ray node "
                f"has {most_cpus:g} (the Ray cluster has {total_cpus:g} {where}; a trial runs on "
                f"one node); lower resources.cpus to at most {most_cpus:g}")
    best = max(alive, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)))
    return (f"resources: {cpus:g} CPU(s) and {gpus:g} GPU(s) per trial requested, but no Ray "
            f"node has both (the one with most GPUs has {best.get('GPU', 0.0):g} GPU(s) and "
            f"{best.get('CPU', 0.0):g} CPU(s)); lower resources.cpus or resources.gpus")
