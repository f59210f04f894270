"""Models come home with zero configuration: with no ``artifacts:``, a trial that ran on a
node other than the driver's sends its folder (``model.pt``, ``metrics.json``) to an
actor pinned to the driver's node, through Ray's object store; the actor writes it under
``RUN_DIR/trials/<n>/`` there. ``artifacts:`` stays for big models and for studies that
outlive the driver (the inbox lives only as long as the driver's Ray session).

The inbox is started, and answers, before the first trial: a driver that is not a node of
the cluster (a ``ray://`` client) is refused in one line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rankopt.core.errors import ConfigError

__all__ = ["ModelInbox", "start_inbox", "send_home", "INBOX_START_S"]

INBOX_START_S = 60.0  # the actor is up within seconds; an unschedulable one never is


class ModelInbox:
    """The actor on the driver's node that receives trial folders."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

    def ping(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def put(self, number: int, files: dict[str, bytes]) -> int:
        """Write trial ``number``'s files (the model first, the metrics last: a folder whose
        metrics name this run holds its model); returns the bytes written."""
        folder = self.run_dir / "trials" / str(number)
        folder.mkdir(parents=True, exist_ok=True)
        total = 0
        for name in sorted(files, key=lambda n: n == "metrics.json"):
            tmp = folder / f".{name}.inbox{os.getpid()}"
            tmp.write_bytes(files[name])
            tmp.replace(folder / name)
            total += len(files[name])
        return total


def start_inbox(run_dir: Path) -> tuple[Any, str]:
    """The inbox actor on this (the driver's) node, and that node's id; raises
    :class:`ConfigError` in one line when it cannot run there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rankopt.search.ray_checks import is_ray_client

    if is_ray_client():
        raise ConfigError(
            "artifacts: this driver is a Ray client (ray://), not a node of the cluster, so "
            "trials cannot send their models to it; set artifacts: to an fsspec URL (or "
            "shared folder) every node reaches, or run the driver on a node (address host:port)")
    node = str(ray.get_runtime_context().get_node_id())
    actor = ray.remote(num_cpus=0, max_concurrency=4)(ModelInbox).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(str(Path(run_dir).resolve()))
    try:
        answer = ray.get(actor.ping.remote(), timeout=INBOX_START_S)
    except Exception as exc:  # noqa: BLE001 - any failure: the models could not come home
        ray.kill(actor)
        raise ConfigError(
            f"artifacts: no models could come home: the receiving actor did not start on the "
            f"driver's node within {INBOX_START_S:g} s ({type(exc).__name__}); set artifacts: "
            "to an fsspec URL (or shared folder) every node reaches") from None
    assert answer == node
    return actor, node


def send_home(inbox: Any, driver_node: str, trial_dir: Path, number: int) -> dict[str, float]:
    """Send the trial folder to the driver's inbox when this worker runs on another node;
    returns ``{"transfer_bytes": ..., "transfer_seconds": ...}`` (empty on the driver's node)."""
    import ray

    from rankopt.search.artifact_store import TRIAL_FILES

    if str(ray.get_runtime_context().get_node_id()) == driver_node:
        return {}
    start = time.perf_counter()
    files = {name: (trial_dir / name).read_bytes() for name in TRIAL_FILES
             if (trial_dir / name).is_file()}
    sent = ray.get(inbox.put.remote(number, files))
    return {"transfer_bytes": float(sent), "transfer_seconds": time.perf_counter() - start}
