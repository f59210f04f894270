"""`rankopt plugins`: what is installed, from where, and whether it loaded."""

from __future__ import annotations

import typer
from rich.table import Table

from rankopt.cli.app import app, console

FORMATS = ("table", "json")


@app.command("plugins")
def plugins_command(
    check: bool = typer.Option(
        False, "--check", help="Run the contract checks of rankopt.testing on every plugin."
    ),
    format: str = typer.Option("table", "--format", help="Output format: table or json."),
) -> None:
    """List the decomposers, rank selectors, strategies, models and datasets that are installed."""
    import json

    from rankopt.errors import ConfigError
    from rankopt.manager import FAMILIES, get_registry

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {format!r}")
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
        {"family": FAMILIES[k].label, "name": n, "providers": [s.plugin for s in srcs]}
        for k, n, srcs in reg.conflicts()
    ]
    checks = None
    if check:
        from rankopt.testing import check_installed_plugins

        checks = check_installed_plugins()
    if format == "json":
        out = {"plugins": rows, "failures": failures, "conflicts": conflicts}
        if checks is not None:
            out["checks"] = checks
        console.print_json(json.dumps(out))
    else:
        table = Table(title="rankopt plugins")
        for col in ("family", "name", "distribution", "version", "description"):
            table.add_column(col)
        for r in rows:
            table.add_row(*(str(r[c]) for c in ("family", "name", "distribution", "version", "description")))
        console.print(table)
        for c in conflicts:
            console.print(
                f"[red]conflict:[/red] {c['family']} {c['name']!r} is claimed by "
                + " and ".join(c["providers"])
            )
        for f in reg.failures:
            console.print(f"[red]failed:[/red] {f}")
        if checks is not None:
            ct = Table(title="contract checks")
            for col in ("family", "name", "distribution", "check", "result"):
                ct.add_column(col)
            for r in checks:
                ct.add_row(r["family"], r["name"], r["distribution"], r["check"],
                           "[green]pass[/green]" if r["passed"] else f"[red]FAIL[/red] {r['reason']}")
            console.print(ct)
    if checks is not None and not all(r["passed"] for r in checks):
        raise typer.Exit(1)
