"""One row of several compress runs against its bar, pooled: one interval over every
run's seeds and images.

A run's `--seeds` redraw the noise of one color model; pooling the runs of several color
models (or any runs on the same images) asks whether a difference holds across them.
Each run's saved checkpoints are evaluated again on the run's validation and held-out
images, and the (runs x seeds, images) arrays are compared by `stats.compare` (a paired
bootstrap over images and runs).
"""

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from graycnn import checkpoint, stats
from graycnn.compress import stages
from graycnn.compress.config import CompressConfig


class Run(NamedTuple):
    """One workdir, checked: its report's config, and per compared row (row, bar) the
    report entry and the checkpoint paths, one per seed."""

    workdir: str
    config: dict[str, Any]
    entries: tuple[dict[str, Any], dict[str, Any]]
    paths: tuple[list[str], list[str]]


def check_runs(workdirs: Sequence[str], row: str, bar: str) -> list[Run]:
    """Checks, before any evaluation, that the runs can be pooled.

    Returns:
        One `Run` per workdir, what `compare_runs` evaluates.

    Raises:
        ValueError: no workdirs, a missing report, row or checkpoint, runs on
            different data, or rows of different seed counts (naming the workdir).
    """
    if not workdirs:
        raise ValueError("no workdirs to pool")
    reports = [_report(w) for w in workdirs]
    runs = []
    for workdir, report in zip(workdirs, reports, strict=True):
        if _data(report) != _data(reports[0]):
            raise ValueError(
                f"{workdir}: dataset and eval_dataset {_data(report)} differ from "
                f"{workdirs[0]}'s {_data(reports[0])}: pooled runs must be compared on "
                "the same images"
            )
        entries = tuple(_row(workdir, report, k) for k in (row, bar))
        mine, theirs = (_checkpoints(workdir, e) for e in entries)
        if len(mine) != len(theirs):
            raise ValueError(
                f"{workdir}: {row!r} has {len(mine)} seeds and {bar!r} {len(theirs)}; the "
                "paired comparison needs both of every seed"
            )
        missing = [p for p in mine + theirs if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"{missing[0]}: no such checkpoint; {workdir}/report.json names it")
        runs.append(Run(workdir, report["config"], entries, (mine, theirs)))
    return runs


def compare_runs(workdirs: Sequence[str], row: str, bar: str) -> dict[str, Any]:
    """`row` against `bar` (report.json row keys) over the runs in `workdirs`.

    Args:
        workdirs: compress workdirs whose runs share the dataset and held-out set.
        row, bar: Row keys, e.g. 'merged_1+2' and 'gray_bn'.

    Returns:
        {'row', 'bar', 'runs': models compared (seeds over all workdirs), 'validation':
        result, 'held_out': result or None, 'held_out_name'}, where a result is
        `stats.compare`'s dict (points) plus 'per_workdir': each workdir's mean
        difference in points.

    Raises:
        ValueError: see `check_runs`.
    """
    return _compare(check_runs(workdirs, row, bar), row, bar)


def compare_settings(
    settings: Sequence[tuple[str, Sequence[str]]], row: str, bar: str
) -> list[tuple[str, dict[str, Any]]]:
    """`compare_runs` for each (label, workdirs), every setting checked first, so that an
    input error in the last one stops the work before the first evaluation.

    Returns:
        [(label, `compare_runs` result)] in the order given.
    """
    checked = [(label, check_runs(workdirs, row, bar)) for label, workdirs in settings]
    return [(label, _compare(runs, row, bar)) for label, runs in checked]


def _compare(runs: Sequence[Run], row: str, bar: str) -> dict[str, Any]:
    first = runs[0].config
    splits = stages.read_splits(
        CompressConfig(
            dataset=first["dataset"],
            eval_dataset=first.get("eval_dataset", "none"),
            data_dir=first.get("data_dir"),
        )
    )
    pairs = []  # per workdir, [(row Evaluation, bar Evaluation) per seed]
    for run in tqdm(runs, desc="runs", leave=False):
        evals = [
            [_evaluate(p, entry, seed, splits) for seed, p in enumerate(ps)]
            for ps, entry in zip(run.paths, run.entries, strict=True)
        ]
        pairs.append(list(zip(*evals, strict=True)))
    held = splits.held_out is not None
    return {
        "row": row,
        "bar": bar,
        "runs": sum(len(p) for p in pairs),
        "validation": _pooled(pairs, "validation"),
        "held_out": _pooled(pairs, "held_out") if held else None,
        "held_out_name": splits.held_out_name if held else None,
    }


def format_table(results: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: one line per (label, `compare_runs` result), differences in points."""

    def cell(r):
        return "-" if r is None else f"{r['delta']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"

    def per(r):
        return "-" if r is None else " / ".join(f"{d:+.2f}" for d in r["per_workdir"])

    lines = [
        "| setting | runs | validation | held out | per workdir, validation "
        "| per workdir, held out |",
        "|---|---|---|---|---|---|",
    ]
    for label, res in results:
        v, h = res["validation"], res["held_out"]
        lines.append(f"| {label} | {res['runs']} | {cell(v)} | {cell(h)} | {per(v)} | {per(h)} |")
    return "\n".join(lines)


def _report(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; is {workdir} a finished compress run?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(report, dict) or "dataset" not in report.get("config", {}):
        raise ValueError(f"{path}: not a compress report (no config.dataset)")
    return report


def _data(report: dict[str, Any]) -> tuple[Any, Any]:
    return tuple(report["config"].get(k) for k in ("dataset", "eval_dataset"))


def _row(workdir: str, report: dict[str, Any], key: str) -> dict[str, Any]:
    rows = {r.get("key"): r for r in report.get("rows", [])}
    if key not in rows:
        keys = ", ".join(sorted(k for k in rows if k))
        raise ValueError(f"{workdir}/report.json has no row {key!r}; its rows: {keys}")
    return rows[key]


def _checkpoints(workdir: str, row: dict[str, Any]) -> list[str]:
    return [os.path.join(workdir, c) for c in row.get("checkpoints") or [row["checkpoint"]]]


def _evaluate(
    path: str, row: dict[str, Any], seed: int, splits: stages.Splits
) -> stages.Evaluation:
    """The checkpoint's per-image correctness; a note where its validation accuracy is
    not the one report.json gives (the workdir changed, or another machine's rounding)."""
    config, variables, _ = checkpoint.load_model(path)
    result = stages.evaluate(stages.Model(config, variables), row["image_type"], splits)
    reported = (row.get("accuracies") or [row["accuracy"]])[seed]
    if abs(result.validation.mean() - reported) > 1e-9:
        tqdm.write(
            f"note: {path} gives {100 * result.validation.mean():.2f}% on validation; "
            f"report.json says {100 * reported:.2f}%"
        )
    return result


def _pooled(pairs, split: str) -> dict[str, Any]:
    mine = np.stack([getattr(m, split) for ms in pairs for m, _ in ms])
    bars = np.stack([getattr(b, split) for ms in pairs for _, b in ms])
    per = [
        100 * float(np.mean([getattr(m, split).mean() - getattr(b, split).mean() for m, b in ms]))
        for ms in pairs
    ]
    return stats.compare(mine, bars) | {"per_workdir": per}
