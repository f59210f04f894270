"""The README and docs/ say only what the code does: every ``rankopt`` command line in their
code blocks names a real command and real options, and the journeys run as written
(cheaply: fewer trials and epochs, in a temporary folder)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_PAGES = {"studies", "own-model", "picking-and-deploying", "scale-out", "plugins", "methods",
             "troubleshooting", "security"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def code_blocks(page: Path, *languages: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if not languages or lang in languages]


def command_lines(page: Path) -> list[str]:
    """The ``rankopt ...`` lines of a page's shell blocks (YAML and Python blocks are not shell)."""
    lines = []
    for body in code_blocks(page, "bash", "sh", "console", "shell", ""):
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if re.match(r"^(\S*/)?rankopt\s", line):
                lines.append(line)
    return lines


def _commands() -> dict[str, set[str]]:
    """Every command of the CLI and the option names it takes (click's own parser)."""
    import typer.main

    from rankopt.cli import app

    group = typer.main.get_command(app)
    root = {opt for p in group.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    return {
        name: root | {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        for name, cmd in group.commands.items()  # type: ignore[attr-defined]
    }


def test_the_docs_pages_exist_and_the_readme_is_short() -> None:
    assert {p.stem for p in PAGES if p.parent.name == "docs"} >= DOC_PAGES
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    for page in DOC_PAGES:  # the README links every page
        assert f"docs/{page}.md" in (ROOT / "README.md").read_text(), page


def test_every_command_in_the_docs_is_a_real_command_with_real_options() -> None:
    commands = _commands()
    checked = 0
    for page in PAGES:
        for line in command_lines(page):
            words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))
            command = next((w for w in words[1:] if not w.startswith("-")), None)
            assert command in commands, f"{page.name}: {line!r} names no rankopt command"
            for word in words[1:]:
                option = word.split("=", 1)[0]
                if option.startswith("--"):
                    assert option in commands[command], f"{page.name}: `rankopt {command}` has no {option}: {line!r}"
            checked += 1
    assert checked >= 25  # the check reads the pages (a parse that finds nothing would pass)


def test_the_command_check_catches_a_wrong_option() -> None:
    commands = _commands()
    assert "--max-params" in commands["pick"] and "--max-parms" not in commands["pick"]
    assert "--fold-bn" in commands["export"] and "--no-fold-bn" in commands["export"]


def test_every_relative_link_in_the_docs_resolves() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def _cli(*args: str) -> None:
    from rankopt.cli import main

    code = main(list(args))
    assert code == 0, f"rankopt {' '.join(args)} exited {code}"


# the README's tour with a study small enough for a test: 2 trials, 1 epoch each
CHEAP = ("--trials", "2", "--set", "reference.epochs=2", "--set", "strategies.finetune.epochs=1",
)


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tour = [line for line in command_lines(ROOT / "README.md") if "studies/quickstart.yaml" in line
            or "runs/quickstart" in line or "small.pt" in line]
    assert [shlex.split(t)[1] for t in tour] == ["run", "status", "pareto", "report", "inspect", "pick", "export"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").symlink_to(ROOT / "studies")
    for line in tour:
        args = shlex.split(line)[1:]
        if args[0] == "run":
            args += [*CHEAP, "--quiet"]
        if args[0] == "pick":  # the cheap front has no 15,000-param model: the most accurate one
            i = args.index("--max-params")
            args[i:i + 2] = ["--min-accuracy", "0"]
        _cli(*args)
    assert (tmp_path / "small.pt").is_file() and (tmp_path / "model.onnx").is_file()
    assert (tmp_path / "runs" / "quickstart" / "report" / "summary.md").is_file()


@pytest.mark.slow
def test_the_own_model_page_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (block,) = [b for b in code_blocks(ROOT / "docs" / "own-model.md", "python") if "class MyNet" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "own_model_page"}
    exec(compile(block, "docs/own-model.md", "exec"), namespace)  # noqa: S102 - our own page
    assert (tmp_path / "runs" / "mynet" / "optuna.db").is_file()
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert printed and all(0.0 <= float(acc) <= 1.0 and int(params) > 0 for _, acc, params in printed)
