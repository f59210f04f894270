"""Study files: validation before any work, with errors naming the field, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rankopt.cli import main
from rankopt.config.schema import Choices, Range, StudyConfig, load_config
from rankopt.core.errors import ConfigError
from rankopt.study import Study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


def tiny(**changes: object) -> dict:
    base = {
        "name": "tiny",
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits"},
        "reference": {"epochs": 1},
        "decomposers": ["tucker2", "svd"],
        "selectors": {"energy": {"p": {"low": 0.6, "high": 0.95}}},
        "strategies": {"finetune": {"epochs": 0.25, "lr": 0.02}},
        "trials": 2,
    }
    base.update(changes)
    return base


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    return str(info.value)


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_shipped_study_files_load_and_say_what_they_are(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must start with a comment saying what it reproduces"
    config = load_config(path, check_paths=False)
    assert config.name == path.stem
    assert config.trials is not None or config.timeout is not None


def test_quickstart_file_is_what_make_quickstart_runs() -> None:
    config = load_config(ROOT / "studies" / "quickstart.yaml")
    assert config.data.name == "digits" and config.model is not None and config.model.name == "small_cnn"
    assert set(config.decomposers) == {"tucker2", "svd"}
    assert set(config.selectors) == {"energy", "fixed"}
    assert list(config.strategies) == ["finetune"]
    assert config.trials is not None and config.trials >= 20
    assert config.resolved_run_dir() == Path("runs") / "quickstart"


def test_values_are_fixed_or_ranges_or_choices() -> None:
    raw = tiny(strategies={"finetune": {"epochs": 1, "lr": {"low": "1e-3", "high": 0.1, "log": True},
                                        "optimizer": {"choices": ["sgd", "adam"]}}})
    config = load_config(raw)
    from rankopt.config.schema import parse_param_value

    params = config.strategies["finetune"]
    assert parse_param_value(params["epochs"], "x") == 1
    lr = parse_param_value(params["lr"], "x")
    assert isinstance(lr, Range) and lr.low == pytest.approx(1e-3) and lr.log and not lr.is_int
    assert isinstance(parse_param_value(params["optimizer"], "x"), Choices)
    assert parse_param_value({"low": 1, "high": 4}, "x").is_int
    # YAML reads 1e-3 (no dot) as text: a fixed value still means the number
    assert parse_param_value("1e-3", "x") == pytest.approx(1e-3)


def test_unknown_strategy_names_the_field_and_the_known_ones() -> None:
    msg = error_of(tiny(strategies={"nrmff": {}}))
    assert msg.startswith("strategies: unknown strategy 'nrmff'")
    assert "known strategies are" in msg and "'admm'" in msg and "'finetune'" in msg


@pytest.mark.parametrize(
    "field, raw",
    [
        ("decomposers[1]", tiny(decomposers=["tucker2", "tucker3"])),
        ("selectors", tiny(selectors={"energyy": {}})),
    ],
)
def test_unknown_plugin_names(field: str, raw: dict) -> None:
    msg = error_of(raw)
    assert msg.startswith(f"{field}: unknown")
    assert "known" in msg


def test_out_of_range_p_names_field_value_and_interval() -> None:
    msg = error_of(tiny(selectors={"energy": {"p": 1.5}}))
    assert msg.startswith("selectors.energy.p: 1.5")
    assert "(0, 1]" in msg
    # the ends of a range are checked too
    msg = error_of(tiny(selectors={"energy": {"p": {"low": 0.5, "high": 1.2}}}))
    assert msg.startswith("selectors.energy.p: 1.2") and "(0, 1]" in msg


def test_unknown_parameter_names_fail_never_dropped() -> None:
    msg = error_of(tiny(strategies={"finetune": {"epochs": 1, "learning_rate": 0.1}}))
    assert "strategies.finetune" in msg and "learning_rate" in msg and "'lr'" in msg
    msg = error_of(tiny(selectors={"energy": {"q": 0.9}}))
    assert "selectors.energy" in msg and "'q'" in msg and "'p'" in msg


def test_unknown_objective_lists_the_allowed_ones() -> None:
    msg = error_of(tiny(objectives=["accuracy", "size"]))
    assert msg.startswith("objectives.1: 'size' is not allowed")
    for allowed in ("'accuracy'", "'params'", "'flops'", "'latency'"):
        assert allowed in msg


def test_unknown_keys_are_errors_with_the_allowed_keys() -> None:
    msg = error_of(tiny(trails=5))
    assert msg.startswith("trails: unknown key") and "'trials'" in msg
    msg = error_of(tiny(sampler={"name": "nsgaii", "sed": 1}))
    assert msg.startswith("sampler.sed: unknown key") and "'seed'" in msg


def test_missing_data_path_names_the_field_and_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.npz")
    msg = error_of(tiny(data={"name": "npz", "kwargs": {"train": missing, "val": missing}}))
    assert msg.startswith("data.kwargs.train: path") and missing in msg and "does not exist" in msg


@pytest.mark.parametrize(
    "changes, where",
    [
        ({"model": {"name": "small_cnn", "kwargs": {"widht": 8}}}, "model.kwargs"),
        ({"trials": 0}, "trials"),
        ({"backend": "dask"}, "backend"),
        ({"device": "gpu"}, "device"),
        ({"reference": {"weights": "w.pt", "epochs": 3}}, "reference"),
        ({"strategies": {"finetune": {"lr": {"low": 0.1, "high": 0.01}}}}, "strategies.finetune.lr"),
        ({"strategies": {"finetune": {"epochs": -1}}}, "strategies.finetune.epochs"),
        ({"train": {"momentum": 0.9, "lr": 0.1}}, "train"),
        ({"enqueue": [{"bogus.x": 1}]}, "enqueue[0].bogus.x"),
        ({"selectors": {"fixed": {"space": {"per_layerr": True}}}}, "selectors.fixed.space"),
    ],
)
def test_other_bad_values_name_their_field(changes: dict, where: str) -> None:
    assert error_of(tiny(**changes)).startswith(where)


def test_bad_study_fails_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="sampler.options"):
        Study(tiny(sampler={"name": "nsgaii", "options": {"popsize": 4}}), run_dir=str(run_dir)).run()
    with pytest.raises(ConfigError, match=r"enqueue\[0\].energy.p: 1.5 is not allowed"):
        Study(tiny(enqueue=[{"energy.p": 1.5}]), run_dir=str(run_dir)).run()
    with pytest.raises(ConfigError, match="targets"):
        Study(tiny(targets={"include": ["nothing*"]}), run_dir=str(run_dir)).run()
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"strategies": {"nrmff": {}}}, "unknown strategy 'nrmff'"),
        ({"selectors": {"energy": {"p": 1.5}}}, "selectors.energy.p: 1.5"),
        ({"objectives": ["accuracy", "size"]}, "objectives.1: 'size'"),
        ({"data": {"name": "npz", "kwargs": {"train": "/no/such.npz", "val": "/no/such.npz"}}},
         "data.kwargs.train: path '/no/such.npz' does not exist"),
    ],
)
def test_cli_run_exits_2_with_one_line_and_no_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, needle: str
) -> None:
    study_file = tmp_path / "bad.yaml"
    study_file.write_text(yaml.safe_dump(tiny(**changes)))
    run_dir = tmp_path / "run"
    code = main(["run", str(study_file), "--run-dir", str(run_dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not run_dir.exists()


def test_study_config_round_trips_through_yaml() -> None:
    from rankopt.config.schema import config_to_yaml

    config = load_config(tiny())
    again = load_config(yaml.safe_load(config_to_yaml(config)))
    assert isinstance(again, StudyConfig) and again == config


SAMPLE_SHAPES = {"quickstart": (1, 8, 8), "mnist_lenet5": (1, 28, 28),
                 "cifar10_resnet18": (3, 32, 32), "cifar10_vgg19": (3, 32, 32)}


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_shipped_enqueued_proposals_fit_their_search_space(path: Path) -> None:
    import rankopt
    from rankopt.search.space import SearchSpace

    config = load_config(path, check_paths=False)
    shape = SAMPLE_SHAPES[config.name]
    assert config.model is not None
    model = rankopt.model(config.model.name, num_classes=10, in_channels=shape[0], **config.model.kwargs)
    targets = rankopt.find_layers(model, (1, *shape), include=config.targets.include,
                                  exclude=config.targets.exclude)
    space = SearchSpace(config, model, targets)
    for i, point in enumerate(config.enqueue):
        checked = space.check_point(point, f"enqueue[{i}]")
        plan = space.plan(checked)
        assert plan.strategy in config.strategies and plan.selector in config.selectors


def test_train_block_values_are_checked_at_load_time() -> None:
    load = load_config
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml").read_text())
    for train, field in (({"grad_clip": -1.0}, "train.grad_clip"), ({"momentum": 2}, "train.momentum"),
                         ({"optimizer": "rmsprop"}, "train.optimizer")):
        with pytest.raises(ConfigError, match=field):
            load({**base, "train": train})
    assert load({**base, "train": {"optimizer": "adam", "grad_clip": 1.0}}).train["optimizer"] == "adam"


def test_default_sampler_is_multivariate_group_tpe_and_options_override_it() -> None:
    import warnings

    import optuna

    from rankopt.search.sampler import make_sampler

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rankopt's own defaults raise no experimental notice
        sampler = make_sampler(load_config(tiny()))
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert (sampler._multivariate, sampler._group) == (True, True)
    plain = make_sampler(load_config(tiny(sampler={"options": {"multivariate": False, "group": False}})))
    assert (plain._multivariate, plain._group) == (False, False)
    # the same seed proposes the same first points
    study_a = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(load_config(tiny())))
    study_b = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(load_config(tiny())))
    assert [study_a.ask().suggest_float("x", 0, 1) for _ in range(3)] == [
        study_b.ask().suggest_float("x", 0, 1) for _ in range(3)
    ]
