"""PostgreSQL storage URLs as the docs write them (issue 28, item 4): ``postgresql://``
and ``postgresql+psycopg2://`` both open, whichever of psycopg 3 and psycopg2 is installed.

SQLAlchemy 2.1 opens ``postgresql://`` with psycopg 3, which the old ``postgres`` extra
(psycopg2) did not install: the README's URL exited 2 with "driver not installed".
"""

from __future__ import annotations

import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from rankopt.search import storage_url
from rankopt.search.storage import open_storage
from rankopt.search.storage_url import normalize_storage_url
from reliability_support import postgres_url, tiny_study


def only(*modules: str):  # noqa: ANN201 - a stand-in for storage_url._installed
    return lambda name: name in modules


@pytest.mark.parametrize(("installed", "url", "expected"), [
    (("psycopg",), "postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
    (("psycopg",), "postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
    (("psycopg",), "postgresql+psycopg2://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
    (("psycopg2",), "postgresql://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
    (("psycopg2",), "postgresql+psycopg://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
    (("psycopg", "psycopg2"), "postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
    (("psycopg", "psycopg2"), "postgresql://u:p@h:5433/db?sslmode=require",
     "postgresql+psycopg://u:p@h:5433/db?sslmode=require"),
    ((), "postgresql://u:p@h/db", "postgresql://u:p@h/db"),  # open_storage names the extra
    (("psycopg",), "sqlite:///x/optuna.db", "sqlite:///x/optuna.db"),
    (("psycopg",), "postgresql+asyncpg://h/db", "postgresql+asyncpg://h/db"),
])
def test_a_postgres_url_runs_with_the_installed_driver(
    installed: tuple[str, ...], url: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_url, "_installed", only(*installed))
    assert normalize_storage_url(url) == expected


def spellings(url: str) -> dict[str, str]:
    rest = url.split("://", 1)[1]
    return {"postgresql": f"postgresql://{rest}", "psycopg2": f"postgresql+psycopg2://{rest}"}


@pytest.mark.parametrize("psycopg2_installed", [True, False])
def test_both_spellings_open_one_study_on_a_real_server(
    psycopg2_installed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = spellings(postgres_url())
    if not psycopg2_installed:  # what `pip install rankopt[postgres]` gives: psycopg 3 only
        monkeypatch.setattr(storage_url, "_installed", only("psycopg"))
    name = f"urls-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=open_storage(urls["postgresql"]))
    study.add_trial(optuna.trial.create_trial(value=1.5, params={},  distributions={}))
    again = optuna.load_study(study_name=name, storage=open_storage(urls["psycopg2"]))
    assert [t.value for t in again.trials] == [1.5]
    optuna.delete_study(study_name=name, storage=open_storage(urls["postgresql"]))


@pytest.mark.slow
def test_a_study_file_with_the_readme_url_runs(tmp_path: Path) -> None:
    from rankopt.cli import main
    from rankopt.results.reading import StudyResult

    url = spellings(postgres_url())["postgresql"]
    name = f"readme-{uuid.uuid4().hex[:8]}"
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(tiny_study(
        name=name, trials=1, storage=url, run_dir=str(tmp_path / "run"))))
    assert main(["run", str(study_file), "--quiet"]) == 0
    assert [t.state.name for t in StudyResult(tmp_path / "run").study.trials] == ["COMPLETE"]
    optuna.delete_study(study_name=name, storage=open_storage(url))
