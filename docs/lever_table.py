"""Markdown table of compress runs side by side, from their report.json files.

    python -m docs.lever_table LABEL=WORKDIR [LABEL=WORKDIR ...]

Per run and recovery budget: the bar (the unmerged gray model) as accuracy, then each
merged row and control as the paired difference from the bar in points, with its 95%
interval, on validation and on the held-out images; sizes relative to the color model.
With --compensate=lstsq_color, the unmerged model given the same refit ('refit (no
merge)') and each merge's difference from it ('vs refit') follow. docs/results.md's
lever tables are its output.
"""

import json
import os
import sys

from graycnn.study.schema import Comparison, Report, Row


def _delta(c: Comparison | None) -> str:
    if c is None:
        return "-"
    lo, hi = c.ci95
    return f"{c.delta:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def table(runs: list[tuple[str, str]]) -> str:
    """Returns the markdown table of `runs`, [(label, workdir)]."""
    lines = [
        "| run | budget | model | params | FLOPs | validation | held out |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, workdir in runs:
        path = os.path.join(workdir, "report.json")
        with open(path) as f:
            rows = Report.from_json(json.load(f), path).rows
        for row in rows:
            if row.budget:
                lines += [f"| {label} | {row.budget} | " + " | ".join(c) + " |"
                          for c in _cells(row, rows[0])]  # fmt: skip
    return "\n".join(lines)


def _cells(row: Row, color: Row) -> list[tuple[str, ...]]:
    """The row's line (the bar as accuracies, the others as differences from it), and
    a merge's difference from the refit without a merge, where it has one."""
    size = (
        f"{-100 * (1 - row.params / color.params):+.1f}%",
        f"{-100 * (1 - row.flops / color.flops):+.1f}%",
    )
    held = row.held_out
    if row.is_bar:
        return [("bar (no merge)", *size, f"{100 * row.validation.accuracy:.1f}%",
                 f"{100 * held.accuracy:.1f}%" if held else "-")]  # fmt: skip
    if not row.clusters:
        return [(f"{row.control} (no merge)", *size, _delta(row.validation.vs_bar),
                 _delta(held and held.vs_bar))]  # fmt: skip
    layers = "+".join(f"L{k}:{v}" for k, v in row.clusters.items())
    what = f"{row.control} control" if row.control else "merged"
    out = [(f"{what} {layers}", *size, _delta(row.validation.vs_bar), _delta(held and held.vs_bar))]
    if row.validation.vs_refit is not None:
        out.append((f"merged {layers} vs refit", *size, _delta(row.validation.vs_refit),
                    _delta(held and held.vs_refit)))  # fmt: skip
    return out


if __name__ == "__main__":
    print(table([tuple(a.split("=", 1)) for a in sys.argv[1:]]))
