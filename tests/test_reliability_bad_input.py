"""Bad input (issue 7, point 1): a catalogue of malformed study files and CLI calls.

Every entry must exit with status 2, print one line naming the field (or file), the
value and what is allowed, print no traceback, and leave the file tree as it was
(no run directory created, an existing one untouched). A hypothesis test throws
random values at the config schema: every failure is a clean ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankopt.cli import main
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError

from reliability_support import tiny_study, tree_snapshot

# A case: (id, how to build it, expected fragments of the one-line message).
# `build(tmp)` writes what it needs under tmp and returns the CLI arguments; "{run}"
# in them is replaced by the run directory tmp/run.
Build = Callable[[Path], list[str]]


def study_file(tmp: Path, text_or_changes: str | dict[str, Any], name: str = "bad.yaml") -> str:
    path = tmp / name
    if isinstance(text_or_changes, str):
        path.write_text(text_or_changes)
    else:
        path.write_text(yaml.safe_dump(tiny_study(**text_or_changes)))
    return str(path)


def run_with(changes: str | dict[str, Any], *extra: str) -> Build:
    def build(tmp: Path) -> list[str]:
        return ["run", study_file(tmp, changes), "--run-dir", str(tmp / "run"), "--quiet", *extra]

    return build


def run_in(run_dir: Callable[[Path], Path]) -> Build:
    def build(tmp: Path) -> list[str]:
        return ["run", study_file(tmp, {}), "--run-dir", str(run_dir(tmp)), "--quiet"]

    return build


def a_file(tmp: Path) -> Path:
    (tmp / "occupied").write_text("not a directory\n")
    return tmp / "occupied"


def under_a_file(tmp: Path) -> Path:
    return a_file(tmp) / "run"


def unwritable(tmp: Path) -> Path:
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root ignores modes: use a directory the kernel owns
        return Path("/proc/1/rankopt-run")
    return locked / "run"


def garbage_npz(tmp: Path) -> list[str]:
    (tmp / "garbage.npz").write_bytes(b"\x00not a numpy archive" * 10)
    data = {"name": "npz", "kwargs": {"train": str(tmp / "garbage.npz"), "val": str(tmp / "garbage.npz")}}
    return run_with({"data": data})(tmp)


def cli(*args: str) -> Build:
    def build(tmp: Path) -> list[str]:
        out = []
        for a in args:
            if a == "{study}":
                a = study_file(tmp, {})
            out.append(a.replace("{tmp}", str(tmp)))
        return out

    return build


CATALOGUE: list[tuple[str, Build, tuple[str, ...]]] = [
    # unknown plugin names
    ("unknown-decomposer", run_with({"decomposers": ["tucker3"]}), ("decomposers[0]", "tucker3", "'tucker2'")),
    ("unknown-selector", run_with({"selectors": {"enrgy": {}}}), ("selectors", "enrgy", "'energy'")),
    ("unknown-strategy", run_with({"strategies": {"nrmff": {}}}), ("strategies", "nrmff", "'nrmf'")),
    ("unknown-model", run_with({"model": {"name": "resnet1000"}}), ("model", "resnet1000", "did you mean")),
    ("unknown-dataset", run_with({"data": {"name": "imagenet22k"}}), ("data", "imagenet22k", "'digits'")),
    ("unknown-sampler", run_with({"sampler": {"name": "cmaes"}}), ("sampler.name", "cmaes", "nsgaii")),
    ("unknown-strategy-param", run_with({"strategies": {"finetune": {"epochz": 1}}}),
     ("strategies.finetune", "epochz", "epochs")),
    ("unknown-model-kwarg", run_with({"model": {"name": "small_cnn", "kwargs": {"widht": 8}}}),
     ("model.kwargs", "widht", "width")),
    ("unknown-top-level-key", run_with({"trails": 3}), ("trails", "unknown key", "'trials'")),
    # wrong types
    ("trials-not-int", run_with({"trials": "many"}), ("trials", "'many'", "integer")),
    ("batch-size-not-int", run_with({"data": {"name": "digits", "batch_size": "big"}}),
     ("data.batch_size", "'big'", "integer")),
    ("decomposers-not-list", run_with({"decomposers": {"tucker2": 1}}), ("decomposers", "list")),
    ("seed-negative", run_with({"seed": -1}), ("seed", "-1", "greater than or equal to 0")),
    ("device-unknown", run_with({"device": "gpu"}), ("device", "'gpu'", "'cuda'")),
    ("backend-unknown", run_with({"backend": "dask"}), ("backend", "'dask'", "'ray'")),
    # thresholds and ranks
    ("p-zero", run_with({"selectors": {"energy": {"p": 0}}}), ("selectors.energy.p", "0", "(0, 1]")),
    ("p-above-one", run_with({"selectors": {"energy": {"p": 1.5}}}), ("selectors.energy.p", "1.5", "(0, 1]")),
    ("p-range-above-one", run_with({"selectors": {"energy": {"p": {"low": 0.5, "high": 1.2}}}}),
     ("selectors.energy.p", "1.2", "(0, 1]")),
    ("range-reversed", run_with({"strategies": {"finetune": {"lr": {"low": 0.1, "high": 0.01}}}}),
     ("strategies.finetune.lr", "low (0.1) must be <= high (0.01)")),
    ("rank-above-largest", run_with({"selectors": {"fixed": {"ranks": {"3": [8, 99]}}}}),
     ("selectors.fixed.ranks", "99", "largest")),
    ("rank-below-one", run_with({"selectors": {"fixed": {"ranks": {"3": [0, 4]}}}}),
     ("selectors.fixed.ranks", "[0, 4]", ">= 1")),
    # negative epochs / lr
    ("reference-epochs-negative", run_with({"reference": {"epochs": -2}}),
     ("reference.epochs", "-2", "greater than or equal to 0")),
    ("reference-lr-negative", run_with({"reference": {"epochs": 1, "lr": -0.1}}),
     ("reference.lr", "-0.1", "greater than 0")),
    ("strategy-epochs-negative", run_with({"strategies": {"finetune": {"epochs": -1}}}),
     ("strategies.finetune.epochs", "-1")),
    ("strategy-lr-negative", run_with({"strategies": {"finetune": {"lr": -0.01}}}),
     ("strategies.finetune.lr", "-0.01")),
    # data paths
    ("data-path-missing", run_with({"data": {"name": "npz", "kwargs": {"train": "/no/such.npz", "val": "/no/such.npz"}}}),
     ("data.kwargs.train", "/no/such.npz", "does not exist")),
    ("data-file-unreadable", garbage_npz, ("garbage.npz", "npz")),
    ("reference-weights-missing", run_with({"reference": {"weights": "/no/weights.pt"}}),
     ("reference.weights", "/no/weights.pt", "does not exist")),
    # objectives, directions, constraints
    ("objective-unknown", run_with({"objectives": ["accuracy", "size"]}), ("objectives.1", "'size'", "'params'")),
    ("objective-repeated", run_with({"objectives": ["accuracy", "accuracy"]}), ("objectives", "must not repeat")),
    ("direction-given", run_with({"directions": ["maximize"]}), ("directions", "unknown key", "'objectives'")),
    ("constraint-negative", run_with({"constraints": {"max_params": -5}}),
     ("constraints.max_params", "-5", "greater than 0")),
    ("constraint-unreachable", run_with({"constraints": {"max_params": 10}}),
     ("constraints.max_params", "10", "cannot remove")),
    ("weights-and-epochs", run_with({"reference": {"weights": "w.pt", "epochs": 3}}), ("reference", "not both")),
    ("no-stop-rule", run_with({"trials": None}), ("give trials, timeout or both",)),
    ("address-on-local", run_with({"address": "ray://head:10001"}), ("address", "ray://head:10001", "backend 'ray'")),
    ("targets-match-nothing", run_with({"targets": {"include": ["conv*"]}}), ("targets", "conv*", "'3'")),
    ("enqueue-unknown-param", run_with({"enqueue": [{"bogus.x": 1}]}), ("enqueue[0].bogus.x", "unknown parameter")),
    ("study-name-traversal", run_with({"name": "../../etc"}), ("name", "'../../etc'", "letters, digits")),
    ("max-failures-zero", run_with({"max_failures": 0}), ("max_failures", "0", "greater than or equal to 1")),
    # the file itself
    ("invalid-yaml", run_with("name: x\nmodel: {name: small_cnn\n"), ("bad.yaml", "not valid YAML", "line")),
    ("empty-file", run_with(""), ("bad.yaml", "mapping", "NoneType")),
    ("top-level-list", run_with("- a\n- b\n"), ("bad.yaml", "mapping", "list")),
    ("python-tag", run_with("name: x\nmodel: !!python/object/apply:os.system ['true']\n"),
     ("bad.yaml", "not valid YAML", "python/object")),
    ("study-file-missing", cli("run", "{tmp}/nope.yaml", "--quiet"), ("nope.yaml", "does not exist")),
    # the run directory
    ("run-dir-is-a-file", run_in(a_file), ("run directory", "occupied", "not a directory")),
    ("run-dir-under-a-file", run_in(under_a_file), ("run directory", "occupied", "not a directory")),
    ("run-dir-unwritable", run_in(unwritable), ("run directory", "not writable")),
    # command-line options
    ("cli-trials-zero", run_with({}, "--trials", "0"), ("trials", "0", "greater than or equal to 1")),
    ("cli-trials-not-int", run_with({}, "--trials", "abc"), ("--trials", "abc", "integer")),
    ("cli-unknown-option", run_with({}, "--trails", "3"), ("--trails", "No such option")),
    ("cli-backend-unknown", run_with({}, "--backend", "dask"), ("backend", "'dask'", "'local'")),
    ("cli-timeout-negative", run_with({}, "--timeout", "-5"), ("timeout", "-5", "greater than 0")),
    ("cli-status-not-a-run", cli("status", "{tmp}"), ("not a rankopt run directory", "resolved-study.yaml")),
    ("cli-pareto-format", cli("pareto", "{tmp}", "--format", "xml"), ("--format", "'xml'", "'csv'")),
    ("cli-pick-without-out", cli("pick", "{tmp}", "--trial", "1"), ("--out", "Missing option")),
    ("cli-unknown-command", cli("optimise", "{study}"), ("optimise", "No such command")),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working tree with an existing run directory of another study (must stay untouched)."""
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "resolved-study.yaml").write_text("name: other\n")
    return tmp_path


