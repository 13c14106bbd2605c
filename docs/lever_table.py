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


def _delta(entry: dict | None) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['delta']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def table(runs: list[tuple[str, str]]) -> str:
    """Returns the markdown table of `runs`, [(label, workdir)]."""
    lines = [
        "| run | budget | model | params | FLOPs | validation | held out |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, workdir in runs:
        with open(os.path.join(workdir, "report.json")) as f:
            rows = json.load(f)["rows"]
        color = rows[0]
        for row in rows:
            if not row.get("budget"):
                continue
            size = (
                f"{-100 * (1 - row['params'] / color['params']):+.1f}%",
                f"{-100 * (1 - row['flops'] / color['flops']):+.1f}%",
            )
            if row.get("baseline"):
                held = row.get("eval")
                cells = (
                    "bar (no merge)",
                    *size,
                    f"{100 * row['accuracy']:.1f}%",
                    f"{100 * held['accuracy']:.1f}%" if held else "-",
                )
            elif not row["clusters"]:
                cells = (f"{row['control']} (no merge)", *size, _delta(row),
                         _delta(row.get("eval")))  # fmt: skip
            else:
                layers = "+".join(f"L{k}:{v}" for k, v in row["clusters"].items())
                what = f"{row['control']} control" if row["control"] else "merged"
                cells = (f"{what} {layers}", *size, _delta(row), _delta(row.get("eval")))
            lines.append(f"| {label} | {row['budget']} | " + " | ".join(cells) + " |")
            if "vs_refit" in row:
                held = row.get("eval", {}).get("vs_refit")
                cells = (f"merged {layers} vs refit", *size, _delta(row["vs_refit"]), _delta(held))
                lines.append(f"| {label} | {row['budget']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([tuple(a.split("=", 1)) for a in sys.argv[1:]]))
