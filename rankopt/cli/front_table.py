"""The front as a table at the console's width (``rankopt pareto``)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from rankopt.cli.app import console

__all__ = ["print_front", "fitted_table"]


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
    body, compact = [], []
    abbrev: dict[str, str] = {}
    for record in records:
        for entry in record.spec.values():
            abbrev.setdefault(entry["decomposer"], _ABBREV.get(entry["decomposer"], entry["decomposer"] + ":"))
    for row, record in zip(rows, records):
        summary = row["ranks"]
        if ranks:  # "T5x10 T10x10 S12": one short token per compressed layer, in order
            compact.append(" ".join(abbrev[e["decomposer"]] + "x".join(str(r) for r in e["ranks"])
                                    for e in record.spec.values()) or "none")
        else:  # "3/3": the column says "layers"
            compact.append(summary[summary.rfind("(") + 1:].rstrip(")").removesuffix(" layers")
                           if "(" in summary else summary)
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
    legend = ("ranks: " + ", ".join(f"{a.rstrip(':')} = {d}" for d, a in abbrev.items() if a != d + ":")
              + " (per compressed layer, in order)") if ranks and abbrev else ""
    table = fitted_table(title, caption, heads, body, searched, narrow_last=(compact, legend))
    console.print(table)


# short names of the built-in decomposers in the compact --ranks column of a narrow table
_ABBREV = {"tucker2": "T", "svd": "S", "cp": "C", "tt": "TT"}


def fitted_table(title: str, caption: str, heads: list[str], body: list[list[str]], searched: list[str],
                  narrow_last: tuple[list[str], str] | None = None) -> Any:
    """The front table at the console's width, one line per row. Where all of it does not
    fit (an 80-column terminal) the last column takes its short form (``narrow_last``:
    "3/3", compact ranks), the searched values go (csv and json keep them), a strategy,
    selector, fidelity or epochs column with one value in every row moves to the caption,
    the borders thin out, and while it is still too wide the ratio columns, then the
    selector, go too (named in the caption), so that the figures are never cut to "0.9…".
    The caption is printed under the table, wrapped at words at the console's width."""
    from rich import box
    from rich.console import Group
    from rich.text import Text

    widths = [max([len(col)] + [len(cells[i]) for cells in body]) for i, col in enumerate(heads)]
    shown = list(range(len(heads)))
    notes = [caption]
    narrow = sum(w + 3 for w in widths) + 1 > console.width
    if narrow and narrow_last is not None:  # the last column's short form ("3/3", "T5x10 S12")
        cells, legend = narrow_last
        body = [row[:-1] + [cell] for row, cell in zip(body, cells)]
        widths[-1] = max([len(heads[-1])] + [len(c) for c in cells])
        if legend:
            notes.append(legend)
    if narrow:
        same = {i for i, col in enumerate(heads) if col in ("strategy", "selector", "fidelity", "epochs")
                and body and len({cells[i] for cells in body}) == 1}
        notes += [f"{heads[i]}: {body[0][i]}" for i in sorted(same)]
        shown = [i for i in shown if heads[i] not in searched and i not in same]
        dropped: list[str] = []
        for col in ("FLOPs x", "params x", "selector", "strategy"):
            # SIMPLE_HEAD: a column takes its width plus 3 (padding and the separator)
            if sum(widths[i] + 3 for i in shown) - 1 <= console.width:
                break
            if col not in heads:
                continue
            if heads.index(col) in shown:
                shown.remove(heads.index(col))
                dropped.append(col)
        dropped += [f"{len(searched)} searched values"] if searched else []
        if dropped:
            notes.append(f"{', '.join(dropped)} not shown at this width (see --format csv)")
    table = Table(title=title, box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD, pad_edge=not narrow)
    for i in shown:
        text = heads[i] in ("strategy", "selector", "ranks", "layers") or heads[i] in searched
        short = narrow and heads[i] in ("layers", "selector", "strategy")  # "3/3" never wraps
        table.add_column(heads[i], overflow="fold", min_width=None if text else widths[i],
                         justify="left" if text else "right", no_wrap=short)
    for cells in body:
        table.add_row(*[cells[i] for i in shown])
    return Group(table, Text("\n".join(_note_lines(notes, console.width)), style="dim italic"))


def _note_lines(notes: list[str], width: int) -> list[str]:
    """The caption's notes joined with "; " into lines of at most ``width``, a note never
    split unless it is longer than a line (then the console wraps it at words)."""
    lines: list[str] = []
    for note in notes:
        if lines and len(lines[-1]) + 2 + len(note) <= width:
            lines[-1] += "; " + note
        else:
            if lines:
                lines[-1] += ";"
            lines.append(note)
    return lines
