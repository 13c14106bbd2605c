"""report.md: the compress report as Markdown tables, with paired comparisons."""

from collections.abc import Mapping
from typing import Any

from graycnn.study.config import ROUND_TO, TARGETS, compensation_of
from graycnn.study.schema import Comparison, Report, Row, SplitResult


def format_report(report: Report | Mapping[str, Any]) -> str:
    """report.md: every row on the validation images, then on the held-out images, and
    one verdict line per merged model.

    Args:
        report: The report, or report.json's content.
    """
    if not isinstance(report, Report):
        report = Report.from_json(report)
    config = report.config
    lines = ["# graycnn compress report", "", _settings(config), ""]
    lines += _validation(report.rows, config.get("seeds", 1))
    lines += _held_out(report.rows)
    lines += _speed(report.rows, config.get("speed"))
    if config.get("budget_search"):
        lines += ["", *_budget_search(config["budget_search"], config.get("search_images"))]
    if report.compensation:
        lines += _compensation(report)
    lines += ["", "## Verdicts", ""] + _verdicts(report.rows, report.color)
    lines += [
        "",
        "Figures: `figures/` (pareto.png: accuracy against parameters and FLOPs"
        + ("; speed.png: against measured images per second" if config.get("speed") else "")
        + "). Every "
        "row's model: `checkpoint` in report.json; evaluate it with `python -m "
        "experiments.evaluate --checkpoint=<workdir>/<checkpoint> --dataset=... "
        "--view=<input>`.",
    ]
    return "\n".join(lines) + "\n"


def _validation(rows: tuple[Row, ...], seeds: int) -> list[str]:
    """The table of every row on the validation images, sizes against the color model's."""
    color = rows[0]
    lines = [
        f"## Validation ({color.validation.examples} images; levers are chosen here)",
        "",
        "Δ: accuracy points against the baseline of the row's budget (the unmerged gray "
        f"model with the same recovery), on the same images{' and seeds' if seeds > 1 else ''}"
        "; 95% CI: paired bootstrap; p: exact McNemar.",
        "",
        "| model | input | accuracy | Δ | 95% CI | p | params | vs color | FLOPs | clusters | BN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        clusters = ", ".join(f"L{k}: {v}" for k, v in r.clusters.items()) or "-"
        smaller = 100 * (1 - r.params / color.params)
        lines.append(
            f"| {r.name} | {r.image_type} | {_acc(r.validation)} | {_delta(r.validation)} | "
            f"{r.params:,} | -{smaller:.1f}% | {r.flops:,} | {clusters} | {r.bn} |"
        )
    return lines


def _held_out(rows: tuple[Row, ...]) -> list[str]:
    """The table of every row on the held-out images; nothing without them."""
    held = [(r, r.held_out) for r in rows if r.held_out is not None]
    if not held:
        return []
    first = held[0][1]
    return [
        "",
        f"## Held out: {first.dataset} ({first.examples} images; no choice was made on them)",
        "",
        "| model | accuracy | Δ | 95% CI | p |",
        "|---|---|---|---|---|",
        *(f"| {r.name} | {_acc(h)} | {_delta(h)} |" for r, h in held),
    ]


def _speed(rows: tuple[Row, ...], measured: Mapping[str, Any] | None) -> list[str]:
    """Every row's measured throughput and speed-up over its bar, beside its FLOPs cut."""
    timed = [r for r in rows if r.speed is not None]
    if not timed or not measured:
        return []
    b = max(measured["batch_sizes"])
    flops = {r.key: r.flops for r in rows}

    def cut(r: Row) -> str:
        against = r.speed.against if r.speed else None
        return f"{flops[against] / r.flops:.2f}x" if against in flops else "-"

    def up(r: Row, batch: int) -> str:
        return f"{r.speed.speedup[batch]:.2f}x" if r.speed and r.speed.speedup else "-"

    return [
        "",
        f"## Speed (measured on {measured['device']}, one device)",
        "",
        f"Images per second of each row's model, the median of {measured['rounds']} "
        "interleaved rounds (it moves with the machine's load); speed-up: the bar of the "
        "row's budget's time over the row's, round by round, beside the FLOPs it cuts.",
        "",
        f"| model | img/s (batch 1) | img/s (batch {b}) | speed-up (batch 1) | "
        f"speed-up (batch {b}) | FLOPs cut |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r.name} | {r.speed.images_per_second[1]:,.0f} | "
            f"{r.speed.images_per_second[b]:,.0f} | {up(r, 1)} | {up(r, b)} | {cut(r)} |"
            for r in timed
            if r.speed
        ),
    ]


