"""The rows of the compress report: what each is, its per-seed results, and its paired
comparison with the baseline of its budget."""

import dataclasses
import typing
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from graycnn.study import stats
from graycnn.study.stages import Evaluation


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowSpec:
    """What a row is.

    Attributes:
        key: Unique within the report.
        model_dir: Its checkpoint's directory name under models/ (the two color rows
            share one).
        control: None for a merge, 'random' or 'prune_l1' for a control; 'refit' for
            the unmerged model given the merge's color refit (`--compensate=
            lstsq_color`), what the refit buys without a merge.
        budget: None (no recovery), 'bn' or 'finetune': which baseline it is compared
            with, and what recovery it had.
        baseline: The unmerged gray model of its budget.
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
    baseline: bool = False


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

    def rows(self) -> list[dict[str, Any]]:
        """Every row as report.json has it, with its paired comparison."""
        seeds = max(len(r) for r in self.results.values())
        baselines = {s.budget: k for k, s in self.specs.items() if s.baseline}
        refits = {s.budget: k for k, s in self.specs.items() if s.control == "refit"}
        out = []
        for key, spec in self.specs.items():
            row = _describe(spec) | self.sizes[key] | {"checkpoint": self.checkpoints[key][0]}
            row["checkpoints"] = self.checkpoints[key]
            base = baselines.get(spec.budget or "bn")
            paired = spec.image_type != "color" and base is not None
            base = typing.cast(str, base)  # used only where paired
            val = self._stack(key, "validation", seeds)
            row |= {"examples": val.shape[1]} | _accuracy(val)
            # A merge given the color refit is also compared with the refit alone.
            refit = refits.get(spec.budget) if spec.clusters and not spec.control else None
            if paired:
                row |= stats.compare(val, self._stack(base, "validation", seeds))
            if refit:
                row["vs_refit"] = stats.compare(val, self._stack(refit, "validation", seeds))
            if self.held_out_name is not None:
                held = self._stack(key, "held_out", seeds)
                row["eval"] = {"dataset": self.held_out_name, "examples": held.shape[1]}
                row["eval"] |= _accuracy(held)
                if paired:
                    row["eval"] |= stats.compare(held, self._stack(base, "held_out", seeds))
                if refit:
                    row["eval"]["vs_refit"] = stats.compare(
                        held, self._stack(refit, "held_out", seeds)
                    )
            out.append(row)
        return out

    def _stack(self, key: str, split: str, seeds: int) -> np.ndarray:
        """(seeds, N) bool; a deterministic row evaluated once stands for every seed."""
        results = np.stack([getattr(r, split) for r in self.results[key]])
        return np.repeat(results, seeds, axis=0) if len(results) == 1 else results


def _describe(spec: RowSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": spec.name,
        "key": spec.key,
        "image_type": spec.image_type,
        "clusters": {str(k): v for k, v in spec.clusters.items()},
        "bn": spec.bn,
        "control": spec.control,
        "budget": spec.budget,
    }
    if spec.budget == "finetune":
        out["finetune_epochs"] = spec.finetune_epochs
    return out | ({"baseline": True} if spec.baseline else {})


def _accuracy(correct: np.ndarray) -> dict[str, Any]:
    per_seed = correct.mean(axis=1)
    out = {"accuracy": float(per_seed.mean()), "accuracies": per_seed.tolist()}
    if len(per_seed) > 1:
        out["accuracy_sd"] = float(per_seed.std(ddof=1))
    return out


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
    config: Any, clusters: Mapping[int, int], control: str | None, budget: str | None
) -> RowSpec:
    """A gray model after `budget`'s recovery (None: none): the unmerged baseline when
    `clusters` is empty (or, with control 'refit', the unmerged model refit to the
    color model as the merges are), else the merge of those layers (or its `control`)."""
    names = "+".join(map(str, clusters))
    if not clusters and control == "refit":
        key, title = "gray_refit", f"gray + color refit ({config.compensate}), no merge"
    elif not clusters:
        key, title = "gray", "gray"
    elif control is None:
        noun = "layers" if len(clusters) > 1 else "layer"
        key, title = f"merged_{names}", f"merged {noun} {names}"
    else:
        noun = "layers" if len(clusters) > 1 else "layer"
        key, title = f"{control}_{names}", f"{control} control, {noun} {names}"
    if config.compensate != "none" and clusters:
        title += f" ({config.compensate})"
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
        baseline=budget is not None and not clusters and control is None,
    )
