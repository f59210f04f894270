"""A tiny study with the latency objective measured in ONNX Runtime, and the CLI paths
that take its models to ONNX/TorchScript (from the run directory and from a picked file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import rankopt
from rankopt.deploy.artifacts import load_compressed, read_compressed
from rankopt.cli import main
from rankopt.results.reading import StudyResult
from study_support import small_study

pytest.importorskip("onnxruntime", reason="the deploy extra (pip install -e '.[deploy]') is not installed")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("latency")
    study_file = base / "lat.yaml"
    latency = {"runtime": "onnxruntime", "batch": 4, "threads": 1, "rounds": 5}
    study_file.write_text(yaml.safe_dump(small_study("lat", **{
        "model": {"name": "small_cnn", "kwargs": {"width": 16}}, "data": {"name": "digits", "batch_size": 128},
        "selectors": {"fixed": {"fraction": {"low": 0.2, "high": 0.6}}}, "latency": latency, "trials": 3,
        "strategies": {"finetune": {"epochs": 0.1, "lr": 0.02}}, "objectives": ["accuracy", "latency"],
        "keep_faster_layers": True, "sampler": {"name": "random", "seed": 2}, "device": "cpu"})))
    out = base / "run"
    assert main(["run", str(study_file), "--run-dir", str(out), "--quiet"]) == 0
    return out


def test_latency_objective_stores_ms_and_the_ratio(run_dir: Path) -> None:
    result = StudyResult(run_dir)
    trials = result.trials()
    assert len(trials) == 3
    for t in result.study.trials:
        metrics = json.loads((run_dir / "trials" / str(t.number) / "metrics.json").read_text())
        assert metrics["latency_runtime"] == "onnxruntime" and metrics["latency_batch"] == 4
        assert metrics["latency_ms"] > 0 and metrics["latency_reference_ms"] > 0
        assert metrics["latency_ratio"] == pytest.approx(metrics["latency_ms"] / metrics["latency_reference_ms"])
        # the second objective is the ratio to the reference timed in the same loop
        assert t.values[1] == pytest.approx(metrics["latency_ratio"])
        assert t.user_attrs["latency_ratio"] == pytest.approx(metrics["latency_ratio"])
    ref = json.loads((run_dir / "reference" / "metrics.json").read_text())
    assert ref["latency_ms"] > 0 and ref["latency_runtime"] == "onnxruntime"
    # keep_faster_layers measured each layer form once, cached in the run directory
    cached = list((run_dir / "cache" / "latency").glob("*.json"))
    assert cached and all({"original_s", "decomposed_s"} <= set(json.loads(p.read_text())) for p in cached)


def test_thin_stem_stays_dense_by_default(run_dir: Path) -> None:
    # digits images have 1 channel: conv 0 (the stem) is never compressed, others are
    for rec in StudyResult(run_dir).trials():
        assert "0" not in rec.spec
    assert any(rec.spec for rec in StudyResult(run_dir).trials())


def test_pareto_shows_latency_and_speedup(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pareto", str(run_dir), "--format", "csv"]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert "latency_ms" in header.split(",") and "speedup" in header.split(",")
    assert main(["pareto", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "ms" in out


def test_report_summary_shows_latency_and_speedup(run_dir: Path, tmp_path: Path) -> None:
    from rankopt.results.report import write_report

    files = write_report(StudyResult(run_dir), out_dir=tmp_path)
    summary = next(f for f in files if f.name == "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| trial"))
    assert "latency_ms" in header and "speedup" in header
    assert "ms in onnxruntime" in summary  # the reference's latency in the baseline line


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_from_the_run_directory(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    trial = StudyResult(run_dir).front()[0].trial
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run_dir), "--trial", str(trial), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "largest |difference| from PyTorch on 32 validation images" in printed
    diff = float(printed.split("validation images: ")[1].split()[0])
    assert diff <= 1e-4


def test_pick_fold_bn_then_export_the_picked_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trial = StudyResult(run_dir).front()[0].trial
    picked = tmp_path / "picked.pt"
    assert main(["pick", str(run_dir), "--trial", str(trial), "--out", str(picked), "--fold-bn"]) == 0
    assert read_compressed(picked)["metadata"]["fold_bn"] is True
    folded = load_compressed(picked)
    plain = StudyResult(run_dir).load_model(trial)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), atol=1e-5, rtol=0)
    capsys.readouterr()
    out = tmp_path / "picked.onnx"
    assert main(["export", str(picked), "--format", "onnx", "--out", str(out), "--data", str(run_dir)]) == 0
    assert out.is_file() and "validation images" in capsys.readouterr().out
    out_ts = tmp_path / "picked.ts"
    assert main(["export", str(picked), "--format", "torchscript", "--out", str(out_ts)]) == 0
    assert out_ts.is_file() and "seeded random inputs" in capsys.readouterr().out


def test_export_above_tolerance_exits_1_and_writes_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import rankopt.deploy.exporting as export_mod

    real = export_mod.run_exported
    monkeypatch.setattr(export_mod, "run_exported", lambda *a, **k: real(*a, **k) + 0.5)
    out = tmp_path / "model.onnx"
    trial = StudyResult(run_dir).front()[0].trial
    assert main(["export", str(run_dir), "--trial", str(trial), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ExportError" in err and "above the tolerance" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--format", "onnx"], "say which trial with --trial N"),
        (["--trial", "0", "--format", "tflite"], "--format must be one of ['onnx', 'torchscript'], got 'tflite'"),
        (["--trial", "0", "--tolerance", "-1"], "--tolerance must be a positive number, got -1.0"),
    ],
)
def test_export_usage_errors_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_export_is_public() -> None:
    assert {"export", "fold_batchnorm", "ExportError"} <= set(rankopt.__all__)
    assert rankopt.export.__module__ == "rankopt.deploy.exporting"


@pytest.mark.parametrize("fold_bn", [False, True])
def test_pick_keep_faster_writes_the_slower_layers_dense(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fold_bn: bool
) -> None:
    import rankopt.compression.latency as latency

    result = StudyResult(run_dir)
    record = next(r for r in result.trials() if r.spec)  # a trial with decomposed layers
    spec = dict(record.spec)
    slow = sorted(spec)[0]
    seen: dict = {}

    def fake(model, spec, layers, **options):  # timings are the machine's: name the slower layer
        seen.update(options)
        return {k: v for k, v in spec.items() if k != slow}, {slow: "kept full: measured slower"}

    monkeypatch.setattr(latency, "keep_faster_layers", fake)
    picked = tmp_path / "faster.pt"
    args = ["pick", str(run_dir), "--trial", str(record.trial), "--out", str(picked), "--keep-faster"]
    assert main(args + (["--fold-bn"] if fold_bn else [])) == 0
    out = capsys.readouterr().out
    assert f"{slow}: kept full: measured slower" in out
    assert f"--keep-faster: 1 of {len(spec)} decomposed layers written dense (timed in onnxruntime at batch 4)" in out
    assert seen["runtime"] == "onnxruntime" and seen["batch"] == 4  # the study's latency section
    payload = read_compressed(picked)
    assert slow not in payload["spec"] and payload["metadata"]["dense_again"] == [slow]
    assert bool(payload["metadata"].get("fold_bn")) is fold_bn
    faster, plain = load_compressed(picked), result.load_model(record.trial)
    if not fold_bn:
        assert isinstance(faster.get_submodule(slow), torch.nn.Conv2d)
        # the summary line names what the file holds, not the trial's figures before densifying
        joined = " ".join(out.split())
        assert f"{rankopt.count(faster, (1, 1, 8, 8)).params:,} params (" in joined
        assert "with the slower layers dense (the trial:" in joined
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(faster(x), plain(x), atol=1e-5, rtol=1e-5)
    assert rankopt.count(faster, (1, 1, 8, 8)).params > rankopt.count(plain, (1, 1, 8, 8)).params


def test_pick_keep_faster_measures_for_real(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = StudyResult(run_dir)
    record = next(r for r in result.trials() if r.spec)
    picked = tmp_path / "faster.pt"
    assert main(["pick", str(run_dir), "--trial", str(record.trial), "--out", str(picked), "--keep-faster"]) == 0
    assert "decomposed layers written dense (timed in onnxruntime at batch 4)" in capsys.readouterr().out
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(picked)(x), result.load_model(record.trial)(x), atol=1e-5, rtol=1e-5)