def _compensation(report: Report) -> list[str]:
    """Each refit consumer's reconstruction error before and after."""
    against = (
        "the color model's on the same images in color"
        if _refit(report.config) == "lstsq_color"
        else "the unmerged model's"
    )
    return [
        "",
        "## Compensation: each consumer's reconstruction error (1 - R^2 of its outputs "
        f"against {against}, on the fit images)",
        "",
        "| layer merged | chain | seed | consumer | before | after |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c.layer} | {c.chain} | {c.seed} | {c.consumer} | "
            f"{c.error_before:.4f} | {c.error_after:.4f} |"
            for c in report.compensation
        ),
    ]


def _verdicts(rows: tuple[Row, ...], color: Row) -> list[str]:
    """One line per merged (non-control) recovered row: above / below / tied."""
    out = []
    for r in rows:
        if not r.merged or r.validation.vs_bar is None:
            continue
        smaller = 100 * (1 - r.params / color.params)
        fewer = 100 * (1 - r.flops / color.flops)
        held = r.held_out
        where = [f"validation {_verdict(r.validation.vs_bar)}"]
        if held is not None and held.vs_bar is not None:
            where.append(f"held out {_verdict(held.vs_bar)}")
        if r.validation.vs_refit is not None:
            refit = [f"validation {_verdict(r.validation.vs_refit)}"]
            if held is not None and held.vs_refit is not None:
                refit.append(f"held out {_verdict(held.vs_refit)}")
            where.append(f"against the same refit without a merge: {'; '.join(refit)}")
        if r.validation.vs_controls:
            where.append(_against_controls(r))
        out.append(
            f"- {r.name} ({smaller:.1f}% fewer parameters, {fewer:.1f}% fewer FLOPs than "
            f"the color model), against its budget's baseline: {'; '.join(where)}."
        )
    return out or ["- no merged row."]


def _against_controls(row: Row) -> str:
    """The merge against each control of its budget at its widths (validation / held
    out), and the best control: the one it leads least on validation."""
    held = row.held_out.vs_controls if row.held_out is not None else ()
    parts = []
    for i, c in enumerate(row.validation.vs_controls):
        text = f"{c.against} {c.delta:+.2f} {_ci(c)}"
        if i < len(held):
            text += f" / {held[i].delta:+.2f} {_ci(held[i])}"
        parts.append(text)
    best = min(row.validation.vs_controls, key=lambda c: c.delta)
    return (
        f"against its controls (validation{' / held out' if held else ''}): "
        f"{', '.join(parts)}; the best control: {best.against} ({_verdict(best)})"
    )


