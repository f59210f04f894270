"""Issue 26, item 3: ``rankopt dashboard`` is read-only by default and answers only its own
Host. Requests go over a real socket to optuna-dashboard's app behind rankopt's layer;
the storage is then read back to show that nothing reached it."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest

pytest.importorskip("optuna_dashboard")

from rankopt.cli import main  # noqa: E402
from rankopt.results.dashboard import allowed_hosts, dashboard_app, is_loopback  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="mine", directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    return url


def _serve(storage_url: str, allow_writes: bool) -> Iterator[int]:
    server = make_server("127.0.0.1", 0, lambda e, s: app(e, s), handler_class=Quiet)
    port = server.server_port
    app = dashboard_app(storage_url, host="127.0.0.1", port=port, allow_writes=allow_writes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def read_only(storage_url: str) -> Iterator[int]:
    yield from _serve(storage_url, allow_writes=False)


@pytest.fixture
def writable(storage_url: str) -> Iterator[int]:
    yield from _serve(storage_url, allow_writes=True)


def request(port: int, method: str, path: str, *, host: str | None = None, body: Any = None,
            origin: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host if host is not None else f"127.0.0.1:{port}"}
    if origin is not None:
        headers["Origin"] = origin
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    text = response.read().decode(errors="replace")
    conn.close()
    return response.status, text


def study_names(url: str) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(url))


def test_no_write_request_reaches_the_storage(read_only: int, storage_url: str) -> None:
    port = read_only
    status, text = request(port, "GET", "/api/studies")
    assert status == 200 and "mine" in text
    trials_before = len(optuna.load_study(study_name="mine", storage=storage_url).trials)
    for method, path, body in [
        ("POST", "/api/studies/1/rename", {"study_name": "renamed"}),
        ("DELETE", "/api/studies/1", {}),
        ("PUT", "/api/studies/1/note", {"version": 1, "body": "pwned"}),
        ("POST", "/api/studies", {"study_name": "new", "directions": ["minimize"]}),
        ("POST", "/api/trials/1/tell", {"state": "Fail"}),
        ("POST", "/api/trials/1/user-attrs", {"user_attrs": {"x": 1}}),
        ("PATCH", "/api/studies/1", {}),
    ]:
        status, text = request(port, method, path, body=body)
        assert status == 405, (method, path, status, text)
        assert "read-only" in text and "--allow-writes" in text
    assert study_names(storage_url) == ["mine"]
    study = optuna.load_study(study_name="mine", storage=storage_url)
    assert len(study.trials) == trials_before
    assert all(not t.user_attrs for t in study.trials)
    assert request(port, "HEAD", "/api/studies")[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "127.0.0.1:1", ""])
def test_a_foreign_host_is_refused(read_only: int, host: str) -> None:
    status, text = request(read_only, "GET", "/api/studies", host=host.format(port=read_only))
    assert status == 403 and "is not the address it serves" in text
    assert "mine" not in text


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}",
                                  "127.0.0.1", "localhost"])
def test_loopback_forms_of_the_bound_host_are_answered(read_only: int, host: str) -> None:
    status, text = request(read_only, "GET", "/api/studies", host=host.format(port=read_only))
    assert status == 200 and "mine" in text


def test_allow_writes_restores_the_api_but_not_for_other_sites(writable: int, storage_url: str) -> None:
    status, _ = request(writable, "POST", "/api/studies/1/rename", body={"study_name": "renamed"},
                        origin="http://evil.example")
    assert status == 403 and study_names(storage_url) == ["mine"]
    status, _ = request(writable, "POST", "/api/studies/1/rename", body={"study_name": "renamed"},
                        origin=f"http://localhost:{writable}")
    assert status == 201 and study_names(storage_url) == ["renamed"]
    assert request(writable, "GET", "/api/studies", host="evil.example")[0] == 403


def test_allowed_hosts_and_loopback() -> None:
    hosts = allowed_hosts("192.0.2.7", 8080)
    assert {"192.0.2.7:8080", "127.0.0.1:8080", "localhost", "[::1]:8080"} <= hosts
    assert "evil.example:8080" not in hosts
    assert "[2001:db8::1]:9000" in allowed_hosts("2001:db8::1", 9000)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7") and not is_loopback("::")


def test_the_cli_serves_read_only_and_warns_on_a_public_host(
    storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import rankopt.results.dashboard
    import rankopt.results.reading

    served: dict[str, Any] = {}
    study = optuna.load_study(study_name="mine", storage=storage_url)
    fake = SimpleNamespace(study=study, run_dir=tmp_path,
                           config=SimpleNamespace(name="mine", objectives=["accuracy", "params"]))
    monkeypatch.setattr(rankopt.results.reading, "StudyResult", lambda run_dir: fake)
    monkeypatch.setattr(rankopt.results.reading, "storage_url_of", lambda config, run_dir: storage_url)
    monkeypatch.setattr(rankopt.results.dashboard, "serve", lambda app, host, port: served.update(app=app, host=host))

    assert main(["dashboard", str(tmp_path), "--port", "8123"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" not in err and "read-only" in err

    assert main(["dashboard", str(tmp_path), "--port", "8123", "--host", "0.0.0.0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "WARNING: --host 0.0.0.0 serves the study to every machine" in err and "SSH tunnel" in err

    assert main(["dashboard", str(tmp_path), "--host", "0.0.0.0", "--allow-writes"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "WITH THE WRITE API" in err and "read-write (--allow-writes)" in err

    # what the CLI serves is the guarded app: a write is refused without --allow-writes
    main(["dashboard", str(tmp_path), "--port", "8123"])
    calls: list[str] = []
    body = b"".join(served["app"]({"REQUEST_METHOD": "DELETE", "HTTP_HOST": "127.0.0.1:8123",
                                   "PATH_INFO": "/api/studies/1"}, lambda status, headers: calls.append(status)))
    assert calls == ["405 Method Not Allowed"] and b"read-only" in body
    assert study_names(storage_url) == ["mine"]
