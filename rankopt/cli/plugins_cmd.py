"""`rankopt plugins`: what is installed, from where, and whether it loaded."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from rankopt.cli.app import app, console

FORMATS = ("table", "json")


@app.command("plugins")
def plugins_command(
    target: str | None = typer.Argument(
        None, metavar="NAME_OR_DIST",
        help="With --check: check only the plugin or distribution of this name.",
    ),
    check: bool = typer.Option(
        False, "--check", help="Run the contract checks of rankopt.testing on every plugin "
        "(or only NAME_OR_DIST); progress on stderr, a summary line at the end."
    ),
    format: str = typer.Option("table", "--format", help="Output format: table or json."),
    family: list[str] = typer.Option(
        [], "--family", help="List only this family in full (decomposers, rank_selectors, "
        "strategies, models, datasets); repeatable. With --check: check only it (default: "
        "decomposers, rank selectors and strategies).",
    ),
) -> None:
    """List the decomposers, rank selectors, strategies, models and datasets that are installed."""
    import json

    from rankopt.core.errors import ConfigError
    from rankopt.contract.manager import FAMILIES, get_registry

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {format!r}")
    unknown = [f for f in family if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"--family must be one of {list(FAMILIES)}, got {unknown[0]!r}")
    if target is not None and not check:
        raise ConfigError(f"NAME_OR_DIST ({target!r}) only applies with --check; add --check or drop it")
    reg = get_registry()
    rows = [
        {
            "family": FAMILIES[p.family].label,
            "name": p.record.name,
            "distribution": p.source.distribution,
            "version": p.source.version,
            "description": p.record.summary,
        }
        for key in FAMILIES
        if not family or key in family
        for p in reg.provided(key)
    ]
    failures = [
        {
            "plugin": f.plugin,
            "distribution": f.distribution,
            "version": f.version,
            "stage": f.stage,
            "reason": f.reason,
        }
        for f in reg.failures
    ]
    conflicts = [
        {
            "family": FAMILIES[k].label,
            "name": n,
            "providers": [f"{s.plugin} ({s.distribution} {s.version})".replace(" )", ")") for s in srcs],
        }
        for k, n, srcs in reg.conflicts()
    ]
    checks = None
    if check:
        from rankopt.cli.app import err_console
        from rankopt.testing import CHECKED_FAMILIES, check_installed_plugins

        def progress(fam: str, name: str, dist: str) -> None:  # on stderr: JSON stays parseable
            err_console.print(f"checking {fam} {escape(name)} ({escape(dist)}) ...", highlight=False)

        checks = check_installed_plugins(tuple(family) or CHECKED_FAMILIES, only=target, progress=progress)
        failed = sum(not r["passed"] for r in checks)
        summary = f"{len(checks)} checks, {failed} failed, {sum(r['skipped'] for r in checks)} skipped"
    if format == "json":
        out = {"plugins": rows, "failures": failures, "conflicts": conflicts}
        if checks is not None:
            out["checks"] = checks
            out["summary"] = summary
        console.print_json(json.dumps(out))
    else:
        table = Table(title="rankopt plugins")
        listed = _compact(rows) if not family else rows
        cols = ["family", "name", "distribution", "version"]

        def width(names: list[str]) -> int:
            return sum(max([len(c)] + [len(str(r[c])) for r in listed]) + 3 for c in names)

        # the listing is one line a plugin: at a narrow terminal the distribution and
        # version go (--format json keeps them) and the description is cut with "…"
        narrow = not family and width(cols) + 34 > console.width
        if narrow:
            cols = ["family", "name"]
        for col in cols:
            table.add_column(col, overflow="fold")  # wrap, never cut off a name
        table.add_column("description", overflow="fold" if family else "ellipsis", no_wrap=not family,
                         max_width=None if family else max(12, console.width - width(cols) - 4))
        for r in listed:
            cells = [str(r[c]) for c in (*cols, "description")]
            if not family and len(cells[-1]) > DESCRIPTION_CHARS:  # `--family`/json: whole
                cells[-1] = cells[-1][: DESCRIPTION_CHARS - 3] + "..."
            table.add_row(*(escape(c) for c in cells))
        if narrow:
            table.caption = "distribution and version: rankopt plugins --format json"
        console.print(table)
        for c in conflicts:
            console.print(
                f"[red]conflict:[/red] {c['family']} {escape(repr(c['name']))} is claimed by "
                + escape(" and ".join(c["providers"]))
                + f"; uninstall one of them; if you wrote one, rename your {c['family']}",
                soft_wrap=True,
            )
        for f in reg.failures:
            console.print(f"[red]failed:[/red] {escape(str(f))}", soft_wrap=True)
        if checks is not None:
            ct = Table(title="contract checks")
            for col in ("family", "name", "distribution", "check", "result"):
                ct.add_column(col, overflow="fold")
            for r in checks:
                result = ("[yellow]skip[/yellow] " if r["skipped"] else "[green]pass[/green] " if r["passed"]
                          else "[red]FAIL[/red] ") + escape(r["reason"] if r["skipped"] or not r["passed"] else "")
                ct.add_row(*(escape(str(r[c])) for c in ("family", "name", "distribution", "check")), result.strip())
            console.print(ct)
            console.print(summary, highlight=False)
    if checks is not None and not all(r["passed"] for r in checks):
        raise typer.Exit(1)


DESCRIPTION_CHARS = 60  # the default listing keeps one short line per plugin
COLLAPSED = ("model",)  # families too long to list by default (the model zoo)


def _compact(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The default listing: every plugin, except that a collapsed family's many entries
    become one row per distribution (``--family models`` lists them)."""
    out: list[dict[str, str]] = []
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r["family"] in COLLAPSED:
            groups.setdefault((r["family"], r["distribution"], r["version"]), []).append(r["name"])
        else:
            out.append(r)
    for (fam, dist, version), names in groups.items():
        if len(names) <= 3:
            out += [r for r in rows if r["family"] == fam and r["distribution"] == dist]
            continue
        out.append({
            "family": fam, "name": f"{len(names)} {fam}s", "distribution": dist, "version": version,
            "description": f"rankopt plugins --family {fam}s lists them ({names[0]}, ...)",
        })
    return out