def _budget_search(search: Mapping[str, Any], images: int | None = 0) -> list[str]:
    """The plan a --target_* run chose (a sweep: each plan's), and the measurements
    behind it (one search: shared by every plan; `images`: its --search_images)."""
    plans = search.get("plans", [search])
    latency = "latency" in plans[0]["target"]
    whose = (
        "the gray model's (latency measured on this device; sizes: of the color model's)"
        if latency
        else "the color model's"
    )
    targets = []
    for p in plans:
        target = ", ".join(f"{k} {v:.2f}" for k, v in p["target"].items())
        achieved = ", ".join(f"{k} {v:.3f}" for k, v in p["achieved"].items())
        plan = ", ".join(f"L{s['layer']}: {s['clusters']}" for s in p["steps"]) or "no merge"
        targets.append(f"Target: {target} of {whose}; plan {plan}; reached {achieved}.")
    sensitivity = (
        "Sensitivity: each layer merged alone, BN recalibrated, accuracy lost (points) "
        "on the selection split carved from the training images (unmerged: "
        f"{100 * plans[0]['selection_accuracy']:.1f}%)."
    )
    if images:  # --search_images: the score is a divergence, not an accuracy
        sensitivity = (
            "Sensitivity (--search_images): each layer merged alone, BN recalibrated, "
            "100 x the KL divergence its predictions add to the unmerged gray model's on "
            f"{images} selection images carved from the training images."
        )
    lines = ["## Budget search (replaces --layers and --num_clusters)", ""]
    if len(plans) == 1:
        lines.append(f"{targets[0]} {sensitivity}")
    else:  # a sweep: one search, one plan per target
        lines += [*(f"- {t}" for t in targets), "", f"One search for every target. {sensitivity}"]
    lines += [
        "",
        "| layer | clusters | points lost | model params | model FLOPs |"
        + (" model latency |" if latency else ""),
        "|---|---|---|---|---|" + ("---|" if latency else ""),
    ]
    lines += [
        f"| {o['layer']} | {o['clusters']} | {o['drop']:+.1f} | {o['params']:,} | {o['flops']:,} |"
        + (f" {o['latency']:.3f} |" if latency else "")
        for o in plans[0]["options"]
    ]
    return lines


def _settings(config: Mapping[str, Any]) -> str:
    """The settings the run used: with a --target_*, the search's (its plan replaces
    --layers and --num_clusters, which are not shown); else as before targets."""
    preset = f"preset `{config['preset']}`" if config.get("preset") else "no preset"
    keys = [
        "dataset", "layers", "fold", "objective", "fields", "metric", "cluster",
        "num_clusters", "bn_rule", "compensate", "bn", "bn_epochs", "bn_lr", "bn_loss",
        "finetune_epochs", "finetune", "target_flops", "target_params", "controls",
        "scratch_epochs", "seeds", "seed",
    ]  # fmt: skip
    target = next((f"target_{k}" for k in TARGETS if config.get(f"target_{k}")), None)
    if target:
        keys = [k for k in keys if k not in ("layers", "num_clusters", "target_flops",
                                             "target_params")]  # fmt: skip
        # A latency target plans on timed whole plans: no --allocation is read.
        allocation = [] if target == "target_latency" else ["allocation"]
        keys[1:1] = [target, "round_to", *allocation, "search_images"]
    shown = ", ".join(f"{k}={_setting(k, config[k], config)}" for k in keys if k in config)
    return f"Settings ({preset}): {shown}. Color model: `{config.get('color_checkpoint')}`."


def _refit(config: Mapping[str, Any]) -> str:
    """The run's compensation, its 'auto' resolved (`config.compensation_of`)."""
    target = any(config.get(f"target_{k}") for k in TARGETS)
    epochs = config.get("finetune_epochs", 0)
    return compensation_of(config.get("compensate", "none"), target, epochs)


def _setting(key: str, value: Any, config: Mapping[str, Any]) -> Any:
    """A --target_* list as its flag: '0.7,0.5' (none: 0.0, as before sweeps); --round_to
    0 (with a target) as the multiple it stands for; --compensate=auto as the refit."""
    if key.startswith("target_") and isinstance(value, list):
        return ",".join(map(str, value)) or "0.0"
    if key == "round_to" and value == 0:
        return f"0 (multiples of {ROUND_TO})"
    if key == "compensate" and value == "auto":
        return f"auto ({_refit(config)})"
    return value


def _acc(split: SplitResult) -> str:
    text = f"{100 * split.accuracy:.2f}%"
    if split.accuracy_sd is not None:
        text += f" ± {100 * split.accuracy_sd:.2f}"
    return text


def _delta(split: SplitResult) -> str:
    c = split.vs_bar
    if c is None:
        return "- | - | -"
    return f"{c.delta:+.2f} | {_ci(c)} | {c.p_value:.3g}"


def _verdict(c: Comparison) -> str:
    return f"{c.verdict} ({_ci(c)})"


def _ci(c: Comparison) -> str:
    lo, hi = c.ci95
    return f"[{lo:+.2f}, {hi:+.2f}]"
