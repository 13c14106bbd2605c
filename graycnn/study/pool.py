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
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from graycnn.study import stages, stats
from graycnn.study.config import CompressConfig
from graycnn.study.schema import Report, Row
from graycnn.training import checkpoint, data


class Run(NamedTuple):
    """One workdir, checked: its report's config, and per compared row (row, bar) the
    report's row and the checkpoint paths, one per seed."""

    workdir: str
    config: Mapping[str, Any]
    entries: tuple[Row, Row]
    paths: tuple[list[str], list[str]]


def check_runs(workdirs: Sequence[str], row: str, bar: str) -> list[Run]:
    """Checks, before any evaluation, that the runs can be pooled.

    Returns:
        One `Run` per workdir, what `compare_runs` evaluates.

    Raises:
        ValueError: no workdirs, a missing report, row or checkpoint, runs on
            different data, rows of different seed counts (naming the workdir), or one
            run counted twice (naming both workdirs).
    """
    if not workdirs:
        raise ValueError("no workdirs to pool")
    if row == bar:
        raise ValueError(f"--row and --bar are both {row!r}: a row compared with itself")
    reports = [_report(w) for w in workdirs]
    _check_independent(workdirs, reports)
    runs = []
    for workdir, report in zip(workdirs, reports, strict=True):
        if _data(report) != _data(reports[0]):
            raise ValueError(
                f"{workdir}: dataset and eval_dataset {_data(report)} differ from "
                f"{workdirs[0]}'s {_data(reports[0])}: pooled runs must be compared on "
                "the same images"
            )
        entries = (_row(workdir, report, row), _row(workdir, report, bar))
        if entries[0].key == entries[1].key:
            raise ValueError(
                f"{workdir}/report.json: --row {row!r} and --bar {bar!r} are both its row "
                f"{entries[0].key!r}: a row compared with itself"
            )
        mine, theirs = (_checkpoints(workdir, e) for e in entries)
        if len(mine) != len(theirs):
            raise ValueError(
                f"{workdir}: {row!r} has {len(mine)} seeds and {bar!r} {len(theirs)}; the "
                "paired comparison needs both of every seed"
            )
        missing = [p for p in mine + theirs if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"{missing[0]}: no such checkpoint; {workdir}/report.json names it")
        runs.append(Run(workdir, report.config, entries, (mine, theirs)))
    return runs


def compare_runs(workdirs: Sequence[str], row: str, bar: str) -> dict[str, Any]:
    """`row` against `bar` (report.json row keys) over the runs in `workdirs`.

    Args:
        workdirs: compress workdirs whose runs share the dataset and held-out set.
        row, bar: Row keys, e.g. 'merged_1+2' and 'gray_bn', or roles at a budget,
            e.g. 'merged@finetune' and 'bar@finetune' (`resolve_key`).

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


def _report(workdir: str) -> Report:
    """The workdir's report.json, of any version (`Report.from_json` checks it)."""
    path = os.path.join(workdir, "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; is {workdir} a finished compress run?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return Report.from_json(report, path)


def _check_independent(workdirs: Sequence[str], reports: Sequence[Report]) -> None:
    """Refuses a run counted twice, which would narrow the interval with no new evidence:
    one directory given twice (by any path), or two runs of identical settings (the same
    color checkpoint, data, seeds and flags: the same numbers again)."""
    by_path: dict[str, str] = {}  # realpath -> the workdir as given
    by_settings: dict[str, str] = {}  # the settings as JSON -> the workdir as given
    for workdir, report in zip(workdirs, reports, strict=True):
        real = os.path.realpath(workdir)
        if real in by_path:
            raise ValueError(
                f"{by_path[real]} and {workdir} are the same directory: a run pooled twice "
                "counts as two independent runs"
            )
        by_path[real] = workdir
        settings = json.dumps(_settings(report.config), sort_keys=True)
        if settings in by_settings:
            raise ValueError(
                f"{by_settings[settings]} and {workdir} hold runs of identical settings (the "
                "same checkpoint, data, seeds and flags), so the same results twice: pool "
                "runs of other seeds or color models"
            )
        by_settings[settings] = workdir


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A report's config without where it ran: a color model trained in the run's own
    workdir (no --checkpoint) is the same model wherever the workdir is."""
    settings = {k: v for k, v in config.items() if k != "workdir"}
    own = config.get("workdir")
    color = settings.get("color_checkpoint")
    if own and isinstance(color, str) and color.startswith(os.path.join(own, "")):
        settings["color_checkpoint"] = os.path.relpath(color, own)
    return settings


def _data(report: Report) -> tuple[Any, Any]:
    return report.config.get("dataset"), report.config.get("eval_dataset")


ROLES = ("merged", "bar", "refit", "random", "prune_l1", "scratch")
BUDGETS = ("bn", "finetune", "none")


def resolve_key(report: Report, spec: str, where: str) -> str:
    """The key of the row `spec` names in `report` (read from `where`): a key itself, or
    ROLE@BUDGET, the one row of that `Row.role` (one of `ROLES`) at that recovery budget
    ('bn', 'finetune', or 'none' for no recovery). The role form pools runs whose plans,
    and so whose keys, differ: e.g. `--target_flops` runs of several color models, each
    searched on its own.

    Raises:
        ValueError: an unknown role or budget, or not exactly one such row (naming
            `where` and the rows that match).
    """
    if "@" not in spec:
        return spec
    role, _, budget = spec.partition("@")
    if role not in ROLES or budget not in BUDGETS:
        raise ValueError(
            f"row {spec!r} is neither a key nor ROLE@BUDGET with ROLE one of "
            f"{', '.join(ROLES)} and BUDGET one of {', '.join(BUDGETS)}"
        )
    keys = [r.key for r in report.rows if r.role == role and (r.budget or "none") == budget]
    if len(keys) != 1:
        found = f"{len(keys)}: {', '.join(keys)}" if keys else "none"
        raise ValueError(f"{where} has not one row {spec!r} but {found}")
    return keys[0]


def _row(workdir: str, report: Report, spec: str) -> Row:
    """The row `spec` names (see `resolve_key`), checked for pooling: one accuracy per
    checkpoint (a row evaluated once for several seeds has one checkpoint, and cannot be
    paired seed by seed) and an image type to evaluate it on."""
    key = resolve_key(report, spec, f"{workdir}/report.json")
    try:
        row = report.row(key)
    except KeyError as e:
        raise ValueError(f"{workdir}/report.json has {e.args[0]}") from None
    fault = None
    if len(row.validation.accuracies) != len(row.checkpoints):
        fault = f"it has {len(row.checkpoints)} checkpoints but not as many accuracies"
    elif row.image_type not in data.VIEWS:
        fault = f"its image_type {row.image_type!r} is not one of {', '.join(data.VIEWS)}"
    if fault:
        raise ValueError(f"{workdir}/report.json: row {key!r} is malformed: {fault}")
    return row


def _checkpoints(workdir: str, row: Row) -> list[str]:
    return [os.path.join(workdir, c) for c in row.checkpoints]


def _evaluate(path: str, row: Row, seed: int, splits: stages.Splits) -> stages.Evaluation:
    """The checkpoint's per-image correctness; a note where its validation accuracy is
    not the one report.json gives (the workdir changed, or another machine's rounding)."""
    config, variables, _ = checkpoint.load_model(path)
    result = stages.evaluate_model(stages.Model(config, variables), row.image_type, splits)
    reported = row.validation.accuracies[seed]
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
