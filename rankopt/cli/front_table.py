"""The Pareto-front table of ``rankopt run`` and ``rankopt pareto``, fitted to the terminal."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from rankopt.cli.app import console


def print_front(records: list[Any], title: str, *, ranks: bool = False,
                 test: dict[int, float] | None = None) -> None:
    """The front as a table: compact by default (layers compressed), per-layer ranks with
    ``ranks``; the searched values as columns; test accuracies when measured."""
    from rankopt.results.report import fmt_value, front_table_rows

    rows = front_table_rows(records, test or None)
    fixed = {"trial", "accuracy", "test_accuracy", "params", "flops", "params_compression",
             "flops_compression", "strategy", "selector", "ranks", "latency_ms", "speedup",
             "fidelity", "train_epochs"}
    searched = [c for c in (rows[0] if rows else {}) if c not in fixed]
    timed = bool(rows) and "latency_ms" in rows[0]  # latency columns only when measured
    staged = any(row.get("fidelity") for row in rows)  # multi_fidelity promoted some model
    caption = ("accuracy: validation (what the search optimized); test acc: held-out test split"
               if test else "accuracy: validation (what the search optimized); "
               "held-out accuracy: `rankopt evaluate`")
    heads = ["trial", "accuracy"] + (["test acc"] if test else []) + [
        "params", "FLOPs", "params x", "FLOPs x"] + (["ms", "speed-up"] if timed else []) + [
        "strategy", "selector"] + (["fidelity", "epochs"] if staged else []) + searched
    body = []
    for row in rows:
        summary = row["ranks"]
        cells = [str(row["trial"]), f"{row['accuracy']:.4f}"]
        if test:
            cells.append(fmt_value("test_accuracy", row.get("test_accuracy")))
        cells += [f"{row['params']:,}", f"{row['flops']:,}", f"{row['params_compression']:.2f}",
                  f"{row['flops_compression']:.2f}"]
        if timed:
            cells += [f"{row['latency_ms']:.3f}", f"{row['speedup']:.2f}"]
        cells += [row["strategy"], row["selector"]]
        if staged:
            cells += [str(row["fidelity"]), f"{row['train_epochs']:g}"]
        cells += [fmt_value(c, row[c]) for c in searched]
        if ranks:
            cells.append(summary)
        else:  # "(3/4 layers)" at the end of the summary: how many layers were compressed
            cells.append(summary[summary.rfind("(") + 1:].rstrip(")") if "(" in summary else summary)
        body.append(cells)
    heads.append("ranks" if ranks else "layers")
    table = fitted_table(title, caption, heads, body, searched)
    console.print(table)


def fitted_table(title: str, caption: str, heads: list[str], body: list[list[str]], searched: list[str]) -> Table:
    """The front table at the console's width. Where all of it does not fit (an 80-column
    terminal) the searched values go (csv and json keep them), a strategy, selector, fidelity or
    epochs column with one value in every row moves to the caption, and the borders thin out, so that the figures are
    never cut to "0.9…"."""
    from rich import box

    widths = [max([len(col)] + [len(cells[i]) for cells in body]) for i, col in enumerate(heads)]
    shown = list(range(len(heads)))
    notes = [caption]
    narrow = sum(w + 3 for w in widths) + 1 > console.width
    if narrow:
        same = {i for i, col in enumerate(heads) if col in ("strategy", "selector", "fidelity", "epochs")
                and body and len({cells[i] for cells in body}) == 1}
        notes += [f"{heads[i]}: {body[0][i]}" for i in sorted(same)]
        shown = [i for i in shown if heads[i] not in searched and i not in same]
        if searched:
            notes.append(f"{len(searched)} searched values not shown at this width (see --format csv)")
    table = Table(title=title, caption="; ".join(notes), box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
                  pad_edge=not narrow)
    for i in shown:
        text = heads[i] in ("strategy", "selector", "ranks", "layers") or heads[i] in searched
        table.add_column(heads[i], overflow="fold", min_width=None if text else widths[i],
                         justify="left" if text else "right")
    for cells in body:
        table.add_row(*[cells[i] for i in shown])
    return table