@pytest.mark.parametrize("case, build, needles", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_malformed_input_exits_2_with_one_clean_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    case: str, build: Build, needles: tuple[str, ...],
) -> None:
    monkeypatch.chdir(workdir)  # a default runs/<name> would land here
    args = build(workdir)
    before = tree_snapshot(workdir)
    code = main(args)
    out, err = capsys.readouterr()
    message = err.strip()
    assert code == 2, (case, code, message, out)
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in message + out
    for needle in needles:
        assert needle in message, (needle, message)
    assert tree_snapshot(workdir) == before


def test_catalogue_is_large_enough() -> None:
    assert len(CATALOGUE) >= 30


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = study_file(tmp_path, {"decomposers": ["tucker3"]})
    with pytest.raises(ConfigError, match="tucker3"):
        main(["--debug", "run", bad, "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# -- random values at the schema ---------------------------------------------------------------

FIELDS = [
    "name", "trials", "timeout", "seed", "device", "backend", "decomposers", "selectors",
    "strategies", "objectives", "constraints", "sampler", "reference", "data", "model",
    "targets", "max_concurrent", "max_failures", "train", "enqueue", "resources", "storage",
]
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["tucker2", "energy", "finetune", "accuracy", "../x", "1e-3", "p", "low"]),
)
values = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["p", "lr", "epochs", "low", "high", "log", "choices",
                                         "name", "kwargs", "energy", "finetune", "max_params",
                                         "seed", "fraction", "ranks", "weights"]), inner, max_size=3),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=3))
def test_random_values_give_a_config_or_a_clean_config_error(changes: dict[str, Any]) -> None:
    raw = tiny_study(**changes)
    try:
        config = load_config(raw)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
    else:
        assert config.name == raw.get("name", config.name)
