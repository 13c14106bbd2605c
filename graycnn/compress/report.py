"""report.md: the compress report as a Markdown table."""

from collections.abc import Mapping
from typing import Any


def format_report(report: Mapping[str, Any]) -> str:
    """report.md: the study's Table 3 with the rows it left out."""
    rows = report["rows"]
    color_params = rows[0]["params"]
    lines = [
        "# graycnn compress report",
        "",
        "| model | input | accuracy | params | vs color | FLOPs | clusters | BN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        clusters = ", ".join(f"L{k}: {v}" for k, v in r["clusters"].items()) or "-"
        smaller = 100 * (1 - r["params"] / color_params)
        lines.append(
            f"| {r['name']} | {r['image_type']} | {100 * r['accuracy']:.2f}% | "
            f"{r['params']:,} | -{smaller:.1f}% | {r['flops']:,} | {clusters} | {r['bn']} |"
        )
    baseline = next(r for r in rows if r.get("baseline"))
    final = rows[-1]
    verdict = "beats" if final["accuracy"] >= baseline["accuracy"] else "does not beat"
    lines += [
        "",
        f"The last merged model ({100 * final['accuracy']:.2f}%, "
        f"{100 * (1 - final['params'] / color_params):.1f}% fewer parameters than the color "
        f"model) {verdict} the gray + BN re-estimation baseline "
        f"({100 * baseline['accuracy']:.2f}%).",
        "",
        "Figures: `figures/`. Every row's model: `checkpoint` in report.json; evaluate it "
        "with `python -m experiments.evaluate --checkpoint=<workdir>/<checkpoint> "
        "--dataset=... --view=<input>`.",
    ]
    return "\n".join(lines) + "\n"
