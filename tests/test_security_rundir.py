"""Issue 26, item 1: a run directory never acts outside itself.

Each test plants a symbolic link where a run removes or writes (an unknown trial folder,
a failed trial's folder, a folder a killed run left RUNNING, a file inside a trial
folder, ``trials`` itself, the folder the next trial will use) and checks that nothing
outside the run directory changes and that the run ends without a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from rankopt.cli import main
from reliability_support import tree_snapshot
from study_support import ENERGY, RANDOM, run_study_file, small_study

FAST = small_study("sec", model={"name": "small_cnn", "kwargs": {"width": 4}}, data={"name": "digits", "batch_size": 256},
                   reference={"epochs": 0.2, "lr": 0.05}, selectors=ENERGY, sampler=RANDOM,
                   strategies={"finetune": {"epochs": 0.05, "lr": 0.02}}, skip_repeats=False, trials=1)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    code, study, run_dir = run_study_file(tmp_path_factory.mktemp("sec"), FAST, run_name="R")
    assert code == 0
    return study, run_dir


@pytest.fixture()
def run_copy(first_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A fresh copy of the one-trial run, and a victim folder outside it."""
    study, run_dir = first_run
    copy = tmp_path / "R"
    shutil.copytree(run_dir, copy, symlinks=True)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    (victim / "sub" / "deep.txt").write_text("keep me too")
    (victim / "metrics.json").write_text('{"mine": true}')
    (victim / "model.pt").write_text("not a model")
    return study, copy, victim


def _open_study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="sec", storage=f"sqlite:///{run_dir / 'optuna.db'}")


