"""A two-node Ray cluster on one machine, the second node unable to see the driver's files.

Everything runs inside a private network and PID namespace (``unshare -n -p -f
--mount-proc``, loopback up): Ray binds to the machine's own address even when told
127.0.0.1, and ``ray stop`` stops every Ray process it can see, so nothing may leak out
of (or into) the namespace. The head node has no CPUs (no trial runs there); the second
node has its own mount namespace with an empty tmpfs over the driver's machine folder,
which is what a second machine without a shared file system looks like.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
PORT = 6390

CLUSTER = """\
set -u
ip link set lo up
# RAY_TMPDIR: `ray start` records its address in $RAY_TMPDIR/ray/ray_current_cluster, and
# every ray.init without an address on this machine (another test, outside this network
# namespace) would join it and wait for ever; the folder is short (Ray's socket paths)
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 RAY_TMPDIR={ray_tmp}
ray start --head --num-cpus={head_cpus} --port={port} --include-dashboard=false \\
    --disable-usage-stats > {logs}/head.log 2>&1 || {{ cat {logs}/head.log; exit 90; }}
unshare -m bash -c 'mount -t tmpfs tmpfs {hide} && exec ray start --address=127.0.0.1:{port} \\
    --num-cpus={cpus} --block' > {logs}/node2.log 2>&1 &
for i in $(seq 120); do
  n=$({python} -c "import ray; ray.init(address='127.0.0.1:{port}', log_to_driver=False); \\
print(sum(x['Alive'] for x in ray.nodes()))" 2>/dev/null || echo 0)
  [ "$n" = 2 ] && break
  sleep 0.5
done
[ "$n" = 2 ] || {{ echo "the second node did not join"; cat {logs}/node2.log; exit 91; }}
export RAY_ADDRESS=127.0.0.1:{port}
bash {script}
rc=$?
ray stop --force > /dev/null 2>&1
exit $rc
"""


def namespaces_work() -> str | None:
    """None when private network/PID/mount namespaces can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) is not installed"
    probe = subprocess.run(
        ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c",
         "ip link set lo up && unshare -m sh -c 'mount -t tmpfs tmpfs /mnt'"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot make private namespaces here (needs root): {probe.stderr.strip()[:200]}"
    return None


def require_namespaces() -> None:
    why = namespaces_work()
    if why is not None:
        pytest.skip(why)


def run_in_cluster(
    script: str, *, tmp: Path, hide: Path, cpus: int = 2, timeout: float = 420,
    head_cpus: int = 0,
) -> subprocess.CompletedProcess[str]:
    """Run the bash ``script`` on a fresh two-node cluster (``RAY_ADDRESS`` set); the
    second node sees an empty folder at ``hide``; ``head_cpus``: the head node's CPUs (none
    by default: no trial runs beside the driver). Returns the finished process."""
    logs = tmp / "cluster-logs"
    logs.mkdir(parents=True, exist_ok=True)
    hide.mkdir(parents=True, exist_ok=True)
    inner = tmp / "inner.sh"
    inner.write_text(script)
    outer = tmp / "cluster.sh"
    ray_tmp = tempfile.mkdtemp(prefix="rankopt-ray-")
    outer.write_text(CLUSTER.format(port=PORT, logs=logs, hide=hide, cpus=cpus, head_cpus=head_cpus,
                                    python=sys.executable, script=inner, ray_tmp=ray_tmp))
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        return subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "bash", str(outer)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
