"""report.md: the compress report as Markdown tables, with paired comparisons."""

from collections.abc import Mapping
from typing import Any


def format_report(report: Mapping[str, Any]) -> str:
    """report.md: every row on the validation images, then on the held-out images, and
    one verdict line per merged model."""
    rows = report["rows"]
    config = report["config"]
    color = rows[0]
    seeds = config.get("seeds", 1)
    lines = [
        "# graycnn compress report",
        "",
        _settings(config),
        "",
        f"## Validation ({color['examples']} images; levers are chosen here)",
        "",
        "Δ: accuracy points against the baseline of the row's budget (the unmerged gray "
        f"model with the same recovery), on the same images{' and seeds' if seeds > 1 else ''}"
        "; 95% CI: paired bootstrap; p: exact McNemar.",
        "",
        "| model | input | accuracy | Δ | 95% CI | p | params | vs color | FLOPs | clusters | BN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        clusters = ", ".join(f"L{k}: {v}" for k, v in r["clusters"].items()) or "-"
        smaller = 100 * (1 - r["params"] / color["params"])
        lines.append(
            f"| {r['name']} | {r['image_type']} | {_acc(r)} | {_delta(r)} | "
            f"{r['params']:,} | -{smaller:.1f}% | {r['flops']:,} | {clusters} | {r['bn']} |"
        )
    held = [r for r in rows if "eval" in r]
    if held:
        e = held[0]["eval"]
        lines += [
            "",
            f"## Held out: {e['dataset']} ({e['examples']} images; no choice was made on them)",
            "",
            "| model | accuracy | Δ | 95% CI | p |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r['name']} | {_acc(r['eval'])} | {_delta(r['eval'])} |" for r in held]
    if config.get("budget_search"):
        lines += ["", *_budget_search(config["budget_search"])]
    if report.get("compensation"):
        against = (
            "the color model's on the same images in color"
            if config.get("compensate") == "lstsq_color"
            else "the unmerged model's"
        )
        lines += [
            "",
            "## Compensation: each consumer's reconstruction error (1 - R^2 of its outputs "
            f"against {against}, on the fit images)",
            "",
            "| layer merged | chain | seed | consumer | before | after |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['layer']} | {c['chain']} | {c['seed']} | {c['consumer']} | "
            f"{c['error_before']:.4f} | {c['error_after']:.4f} |"
            for c in report["compensation"]
        ]
    lines += ["", "## Verdicts", ""] + _verdicts(rows, color)
    lines += [
        "",
        "Figures: `figures/` (pareto.png: accuracy against parameters and FLOPs). Every "
        "row's model: `checkpoint` in report.json; evaluate it with `python -m "
        "experiments.evaluate --checkpoint=<workdir>/<checkpoint> --dataset=... "
        "--view=<input>`.",
    ]
    return "\n".join(lines) + "\n"


def _verdicts(rows: list[dict[str, Any]], color: Mapping[str, Any]) -> list[str]:
    """One line per merged (non-control) recovered row: above / below / tied."""
    out = []
    for r in rows:
        if not r["clusters"] or r.get("control") or r.get("budget") is None:
            continue
        smaller = 100 * (1 - r["params"] / color["params"])
        fewer = 100 * (1 - r["flops"] / color["flops"])
        where = [f"validation {r['verdict']} ({_ci(r)})"]
        if "eval" in r and "verdict" in r["eval"]:
            where.append(f"held out {r['eval']['verdict']} ({_ci(r['eval'])})")
        if "vs_refit" in r:
            refit = [f"validation {r['vs_refit']['verdict']} ({_ci(r['vs_refit'])})"]
            if "vs_refit" in r.get("eval", {}):
                held = r["eval"]["vs_refit"]
                refit.append(f"held out {held['verdict']} ({_ci(held)})")
            where.append(f"against the same refit without a merge: {'; '.join(refit)}")
        out.append(
            f"- {r['name']} ({smaller:.1f}% fewer parameters, {fewer:.1f}% fewer FLOPs than "
            f"the color model), against its budget's baseline: {'; '.join(where)}."
        )
    return out or ["- no merged row."]


def _budget_search(search: Mapping[str, Any]) -> list[str]:
    """The plan a --target_flops/--target_params run chose, and the measurements behind it."""
    target = ", ".join(f"{k} {v:.2f}" for k, v in search["target"].items())
    achieved = ", ".join(f"{k} {v:.3f}" for k, v in search["achieved"].items())
    plan = ", ".join(f"L{s['layer']}: {s['clusters']}" for s in search["steps"]) or "no merge"
    lines = [
        "## Budget search (replaces --layers and --num_clusters)",
        "",
        f"Target: {target} of the color model's; plan {plan}; reached {achieved}. "
        "Sensitivity: each layer merged alone, BN recalibrated, accuracy lost (points) "
        "on the selection split carved from the training images (unmerged: "
        f"{100 * search['selection_accuracy']:.1f}%).",
        "",
        "| layer | clusters | points lost | model params | model FLOPs |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {o['layer']} | {o['clusters']} | {o['drop']:+.1f} | {o['params']:,} | {o['flops']:,} |"
        for o in search["options"]
    ]
    return lines


def _settings(config: Mapping[str, Any]) -> str:
    preset = f"preset `{config['preset']}`" if config.get("preset") else "no preset"
    keys = (
        "dataset", "layers", "fold", "objective", "fields", "metric", "cluster",
        "num_clusters", "bn_rule", "compensate", "bn", "bn_epochs", "bn_loss", "finetune_epochs",
        "finetune", "target_flops", "target_params", "controls", "seeds", "seed",
    )  # fmt: skip
    shown = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
    return f"Settings ({preset}): {shown}. Color model: `{config.get('color_checkpoint')}`."


def _acc(r: Mapping[str, Any]) -> str:
    text = f"{100 * r['accuracy']:.2f}%"
    if "accuracy_sd" in r:
        text += f" ± {100 * r['accuracy_sd']:.2f}"
    return text


def _delta(r: Mapping[str, Any]) -> str:
    if "delta" not in r:
        return "- | - | -"
    return f"{r['delta']:+.2f} | {_ci(r)} | {r['p_value']:.3g}"


def _ci(r: Mapping[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"[{lo:+.2f}, {hi:+.2f}]"