@pytest.fixture()
def capsys(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> object:
    """stderr, with the log's warnings (pytest captures those apart) after it."""
    class Both:
        def readouterr(self) -> tuple[str, str]:
            err = capsys.readouterr().err
            assert "Traceback" not in err
            logged = "".join(f"{r.getMessage()}\n" for r in caplog.records
                             if r.levelname == "WARNING" and r.name.startswith("rankopt"))
            caplog.clear()
            return "", err + logged
    return Both()


def _rerun(study: Path, run_dir: Path, capsys: object, trials: int = 2) -> tuple[int, str]:
    code = main(["run", str(study), "--run-dir", str(run_dir), "--trials", str(trials), "-q"])
    return code, capsys.readouterr()[1]  # type: ignore[attr-defined]


def test_an_unknown_trial_folder_that_links_outside_is_left_alone(
        run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    study, run_dir, victim = run_copy
    monkeypatch.chdir(run_dir.parent)
    run_dir = Path(run_dir.name)  # relative, as in the reproduction
    before = tree_snapshot(victim)
    (run_dir / "trials" / "99").symlink_to(victim)
    code, err = _rerun(study, run_dir, capsys)
    assert code == 0
    assert tree_snapshot(victim) == before
    assert "trials/99" in err and "symbolic link" in err  # reported, not removed
    assert (run_dir / "trials" / "99").is_symlink()


def _rerun_with_trial_folder_linked(run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
                                    *, failed: bool) -> tuple[optuna.Study, int]:
    """Ask a trial (told FAIL when ``failed``; else left RUNNING with no live worker, which
    the next run marks FAIL as stale), link its folder to the victim and continue the run:
    it ends well, leaves the victim as it was and names the folder; (study, trial number)."""
    study, run_dir, victim = run_copy
    s = _open_study(run_dir)
    trial = s.ask()
    if failed:
        s.tell(trial, state=TrialState.FAIL)
    before = tree_snapshot(victim)
    (run_dir / "trials" / str(trial.number)).symlink_to(victim)
    code, err = _rerun(study, run_dir, capsys)
    assert code == 0
    assert tree_snapshot(victim) == before
    assert f"trials/{trial.number}" in err
    return s, trial.number


def test_a_failed_trials_folder_replaced_by_a_link_is_left_alone(
        run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _rerun_with_trial_folder_linked(run_copy, capsys, failed=True)


def test_a_running_trials_folder_replaced_by_a_link_keeps_the_whole_subtree(
        run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    s, number = _rerun_with_trial_folder_linked(run_copy, capsys, failed=False)
    assert s.trials[number].state == TrialState.FAIL


def test_links_inside_a_failed_trials_folder_are_reported_not_followed(
        run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    study, run_dir, victim = run_copy
    s = _open_study(run_dir)
    trial = s.ask()
    s.tell(trial, state=TrialState.FAIL)
    folder = run_dir / "trials" / str(trial.number)
    folder.mkdir()
    (folder / "model.pt").symlink_to(victim / "model.pt")
    (folder / "sub").symlink_to(victim / "sub")
    (folder / "real").mkdir()
    (folder / "real" / "inner").symlink_to(victim)  # a link deeper down: unlinked, not followed
    before = tree_snapshot(victim)
    code, err = _rerun(study, run_dir, capsys)
    assert code == 0
    assert tree_snapshot(victim) == before
    assert (folder / "model.pt").is_symlink() and (folder / "sub").is_symlink()
    assert "model.pt" in err
    assert not (folder / "real").exists()


def test_the_folder_the_next_trial_uses_planted_as_a_link_fails_that_trial_only(
        run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    study, run_dir, victim = run_copy
    next_number = len(_open_study(run_dir).trials)
    (run_dir / "trials" / str(next_number)).symlink_to(victim)
    before = tree_snapshot(victim)
    code, err = _rerun(study, run_dir, capsys, trials=3)
    assert code == 3, err  # the documented "some trials failed" status
    assert tree_snapshot(victim) == before
    trial = _open_study(run_dir).trials[next_number]
    assert trial.state == TrialState.FAIL
    assert "symbolic link" in trial.user_attrs["reason"]
    assert sum(t.state == TrialState.COMPLETE for t in _open_study(run_dir).trials) == 2


@pytest.mark.parametrize("entry", ["trials", "reference", "cache"])
def test_a_run_dir_whose_own_folder_is_a_link_is_refused_in_one_line(
        run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], entry: str) -> None:
    study, run_dir, victim = run_copy
    if (run_dir / entry).exists():
        shutil.rmtree(run_dir / entry)
    (run_dir / entry).symlink_to(victim)
    before = tree_snapshot(victim)
    code, err = _rerun(study, run_dir, capsys)
    assert code == 2
    assert tree_snapshot(victim) == before
    assert err.splitlines()[0].startswith("error:") and "symbolic link" in err and entry in err


@pytest.mark.parametrize("entry", ["trials", "reference"])
def test_a_file_where_a_run_folder_belongs_is_one_line(
        run_copy: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], entry: str) -> None:
    study, run_dir, _ = run_copy
    shutil.rmtree(run_dir / entry)
    (run_dir / entry).write_text("in the way")
    code, err = _rerun(study, run_dir, capsys)
    assert code == 2
    assert err.splitlines()[0].startswith("error:") and f"{entry!r} must be a folder" in err
    assert (run_dir / entry).read_text() == "in the way"


# -- the helper itself ---------------------------------------------------------------------

def test_check_inside_refuses_dotdot_and_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rankopt.core import safe_paths
    from rankopt.core.errors import DiskFullError, UnsafePathError  # noqa: F401

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    (root / "trials").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (root / "trials" / "5").symlink_to(tmp_path / "out")
    assert safe_paths.check_inside(root, root / "trials/4/model.pt") == root.resolve() / "trials/4/model.pt"
    # relative paths are the working directory's, as for the run directory
    assert safe_paths.check_inside("run", "run/trials/4") == root.resolve() / "trials/4"
    assert safe_paths.make_dirs("run", "run/report") == root.resolve() / "report"
    with pytest.raises(UnsafePathError, match="outside the run directory"):
        safe_paths.check_inside(root, root / ".." / "out" / "x")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        safe_paths.check_inside(root, root / "trials" / "5" / "metrics.json")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        safe_paths.remove_tree(root, root / "trials" / "5")
    assert (tmp_path / "out").is_dir()


def test_a_run_dir_that_is_itself_a_link_is_the_users_choice(tmp_path: Path) -> None:
    from rankopt.core import safe_paths
    from rankopt.core.errors import DiskFullError, UnsafePathError  # noqa: F401

    real = tmp_path / "disk" / "run"
    real.mkdir(parents=True)
    (tmp_path / "run").symlink_to(real)
    path = safe_paths.atomic_write_text(tmp_path / "run" / "trials" / "0" / "metrics.json", "{}",
                                        root=tmp_path / "run")
    assert path.read_text() == "{}" and (real / "trials" / "0" / "metrics.json").is_file()


def test_atomic_write_never_follows_a_link_at_the_name(tmp_path: Path) -> None:
    from rankopt.core import safe_paths
    from rankopt.core.errors import DiskFullError, UnsafePathError  # noqa: F401

    root = tmp_path / "run"
    root.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (root / "metrics.json").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        safe_paths.atomic_write_text(root / "metrics.json", "x", root=root)
    assert outside.read_text() == "keep"
    # without a root (an output file): the link itself is replaced, its target kept
    safe_paths.atomic_write_text(root / "metrics.json", "new")
    assert outside.read_text() == "keep" and not (root / "metrics.json").is_symlink()


def test_a_full_disk_leaves_no_half_file_and_names_the_path(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from rankopt.core import safe_paths
    from rankopt.core.errors import DiskFullError, UnsafePathError  # noqa: F401

    target = tmp_path / "model.pt"
    target.write_bytes(b"old whole file")

    def writer(f: object) -> None:
        f.write(b"half")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        safe_paths.atomic_write(target, writer)
    message = str(info.value)
    assert str(target) in message and "free" in message and "\n" not in message
    assert target.read_bytes() == b"old whole file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left


# -- item 4: outputs that cannot destroy inputs ----------------------------------------------

def _digest(path: Path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


@pytest.mark.parametrize("command", ["pick", "export"])
@pytest.mark.parametrize("force", [False, True])
def test_an_output_never_overwrites_a_storage(run_copy: tuple[Path, Path, Path], tmp_path: Path,
                                              capsys: object, command: str, force: bool) -> None:
    _, run_dir, _ = run_copy
    db = run_dir / "optuna.db"
    before = _digest(db)
    alias = tmp_path / "innocent.pt"
    alias.symlink_to(db)  # a link to the storage counts as the storage
    for out in (db, alias):
        args = [command, str(run_dir), "--trial", "0", "--out", str(out)] + (["--force"] if force else [])
        assert main(args) == 2
        err = capsys.readouterr()[1]  # type: ignore[attr-defined]
        assert err.startswith("error: --out:") and "storage" in err and err.count("\n") == 1
    assert _digest(db) == before and alias.is_symlink()


def test_pick_refuses_another_runs_own_files_unless_forced(run_copy: tuple[Path, Path, Path], tmp_path: Path,
                                                           capsys: object) -> None:
    _, run_dir, _ = run_copy
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    victims = [other / "trials" / "0" / "model.pt", other / "reference" / "model.pt",
               run_dir / "reference" / "model.pt", other / "resolved-study.yaml"]
    before = [_digest(v) for v in victims]
    for out in victims:
        assert main(["pick", str(run_dir), "--trial", "0", "--out", str(out)]) == 2
        err = capsys.readouterr()[1]  # type: ignore[attr-defined]
        assert "among the run's own files" in err and "--force" in err
    assert [_digest(v) for v in victims] == before
    # --force: the user's explicit choice, outside the storage
    assert main(["pick", str(run_dir), "--trial", "0", "--out", str(victims[0]), "--force"]) == 0
    assert _digest(victims[0]) == _digest(run_dir / "trials" / "0" / "model.pt")


def test_pick_on_a_full_disk_leaves_the_old_file_whole(run_copy: tuple[Path, Path, Path], tmp_path: Path,
                                                       capsys: object, monkeypatch: pytest.MonkeyPatch) -> None:
    _, run_dir, _ = run_copy
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.pt"
    out.write_bytes(b"the user's earlier model")

    def full(src: object, dst: object, *args: object) -> None:
        dst.write(src.read(100))  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    assert main(["pick", str(run_dir), "--trial", "0", "--out", str(out)]) == 1
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err.count("\n") == 1 and "no space left" in err and str(out) in err and "free" in err
    assert out.read_bytes() == b"the user's earlier model"
    assert [p.name for p in out_dir.iterdir()] == ["model.pt"]  # no temporary left behind


def test_export_on_a_full_disk_writes_nothing(run_copy: tuple[Path, Path, Path], tmp_path: Path,
                                              capsys: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import rankopt.deploy.exporting as deploy

    _, run_dir, _ = run_copy
    out = tmp_path / "m.pt"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deploy, "_write_torchscript", full)
    code = main(["export", str(run_dir), "--trial", "0", "--format", "torchscript", "--out", str(out)])
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert code == 1 and "no space left" in err and str(out) in err
    assert not out.exists()
    assert not any(p.name.endswith((".tmp", ".part")) for p in tmp_path.iterdir())


# -- item 6: every check before the first write ----------------------------------------------

@pytest.mark.parametrize("url, needle", [
    ("ftp://127.0.0.1:1/x", "cannot reach"),
    ("/proc/rankopt", "cannot create a folder in"),
    ("memory://x", "keeps nothing after this process ends"),
])
def test_a_bad_artifact_store_fails_before_the_run_directory_exists(
        tmp_path: Path, capsys: object, url: str, needle: str) -> None:
    code, _, run_dir = run_study_file(tmp_path, {**FAST, "artifacts": url}, run_name="R")
    assert code == 2
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err.startswith("error: artifacts:") and needle in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_a_usable_artifact_store_is_probed_and_left_clean(tmp_path: Path) -> None:
    from rankopt.search.artifact_store import ArtifactStore

    store = tmp_path / "store"
    ArtifactStore(str(store), "sec").probe()
    assert [p.name for p in store.iterdir()] == ["sec"] and list((store / "sec").iterdir()) == []


@pytest.mark.parametrize("setting, needle", [
    ("rank_multiple=1000000000", "rank_multiple: must be 'auto' (the device's vector width) or an integer in [1, 4,096]"),
    ("reference.epochs=1e9", "reference.epochs"),
    ("strategies.finetune.epochs=1e9", "strategies.finetune.epochs: '1e9' is above the limit of 10,000"),
    ("strategies.finetune.epochs={low: 1, high: 1e12}", "strategies.finetune.epochs.high"),
    ("train.epochs=20000", "train.epochs: 20000"),
    ("multi_fidelity.epochs=1e9", "multi_fidelity"),
    ("model.kwargs.width=100000", "above the limit of 2,147,483,648"),
])
def test_sizes_that_mean_forever_are_refused_before_any_work(
        tmp_path: Path, capsys: object, setting: str, needle: str) -> None:
    code, _, run_dir = run_study_file(tmp_path, FAST, "--set", setting, run_name="R")
    assert code == 2
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err.startswith("error:") and needle in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_inspect_refuses_a_huge_input_shape_in_one_line(capsys: object) -> None:
    assert main(["inspect", "small_cnn", "--input-shape", "1,1,100000,100000"]) == 2
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err.startswith("error: --input-shape:") and "268,435,456" in err and err.count("\n") == 1


# -- items 8 and 11: faults give one line ----------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("{{{ garbage: [\n", "cannot be read (ParserError at line 2)"),
    ("[1, 2]\n", "holds a list, not a study config"),
    ("name: 3\n", "resolved-study.yaml: name: 3"),
    ("- " * 5000 + "x\n", "resolved-study.yaml"),
])
def test_a_damaged_study_record_is_one_line_in_status(run_copy: tuple[Path, Path, Path], capsys: object,
                                                       text: str, needle: str) -> None:
    _, run_dir, _ = run_copy
    (run_dir / "resolved-study.yaml").write_text(text)
    for command in ("status", "pareto"):
        assert main([command, str(run_dir)]) == 2
        err = capsys.readouterr()[1]  # type: ignore[attr-defined]
        assert err.startswith("error: run directory") and needle in err and err.count("\n") == 1


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path: Path, capsys: object) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(FAST))
    assert main(["run", str(study), "--run-dir", "/proc/rankopt-x", "-q"]) == 2
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err.startswith("error: run directory '/proc/rankopt-x' cannot be created") and err.count("\n") == 1


def test_a_read_only_run_dir_still_evaluates_and_report_says_why_in_one_line(
        run_copy: tuple[Path, Path, Path], capsys: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import rankopt.results.evaluation
    import rankopt.results.report

    _, run_dir, _ = run_copy

    def read_only(path: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(rankopt.results.evaluation, "atomic_write_text", read_only)
    monkeypatch.setattr(rankopt.results.report, "make_dirs", lambda root, path: read_only(path))
    assert main(["evaluate", str(run_dir), "--trial", "0", "--split", "val"]) == 0
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert "could not keep the accuracies" in err
    assert main(["report", str(run_dir)]) == 1
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err == f"error: cannot write {str(run_dir / 'report')!r}: Read-only file system; run this " \
                  "command where it may write (a copy of the run directory, or a writable output path)\n"


def test_a_full_disk_in_the_storage_is_one_line(run_copy: tuple[Path, Path, Path], capsys: object,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What Optuna gives on a full disk: SQLite's error under SQLAlchemy's, under
    ``AssertionError: Should not reach.`` (four chained tracebacks before)."""
    import sqlite3

    import rankopt.study

    study, run_dir, _ = run_copy

    def full(self: object, prep: object, storage: object) -> None:
        try:
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as exc:
                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit") from exc
        except optuna.exceptions.StorageInternalError:
            raise AssertionError("Should not reach.")  # noqa: B904 - as Optuna raises it

    monkeypatch.setattr(rankopt.study.Study, "_run", full)
    code, err = _rerun(study, run_dir, capsys)
    assert code == 1
    assert err.startswith(f"error: DiskFullError: no space left on the device writing "
                          f"{str(run_dir / 'optuna.db')!r} (") and "free in" in err and "needed" in err
    assert err.count("\n") == 1


def _can_mount() -> bool:
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs root and unshare -m to mount a small tmpfs (a real full disk)")
def test_a_real_full_disk_is_one_line_and_the_run_resumes(first_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A run on a 200 KiB tmpfs fills it; then, given room, the same run completes."""
    import subprocess
    import sys

    study, _ = first_run
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rankopt_cmd = f"{sys.executable} -m rankopt run {study} --run-dir {mnt}/R -q --trials 12"
    script = (f"mount -t tmpfs -o size=200k tmpfs {mnt} && "
              f"{rankopt_cmd} 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc; "
              f"mount -o remount,size=8m {mnt} && "
              f"{rankopt_cmd} 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, check=True, timeout=600)
    first = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first
    assert "Traceback" not in first
    errors = [line for line in first.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the device writing" in errors[0] and "free in" in errors[0]
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()


def test_inspect_refuses_a_huge_model_from_a_study_or_a_runs_reference(
        run_copy: tuple[Path, Path, Path], tmp_path: Path, capsys: object) -> None:
    import json

    study = tmp_path / "huge.yaml"
    study.write_text(yaml.safe_dump({**FAST, "model": {"name": "small_cnn", "kwargs": {"width": 100000}}}))
    assert main(["inspect", str(study)]) == 2
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert err.startswith("error: model kwargs: {'width': 100000") and "builds a model of" in err
    assert err.count("\n") == 1
    _, run_dir, _ = run_copy
    record = run_dir / "reference" / "metrics.json"
    data = json.loads(record.read_text())
    data["base"]["kwargs"]["width"] = 100000
    record.write_text(json.dumps(data))
    assert main(["inspect", str(run_dir)]) == 2
    err = capsys.readouterr()[1]  # type: ignore[attr-defined]
    assert "base.kwargs" in err and "above the limit of 2,147,483,648" in err and err.count("\n") == 1
