"""``screening``: the no-fine-tune proxy that picks the search's first points."""

from __future__ import annotations

import json
from typing import Any

import pytest

import rankopt
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from rankopt.results.reading import pareto_front_2d
from rankopt.search import screening
from rankopt.search.screening import spread_along_front
from study_support import RANDOM, small_study


def study_dict(tmp_path: Any, **changes: Any) -> dict[str, Any]:
    # 0 epochs: a trial's accuracy is then exactly the proxy's (nothing is trained); no
    # seed proposals: the screened points are then the first trials
    changes = {"reference": {"epochs": 2, "lr": 0.05}, "decomposers": ["tucker2", "svd"],
               "selectors": {"fixed": {"space": {"per_layer": True}}, "energy": {}},
               "strategies": {"finetune": {"epochs": 0}}, "screening": {"candidates": 12, "keep": 3},
               "seed_proposals": False, "trials": 3, "sampler": RANDOM, **changes}
    return small_study("screened", tmp_path, **changes)


def test_spread_along_front_takes_both_ends_and_the_middle_of_the_front() -> None:
    # (accuracy, cost); index 3 and 5 are dominated
    points = [(0.10, 1.0), (0.50, 10.0), (0.80, 40.0), (0.40, 50.0), (0.90, 1000.0), (0.05, 5.0)]
    assert spread_along_front(points, 3) == [0, 2, 4]
    assert spread_along_front(points, 10) == [0, 1, 2, 4]  # the whole front, by cost
    assert spread_along_front(points, 1) == [0]
    assert spread_along_front([], 3) == []


@pytest.mark.parametrize(
    ("screening_value", "message"),
    [
        ({"candidates": 4, "keep": 5}, r"keep \(5\) must be <= candidates \(4\)"),
        ({"candidates": 0}, "screening.candidates"),
        ({"candidates": 10, "keep": 0}, "screening.keep"),
        ({"candidates": 10, "kept": 2}, "kept"),
    ],
)
def test_bad_screening_options_name_the_field(tmp_path: Any, screening_value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(study_dict(tmp_path, screening=screening_value))


def test_screened_points_run_first_and_their_accuracy_is_the_proxys(tmp_path: Any) -> None:
    result = rankopt.run_study(study_dict(tmp_path), progress=False)
    report = json.loads((tmp_path / "run" / "screening.json").read_text())
    assert report["cost"] == "params"
    candidates = report["candidates"]
    assert len(candidates) == 12
    done = [c for c in candidates if c["accuracy"] is not None]
    assert len(done) == 12
    # the kept candidates lie on the proxy's (accuracy, params) front, cheapest first
    front = {done[i]["number"] for i in pareto_front_2d([(c["accuracy"], c["params"]) for c in done])}
    kept = report["kept_candidates"]
    assert len(kept) == 3 and set(kept) <= front
    params_of = {c["number"]: c["params"] for c in candidates}
    assert [params_of[n] for n in kept] == sorted(params_of[n] for n in kept)
    # the search's first trials are exactly the kept points, with the strategy's defaults
    records = {r.trial: r for r in result.trials()}
    by_number = {c["number"]: c for c in candidates}
    for trial, number in enumerate(kept):
        assert records[trial].params == by_number[number]["params"]
        assert records[trial].flops == by_number[number]["flops"]
        assert records[trial].accuracy == pytest.approx(by_number[number]["accuracy"], abs=1e-12)
    first = sorted(result.study.trials, key=lambda t: t.number)[0]
    assert first.params["finetune.lr"] == 0.01  # the strategy's default, not a screened draw
    for key, value in report["kept"][0].items():
        assert first.params[key] == value


def test_a_rerun_does_not_screen_again(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config = study_dict(tmp_path, trials=2, screening={"candidates": 4, "keep": 2})
    rankopt.run_study(config, progress=False)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("screening ran again on a study that has trials")

    monkeypatch.setattr(screening, "screen", fail)
    result = rankopt.run_study({**config, "trials": 3}, progress=False)
    assert len(result.trials()) == 3


def test_a_failing_candidate_is_recorded_and_skipped(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from rankopt.training.trial import LocalTrialContext

    real = LocalTrialContext.compress
    calls = {"n": 0}

    def flaky(self: Any, model: Any, spec: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second candidate breaks
            raise RuntimeError("decomposition broke")
        return real(self, model, spec)

    monkeypatch.setattr(LocalTrialContext, "compress", flaky)
    rankopt.run_study(study_dict(tmp_path, trials=1, screening={"candidates": 5, "keep": 2}),
                      progress=False)
    report = json.loads((tmp_path / "run" / "screening.json").read_text())
    failed = [c for c in report["candidates"] if c["accuracy"] is None]
    assert [c["number"] for c in failed] == [1]
    assert failed[0]["reason"] == "RuntimeError: decomposition broke"
    assert 1 not in report["kept_candidates"]


def test_screening_is_skipped_when_the_enqueued_points_fill_the_trials(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    points = [{"selector": "energy", "energy.p": p} for p in (0.6, 0.9)]
    with caplog.at_level("WARNING", logger="rankopt.study"):
        result = rankopt.run_study(study_dict(tmp_path, trials=2, enqueue=points), progress=False)
    assert not (tmp_path / "run" / screening.SCREENING_FILE).exists()
    assert [t.params["energy.p"] for t in result.study.trials] == [0.6, 0.9]
    assert "screening skipped: the enqueued points and proposals already fill the 2 trials" in caplog.text
    # one trial short of full: it screens and its best point runs third
    result = rankopt.run_study(study_dict(tmp_path / "b", trials=3, enqueue=points), progress=False)
    assert (tmp_path / "b" / "run" / screening.SCREENING_FILE).is_file() and len(result.study.trials) == 3
