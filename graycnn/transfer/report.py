"""report.json, report.md and the accuracy-vs-steps figure of a transfer run."""

import os
from typing import Any

from graycnn import io


def format_report(report: dict[str, Any]) -> str:
    """The Markdown table of the rows, with the images' sizes and the eval data."""
    img = report["images"]
    how = "resized to" if img["resized"] else "at"
    lines = [
        "# transfer",
        "",
        f"Images {img['original'][0]}x{img['original'][1]}, {how} the model's "
        f"{img['model'][0]}x{img['model'][1]}; {report['data']['train']} train, "
        f"{report['data']['validation']} validation (the curve); eval: {report['data']['eval']}. "
        f"Every model trained {report['settings']['steps']} steps.",
        "",
        *_plan(report),
        "| kind | MFLOPs | params | eval % | vs transfer (95% CI) | validation % | "
        "steps to scratch's final | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ev = row["eval"]
        vs = (
            "-"
            if "delta" not in ev
            else (
                f"{ev['delta']:+.2f} [{ev['ci95'][0]:+.2f}, {ev['ci95'][1]:+.2f}] {ev['verdict']}"
            )
        )
        reach = "never" if row["steps_to_scratch"] is None else str(row["steps_to_scratch"])
        lines.append(
            f"| {row['kind']} | {row['flops'] / 1e6:.2f} | {row['params']:,} | "
            f"{ev['accuracy']:.2f} | {vs} | {row['validation']:.2f} | {reach} | "
            f"{row['train_seconds']:.0f} |"
        )
    lines += ["", "![accuracy vs steps](curve.png)", ""]
    if "export" in report:
        ex = report["export"]
        diffs = ", ".join(f"{k} {v:.1g}" for k, v in ex["max_abs_diff"].items())
        lines += [f"Exported: {ex['kind']} to `{ex['directory']}` (largest logit "
                  f"difference from the Flax model: {diffs}).", ""]  # fmt: skip
    return "\n".join(lines)


def _plan(report: dict[str, Any]) -> list[str]:
    """The --target_flops plan's line (none without the flag)."""
    if "plan" not in report:
        return []
    plan = report["plan"]
    steps = ", ".join(f"L{s['layer']}: {s['clusters']}" for s in plan["steps"])
    return [
        f"Merged plan for --target_flops={plan['target']['flops']:g} (searched on the "
        f"training images: the error of the head's input features): {steps}; "
        f"{plan['achieved']['flops']:.3f} of transfer's FLOPs.",
        "",
    ]


def write_report(report: dict[str, Any], workdir: str) -> str:
    """Writes report.json, report.md and curve.png to `workdir`; returns report.md's text."""
    text = format_report(report)
    io.write_json(os.path.join(workdir, "report.json"), report)
    io.write_text(os.path.join(workdir, "report.md"), text)
    io.save_figure(_figure(report), os.path.join(workdir, "curve.png"))
    return text


def _figure(report: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for row in report["rows"]:
        steps, acc = zip(*row["curve"], strict=True)
        ax.plot(steps, [100 * a for a in acc], marker=".", label=row["kind"])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
