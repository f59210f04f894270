"""The Ray Tune backend on a local Ray instance: the same run directory as the local backend."""

from __future__ import annotations

import json
import pickle
import time
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import rankopt
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from rankopt.results.reading import StudyResult
from study_support import RAY, digits_study
from rankopt.config.sections import SamplerConfig

ray = pytest.importorskip("ray")


def tiny(run_dir: Path, **changes: object) -> dict:
    sampler = {"name": "nsgaii", "seed": 0, "options": {"population_size": 4}}
    return digits_study("raytiny", run_dir, **{"sampler": sampler, "trials": 3, **RAY, **changes})


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(local_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> StudyResult:
    run_dir = tmp_path_factory.mktemp("ray") / "run"
    return rankopt.run_study(tiny(run_dir))


def test_ray_run_writes_the_same_run_directory(ray_run: StudyResult) -> None:
    run_dir = ray_run.run_dir
    assert ray.is_initialized()  # a Ray instance the caller started is left running
    trials = ray_run.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        folder = run_dir / "trials" / str(t.number)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["trial"] == t.number and metrics["state"] == "COMPLETE"
        # the driver copied the worker's metrics into the storage before telling Optuna
        assert t.user_attrs["accuracy"] == metrics["accuracy"]
        assert t.values == [metrics["accuracy"], metrics["params"], metrics["flops"]]
        model = rankopt.load_compressed(folder / "model.pt")
        assert rankopt.count(model, (1, 1, 8, 8)).params == metrics["params"]
    assert (run_dir / "reference" / "metrics.json").is_file()
    assert len(ray_run.front()) >= 1
    assert StudyResult(run_dir).status()["trials"] == {"COMPLETE": 3}


def test_ray_rerun_runs_nothing_when_done(ray_run: StudyResult) -> None:
    before = {p: p.stat().st_mtime_ns for p in ray_run.run_dir.glob("trials/*/metrics.json")}
    start = time.perf_counter()
    rankopt.run_study(tiny(ray_run.run_dir))
    assert {p: p.stat().st_mtime_ns for p in ray_run.run_dir.glob("trials/*/metrics.json")} == before
    assert time.perf_counter() - start < 30


def test_gpus_on_a_machine_without_any_fail_at_once(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"resources.gpus: 1 GPU\(s\) per trial requested"):
        rankopt.run_study(tiny(run_dir, resources={"cpus": 1, "gpus": 1}))
    assert time.perf_counter() - start < 10
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="resources.gpus"):
        rankopt.run_study(tiny(run_dir, backend="local", resources={"cpus": 1, "gpus": 1}))
    assert not run_dir.exists()


def test_cluster_without_gpus_is_refused(local_ray: Any, tmp_path: Path) -> None:
    from rankopt.search.ray_backend import connect

    config = load_config(tiny(tmp_path / "run", resources={"cpus": 1, "gpus": 2}))
    with pytest.raises(ConfigError, match="the Ray cluster has 0"):
        connect(config)
    config = load_config(tiny(tmp_path / "run", resources={"cpus": 64, "gpus": 0}))
    with pytest.raises(ConfigError, match="resources.cpus: 64"):
        connect(config)
    assert ray.is_initialized()  # a refusal does not tear down a Ray the caller started


def test_failing_trials_on_ray_are_stored_as_failed(local_ray: Any, tmp_path: Path) -> None:
    from rankopt.core.errors import RankoptError

    run_dir = tmp_path / "run"
    # an absurd regularizer weight makes the loss non-finite inside the Ray workers
    config = tiny(run_dir, trials=2, strategies={
        "nrmf": {"alpha": 1e38, "epochs": 0.2, "finetune_epochs": 0.1}})
    with pytest.raises(RankoptError, match="failed"):
        rankopt.run_study(config)
    trials = StudyResult(run_dir).study.trials
    # each failed trial is replaced, up to as many replacements as trials asked
    # (max_failures unset), and then the run gives up
    assert [t.state.name for t in trials] == ["FAIL"] * 4
    assert all("diverged" in str(t.user_attrs.get("reason", "")) for t in trials), \
        [t.user_attrs for t in trials]


