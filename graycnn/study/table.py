"""The rows of the compress report: what each is, its per-seed results, and its paired
comparison with the bar of its budget, built as `schema.Row`s."""

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from graycnn.study import stats
from graycnn.study.config import CONTROLS
from graycnn.study.schema import Comparison, Row, SplitResult
from graycnn.study.stages import Evaluation

# What a merge is compared with at its widths, besides the bar of its budget.
CONTROL_ROWS = (*CONTROLS, "scratch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowSpec:
    """What a row is.

    Attributes:
        key: Unique within the report.
        model_dir: Its checkpoint's directory name under models/ (the two color rows
            share one).
        control: None for a merge, 'random', 'prune_l1' or 'scratch' for a control (the
            merged widths trained afresh: `--scratch_epochs`); 'refit' for
            the unmerged model given the merge's color refit (`--compensate=
            lstsq_color`), what the refit buys without a merge.
        budget: None (no recovery), 'bn' or 'finetune': which bar it is compared
            with, and what recovery it had.
        bar: The unmerged gray model of its budget.
        target: The plan's target in a sweep of --target_* fractions (e.g. 'flops 0.5').
    """

    key: str
    name: str
    image_type: str
    model_dir: str
    clusters: Mapping[int, int] = dataclasses.field(default_factory=dict)
    bn: str = "-"
    control: str | None = None
    budget: str | None = None
    finetune_epochs: int = 0
    bar: bool = False
    target: str = ""


class Table:
    """Collects each row's per-seed results, in the order rows are first added."""

    def __init__(self, held_out_name: str | None):
        self.held_out_name = held_out_name
        self.specs: dict[str, RowSpec] = {}
        self.results: dict[str, list[Evaluation]] = defaultdict(list)
        self.sizes: dict[str, dict[str, int]] = {}
        self.checkpoints: dict[str, list[str]] = defaultdict(list)

    def add(self, spec: RowSpec, result: Evaluation, size: dict[str, int], ckpt: str) -> None:
        self.specs.setdefault(spec.key, spec)
        self.results[spec.key].append(result)
        self.sizes[spec.key] = size
        self.checkpoints[spec.key].append(ckpt)

    def rows(self) -> list[Row]:
        """Every row with its paired comparisons: a gray row against the bar of its
        budget (the rows before recovery: the 'bn' bar's), a merge given the color refit
        also against the refit alone."""
        bars = {s.budget: k for k, s in self.specs.items() if s.bar}
        refits = {s.budget: k for k, s in self.specs.items() if s.control == "refit"}
        out = []
        for key, spec in self.specs.items():
            bar = bars.get(spec.budget or "bn") if spec.image_type != "color" else None
            refit = refits.get(spec.budget) if spec.clusters and not spec.control else None
            controls = self._controls(spec)
            held = None
            if self.held_out_name is not None:
                held = self._split(key, "held_out", bar, refit, controls, self.held_out_name)
            out.append(Row(
                key=key, name=spec.name, image_type=spec.image_type,
                clusters=dict(spec.clusters), bn=spec.bn, control=spec.control,
                budget=spec.budget, finetune_epochs=spec.finetune_epochs, is_bar=spec.bar,
                params=self.sizes[key]["params"], flops=self.sizes[key]["flops"],
                checkpoints=tuple(self.checkpoints[key]),
                validation=self._split(key, "validation", bar, refit, controls),
                held_out=held,
            ))  # fmt: skip
        return out

    def _controls(self, spec: RowSpec) -> list[str]:
        """A merge's controls: the rows of its budget at its widths that are not merges."""
        if not spec.clusters or spec.control or spec.budget is None:
            return []

        def at(s: RowSpec) -> tuple:
            return s.budget, dict(s.clusters), s.target

        return [k for k, s in self.specs.items() if s.control in CONTROL_ROWS and at(s) == at(spec)]

    def _split(
        self, key: str, split: str, bar: str | None, refit: str | None,
        controls: list[str], dataset: str | None = None,
    ) -> SplitResult:  # fmt: skip
        """`key`'s results on `split`, compared with `bar`, `refit` and `controls`."""
        correct = self._stack(key, split)
        per_seed = correct.mean(axis=1)
        return SplitResult(
            dataset=dataset,
            examples=correct.shape[1],
            accuracy=float(per_seed.mean()),
            accuracies=tuple(per_seed.tolist()),
            accuracy_sd=float(per_seed.std(ddof=1)) if len(per_seed) > 1 else None,
            vs_bar=self._compare(correct, bar, split),
            vs_refit=self._compare(correct, refit, split),
            vs_controls=tuple(
                Comparison.of(c, stats.compare(correct, self._stack(c, split))) for c in controls
            ),  # fmt: skip
        )

    def _compare(self, correct: np.ndarray, against: str | None, split: str):
        if against is None:
            return None
        return Comparison.of(against, stats.compare(correct, self._stack(against, split)))

    def _stack(self, key: str, split: str) -> np.ndarray:
        """(seeds, N) bool; a deterministic row evaluated once stands for every seed."""
        seeds = max(len(r) for r in self.results.values())
        results = np.stack([getattr(r, split) for r in self.results[key]])
        return np.repeat(results, seeds, axis=0) if len(results) == 1 else results


def color_specs(config: Any) -> list[RowSpec]:
    """The color model on color and on gray3 images, and the gray fold before recovery."""
    return [
        RowSpec(key="color", name="color model, color images", image_type="color",
                model_dir="color"),
        RowSpec(key="color_gray3", name="color model, gray images (naive)",
                image_type="gray3", model_dir="color"),
        RowSpec(key="gray_fold", name=f"gray fold ({config.fold}), no BN re-estimation",
                image_type="gray", model_dir="gray_fold", bn="none"),
    ]  # fmt: skip


def recovered_spec(
    config: Any,
    clusters: Mapping[int, int],
    control: str | None,
    budget: str | None,
    target: str = "",
) -> RowSpec:
    """A gray model after `budget`'s recovery (None: none): the unmerged bar when
    `clusters` is empty (or, with control 'refit', the unmerged model refit to the
    color model as the merges are), else the merge of those layers (or its `control`).

    Args:
        target: In a sweep of --target_* fractions, the plan's target (e.g. 'flops 0.5'):
            a merge's name gains '(flops 0.5)' and its key and model dir '_flops0.5'.
    """
    names = "+".join(map(str, clusters))
    if not clusters and control == "refit":
        key, title = "gray_refit", f"gray + color refit ({config.compensation}), no merge"
    elif not clusters:
        key, title = "gray", "gray"
    elif control is None:
        noun = "layers" if len(clusters) > 1 else "layer"
        key, title = f"merged_{names}", f"merged {noun} {names}"
    else:
        noun = "layers" if len(clusters) > 1 else "layer"
        key, title = f"{control}_{names}", f"{control} control, {noun} {names}"
    if target and clusters:
        key, title = f"{key}_{target.replace(' ', '')}", f"{title} ({target})"
    if control == "scratch":  # trained afresh: no merge, compensation or BN budget
        epochs = config.scratch_epochs
        return RowSpec(key=f"{key}_{budget}", name=f"{title}, trained from scratch {epochs} ep",
                       image_type="gray", model_dir=f"{key}_{budget}", clusters=dict(clusters),
                       bn="trained", control=control, budget=budget, target=target)  # fmt: skip
    if config.compensation != "none" and clusters:
        title += f" ({config.compensation})"
    if budget is None:
        key, name, bn = f"{key}_raw", f"{title}, no BN re-estimation", "none"
    elif budget == "bn":
        key, name, bn = key if clusters else f"{key}_bn", f"{title} + BN re-estimation", config.bn
        if not clusters and control is None:
            name = "gray + BN re-estimation, no merge"
    else:
        epochs = config.finetune_epochs
        key, bn = f"{key}_finetune", config.bn
        name = f"{title} + BN + fine-tune {epochs} ep ({config.finetune})"
        if not clusters and control is None:
            name = f"gray + BN + fine-tune {epochs} ep ({config.finetune}), no merge"
    return RowSpec(
        key=key,
        name=name,
        image_type="gray",
        model_dir=key,
        clusters=dict(clusters),
        bn=bn,
        control=control,
        budget=budget,
        finetune_epochs=config.finetune_epochs if budget == "finetune" else 0,
        bar=budget is not None and not clusters and control is None,
        target=target if clusters else "",
    )
