"""docs/own-model.md, run as written: its files are written into an empty folder and its
commands run there in order (a module beside a study file, a torchvision ViT, export)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rankopt.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"
FILE_BLOCK = re.compile(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", re.S)
CODE_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def page_files() -> dict[str, str]:
    return {path: body for path, body in FILE_BLOCK.findall(PAGE.read_text())}


def page_commands() -> list[str]:
    return [line.strip() for lang, body in CODE_BLOCK.findall(PAGE.read_text()) if lang == "bash"
            for line in body.splitlines() if line.strip().startswith("rankopt ")]


def test_the_page_has_the_journey() -> None:
    files, commands = page_files(), page_commands()
    assert {"myproject/mynet.py", "myproject/study.yaml", "myproject/tinyvit.py", "myproject/vit.yaml"} <= set(files)
    assert "rankopt export runs/mine --trial 0 --out mine.onnx" in commands
    assert "## Transformers and attention" in PAGE.read_text()


@pytest.mark.slow
def test_the_page_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    for path, body in page_files().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    monkeypatch.chdir(tmp_path)
    for command in page_commands():
        assert main(shlex.split(command)[1:]) == 0, command
    for name in ("mine.onnx", "mine-picked.onnx", "vit.onnx", "myproject/mine.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    # the Python snippet that loads the picked file
    snippet = next(body for lang, body in CODE_BLOCK.findall(PAGE.read_text())
                   if lang == "python" and "load_compressed(\"myproject/mine.pt\"" in body)
    scope: dict = {}
    exec(compile(snippet, "own-model.md", "exec"), scope)
    import torch

    model = scope["model"]
    assert type(model) is torch.nn.Sequential
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