def test_cuda_on_a_cpu_only_driver_and_a_gpu_less_cluster_is_one_line(
    local_ray: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from rankopt.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_dir = tmp_path / "run"
    changes = {"device": "cuda", "reference": {"epochs": 1, "lr": 0.05, "on": "cluster"}}
    # the driver's own CUDA is not asked for: the cluster's GPUs are what count
    with pytest.raises(ConfigError, match=r"device: 'cuda' with backend ray needs GPUs in the Ray cluster"):
        rankopt.run_study(tiny(run_dir, **changes))
    assert not run_dir.exists()
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(tiny(run_dir, **changes)))
    assert main(["run", str(study_file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "has none" in err and "device" in err
    # training the reference on this (CPU-only) driver is refused, pointing at on: cluster
    with pytest.raises(ConfigError, match=r"CUDA is not available.*reference: \{on: cluster\}"):
        rankopt.run_study(tiny(run_dir, device="cuda"))
    assert not run_dir.exists()


SAMPLERS = typing.get_args(SamplerConfig.model_fields["name"].annotation)


@pytest.mark.parametrize("name", SAMPLERS)
def test_searcher_pickles_without_its_sampler_and_rebuilds_it(name: str, tmp_path: Path) -> None:
    """Optuna 5's samplers hold a threading lock: Tune pickles the searcher (tuner.pkl,
    its checkpoints), so the sampler is rebuilt from the study config, not pickled."""
    from ray import cloudpickle

    from rankopt.search.ray_searcher import RankoptOptunaSearch
    from rankopt.search.sampler import create_study, make_sampler
    from rankopt.search.storage import open_storage

    config = load_config(tiny(tmp_path / "run", sampler={"name": name, "seed": 7}))
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    sampler = make_sampler(config)
    create_study(config, storage, sampler)
    env = types.SimpleNamespace(config=config, run_dir=tmp_path, store=None)
    searcher = RankoptOptunaSearch(
        env=env, space=_one_float, metric=["accuracy", "params", "flops"],
        mode=["max", "min", "min"], sampler=sampler, study_name=config.name, storage=storage)
    assert isinstance(searcher.suggest("t0"), dict)
    copy = pickle.loads(cloudpickle.dumps(searcher))
    assert type(copy._sampler) is type(sampler) and copy._sampler is not sampler
    assert copy._ot_study.sampler is copy._sampler  # the rebuilt study uses the rebuilt sampler
    assert copy._ot_trials["t0"].number == searcher._ot_trials["t0"].number == 0
    # the same seed: the rebuilt sampler proposes what a fresh one with that seed does
    assert copy.sampler_config.sampler.seed == 7
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))  # Tune's searcher checkpoints take the same path
    searcher.restore(str(checkpoint))
    assert isinstance(searcher.suggest("t1"), dict)
    assert sorted(t.number for t in searcher._ot_trials.values()) == [0, 1]


def _one_float(trial: Any) -> dict[str, Any]:
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_runs_on_ray_from_python_and_the_cli(
    name: str, local_ray: Any, tmp_path: Path
) -> None:
    import yaml

    from rankopt.cli import main

    run_dir = tmp_path / "run"
    # one trial from Python, one more from the CLI: each session's searcher and its
    # sampler run on Ray (a second trial per session showed nothing more; suite time)
    config = tiny(run_dir, trials=1, sampler={"name": name, "seed": 0}, max_concurrent=1,
                  strategies={"finetune": {"epochs": 0.1, "lr": 0.02}})
    result = rankopt.run_study(config, progress=False)
    assert [t.state.name for t in result.study.trials] == ["COMPLETE"]
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(config))
    # the CLI continues the same study by one trial (a later session: another seed)
    assert main(["run", str(study_file), "--quiet", "--trials", "2"]) == 0
    trials = StudyResult(run_dir).study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert all((run_dir / "trials" / str(t.number) / "model.pt").is_file() for t in trials)


@pytest.mark.slow
def test_a_repeat_is_a_complete_trial_on_ray(local_ray: Any, tmp_path: Path) -> None:
    """A repeat (repeat_of) has no model.pt by design; the ray backend failed it as "its
    model did not reach this machine" (issue 28, item 3)."""
    run_dir = tmp_path / "run"
    # small_cnn(width=8)'s layers are at most 48 wide, where ceil(0.49 r) == ceil(0.5 r)
    config = tiny(run_dir, trials=2, max_concurrent=1, decomposers=["tucker2"],
                  selectors={"fixed": {"fraction": {"low": 0.1, "high": 1.0}}},
                  sampler={"name": "random", "seed": 0},
                  enqueue=[{"fixed.fraction": 0.5}, {"fixed.fraction": 0.49}])
    result = rankopt.run_study(config, progress=False)
    assert [t.state.name for t in result.study.trials] == ["COMPLETE"] * 2
    records = {r.trial: r for r in result.trials()}
    assert records[1].repeat_of == 0 and records[1].accuracy == records[0].accuracy
    assert not (run_dir / "trials" / "1" / "model.pt").exists()
    assert json.loads((run_dir / "trials" / "1" / "metrics.json").read_text())["repeat_of"] == 0
    assert result.status()["repeats"] == 1


def test_a_worker_death_names_the_node_and_rays_cause() -> None:
    from ray.exceptions import ActorDiedError

    from rankopt.search.ray_searcher import worker_failure

    text = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\n"
            "\tpid: 4321\n\tip: 10.0.0.7\nThe actor is dead because its worker process has "
            "died. Worker exit type: SYSTEM_ERROR Worker exit detail: killed by SIGKILL")
    # the text Ray writes for a system-level death (ActorDiedErrorContext)
    reason = worker_failure(type("Died", (ActorDiedError,), {"__str__": lambda self: text})())
    assert reason.startswith("worker died on node 10.0.0.7 (pid 4321): Died: The actor is dead")
    assert "killed by SIGKILL" in reason
    placed = type("Died", (ActorDiedError,), {"__str__": lambda self: text})()
    placed.rankopt_location = "worker-vm"  # Tune's placement of the trial wins
    assert worker_failure(placed).startswith("worker died on node worker-vm (pid 4321)")
    assert worker_failure(None) == "worker died: the Ray worker ended without reporting a result"
