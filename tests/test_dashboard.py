"""``rankopt dashboard`` in a real browser: headless Chromium loads optuna-dashboard's pages
for a small digits run, waits for the study to render, and checks what a user sees.

CI installs Debian's chromium (.ci/run); without a chromium binary the test skips.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from rankopt.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def browse(url: str, *extra: str, attempts: int = 2) -> str:
    """Chromium's output for ``url`` after its scripts ran (``--virtual-time-budget`` waits
    for the page's fetches and rendering). Each call has its own profile, so no other
    Chromium's profile lock can stall it; a run that hangs is killed with its children
    and tried again once."""
    import tempfile

    assert CHROMIUM is not None
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.Popen(
                [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                 "--window-size=1400,1000", *extra, url],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
            )
            try:
                out, _ = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                if attempt + 1 == attempts:
                    raise
                continue
            assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
            return out
    raise AssertionError("unreachable")  # the loop returns or raises


def visible_text(html: str) -> str:
    html = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    pytest.importorskip("optuna_dashboard")
    base = tmp_path_factory.mktemp("dash")
    study = base / "dash.yaml"
    study.write_text(yaml.safe_dump({
        "name": "dash", "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"}, "reference": {"epochs": 1, "lr": 0.05},
        "decomposers": ["tucker2", "svd"], "selectors": {"fixed": {}},
        "strategies": {"finetune": {"epochs": 0}}, "sampler": {"name": "random", "seed": 0},
        "trials": 5,
    }))
    run_dir = base / "run"
    assert main(["run", str(study), "--run-dir", str(run_dir), "--quiet"]) == 0
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rankopt", "dashboard", str(run_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/studies", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"the dashboard did not start: {out}")
                time.sleep(0.5)
        yield url, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_browser_shows_trials_with_their_attributes(dashboard: tuple[str, Path]) -> None:
    url, _ = dashboard
    text = visible_text(browse(f"{url}/dashboard/studies/1/trials", "--dump-dom"))
    assert "5 Trials" in text
    assert len(re.findall(r"Trial \d+ Complete", text)) >= 5
    # rankopt's per-trial user attributes reach the page
    for attr in ("ranks_summary", "params_compression", "strategy", "selector_params"):
        assert attr in text, attr
    study = visible_text(browse(f"{url}/dashboard/studies/1", "--dump-dom"))
    assert "Pareto Front" in study and "accuracy" in study  # objectives carry their names


def test_screenshot_is_not_blank(dashboard: tuple[str, Path]) -> None:
    from PIL import Image, ImageStat

    url, base = dashboard
    shot = base / "shot.png"
    browse(f"{url}/dashboard/studies/1", f"--screenshot={shot}")
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 1000)
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 20  # a white page has 0
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 50  # text and plots, not a spinner
