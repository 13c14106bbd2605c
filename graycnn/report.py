"""The compress report: one row per model, as report.json and a Markdown table."""

import os
from collections.abc import Mapping
from typing import Any

from graycnn import checkpoint, data, merge, train
from graycnn.models import ModelConfig, build_model, count_params


def evaluate_row(
    name: str,
    view: str,
    model_config: ModelConfig,
    variables: Mapping[str, Any],
    val: data.Split,
    workdir: str,
    checkpoint_dir: str,
    clusters: Mapping[int, int],
    bn: str,
    **extra: Any,
) -> dict[str, Any]:
    """Evaluates one model and returns its report row; saves it to `checkpoint_dir`
    unless that already holds it (the color model's copy).

    Returns:
        {'name', 'image_type', 'accuracy', 'params', 'flops', 'clusters', 'bn',
        'checkpoint' (relative to workdir), **extra}.
    """
    if not os.path.exists(checkpoint_dir):
        checkpoint.save_model(checkpoint_dir, model_config, variables, row=name, view=view)
    model = build_model(model_config)
    return {
        "name": name,
        "image_type": view,
        "accuracy": train.evaluate(model_config, variables, val, view)["accuracy"],
        "params": count_params(variables),
        "flops": merge.count_flops(model, variables, model_config.input_shape)["total"],
        "clusters": {str(k): v for k, v in clusters.items()},
        "bn": bn,
        "checkpoint": os.path.relpath(checkpoint_dir, workdir),
        **extra,
    }


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
