"""The whole study in one call: fold a color model to gray; for each seed and layer,
compare the filters, cluster and merge them (and make the random and pruning controls
at the same widths); give every model the same recovery budget; evaluate every model on
the validation images and on held-out images no choice was made on.

Every row of the report is a model saved under `workdir/models/`, loadable by
`experiments.evaluate` with no further flags. The input checkpoint is only read.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from graycnn import config as config_lib
from graycnn import deploy
from graycnn.cli import workdir as workdir_lib
from graycnn.study import budget, speed, stages
from graycnn.study.config import CONTROLS, CompressConfig, validate, with_preset
from graycnn.study.table import RowSpec, Table, color_specs, recovered_spec
from graycnn.study.writer import Writer
from graycnn.training import data, parallel


def compress(config: CompressConfig, workdir: str, given: Sequence[str] = ()) -> dict[str, Any]:
    """Runs the study; writes report.json, report.md, figures and one checkpoint per row.

    Args:
        given: Fields the user set explicitly; the preset does not override them.

    Returns:
        The report as report.json holds it (`schema.Report.to_json()`): {'schema_version',
        'rows': [...], 'compensation': [...], 'config': {...}}.

    Raises:
        ValueError: a bad setting; `workdir` holds a model checkpoint or another
            command's run, or another process is writing it (`workdir.claim`).
    """
    config = with_preset(config, given)
    validate(config)
    with workdir_lib.claim(workdir, "compress"):
        return _compress(config, workdir, given)


def _compress(config: CompressConfig, workdir: str, given: Sequence[str]) -> dict[str, Any]:
    out = Writer(workdir, config_lib.to_json(config))
    splits = stages.read_splits(config)  # checked before the color model is trained
    stages.check_data(config, splits)
    stages.check_layers(config, splits)
    color = stages.color_model(config, out.path("color_model"), "model" in given)
    if config.target:  # the search may pick any conv: its flags are checked before it runs
        validate(config, color.widths())
    splits = stages.load_splits(config, color, splits)
    gray = stages.fold_color_model(config, color, splits.train)
    plans: list[budget.Plan] = []
    if config.target:  # minutes: kept in the workdir, so a killed run does not redo it
        plans = budget.plans_from_json(
            out.computed_once(
                "budget_search.json",
                lambda: budget.plans_to_json(budget.search(config, gray, color, splits.train)),
            )
        )
    chains = [stages.plan_steps(config, gray, p.steps) for p in plans] or [
        stages.plan_steps(config, gray)
    ]
    # A sweep's rows say their target; one target's are named as without a sweep.
    targets = [f"{p.target[0]} {p.target[1]:g}" for p in plans] if len(plans) > 1 else [""]
    out.begin()
    out.data_figure(splits)
    run = _Run(config, color, splits, out)
    for spec, model in zip(color_specs(config), (color, color, gray), strict=True):
        run.add(spec, model)
    for i in tqdm(range(config.seeds), desc="seeds", leave=False, disable=config.seeds == 1):
        seed = config.seed + i
        run.recover(gray, {}, None, i)
        if config.compensation == "lstsq_color":  # what the refit buys without a merge
            unmerged = functools.partial(
                _refit_unmerged, config, gray, _union(chains), splits, seed, color
            )
            refit, _ = out.refit(f"unmerged.seed{seed}", unmerged)
            run.recover(refit, {}, "refit", i)
        for j, (steps, target) in enumerate(zip(chains, targets, strict=True)):
            run.merge(gray, steps, seed_index=i, target=target, figures=i == 0 and j == 0)
    rows = run.table.rows()
    settings = _settings(config, color, chains, plans)
    if config.speed_rounds:
        rows, settings["speed"] = _timed(config, rows, run.models, out)
    report = out.finish(rows, settings)
    if config.export and parallel.primary():
        _export(report, run.models, splits, out.path("export"))
    return report.to_json()


def _refit_unmerged(config, gray, steps, splits, seed, color) -> tuple[stages.Model, list]:
    """`stages.refit_unmerged` with no errors to report, as `Writer.refit` keeps it."""
    return stages.refit_unmerged(config, gray, steps, splits.train, seed, color), []


def _union(chains: list[list[tuple[int, int | None]]]) -> list[tuple[int, int | None]]:
    """The steps of the one chain, or every layer a sweep's plans merge, in forward order."""
    if len(chains) == 1:
        return chains[0]
    return sorted({layer: None for steps in chains for layer, _ in steps}.items())


def _export(report, models, splits, directory: str) -> None:
    """The last merged row's model as deployable files (`graycnn.deploy`)."""
    row = [r for r in report.rows if r.merged][-1]
    model = models[row.key]
    images = data.apply_view(splits.validation.images[:256], row.image_type)
    result = deploy.export_model(model.config, model.variables, directory, images)
    diffs = ", ".join(f"{k} {v:.1g}" for k, v in result.max_abs_diff.items())
    tqdm.write(f"export: {row.name} to {directory} (largest logit difference: {diffs})")


def _timed(config, rows, models, out) -> tuple[list, dict[str, Any]]:
    """`rows` with their measured speed, and how it was measured. Kept in the workdir:
    a rerun of a finished run reports the same figures instead of timing again."""
    batch_sizes = sorted({1, config.speed_batch})
    bars = speed.bars_of(rows)
    measured = out.computed_once(
        "speed.json",
        lambda: {
            "device": speed.device_name(),
            "batch_sizes": batch_sizes,
            "rounds": config.speed_rounds,
            "rows": {
                key: s.to_json()
                for key, s in speed.measure_rows(
                    models, bars, batch_sizes, config.speed_rounds
                ).items()
            },
        },
        everywhere=False,  # one device's timings: process 0's
    )
    timed = {k: speed.RowSpeed.from_json(v) for k, v in measured.pop("rows").items()}
    return [dataclasses.replace(r, speed=timed.get(r.key)) for r in rows], measured


class _Run:
    """Evaluates, saves and tabulates the models of one run."""

    def __init__(self, config, color, splits, out):
        self.config, self.color, self.splits, self.out = config, color, splits, out
        self.table = Table(splits.held_out_name)
        self.models: dict[str, stages.Model] = {}  # each row's first seed's model

    def add(self, spec: RowSpec, model: stages.Model, seed_index: int = 0) -> None:
        result = stages.evaluate_model(model, spec.image_type, self.splits)
        checkpoint = self.out.model(spec.model_dir, seed_index, spec, model)
        self.models.setdefault(spec.key, model)
        self.table.add(spec, result, stages.size(model), checkpoint)
        tqdm.write(f"{spec.name}: validation accuracy {100 * result.validation.mean():.2f}%")

    def merge(self, gray, steps, seed_index: int, target: str, figures: bool) -> None:
        """Merges `steps` in order, the controls alongside at the same widths; adds each
        merge (a budget plan: only its last, one model) with every recovery budget.

        Args:
            target: A sweep's plan's target, named in its rows ('' otherwise).
            figures: Also write each layer's figures and clusters (one plan's, once).
        """
        config, splits, color = self.config, self.splits, self.color
        seed = config.seed + seed_index
        chains = {None: gray} | (dict.fromkeys(CONTROLS, gray) if config.controls else {})
        clusters: dict[int, int] = {}
        for k, (layer, count) in enumerate(tqdm(steps, desc="layers", leave=False)):
            result = stages.plan_layer_merge(
                config, chains[None], layer, count, splits.train, color, seed, figures=figures
            )
            if figures:
                self.out.layer(result)
            clusters[layer] = result.clustering.num_clusters
            for c, before in chains.items():
                plan = result.plan if c is None else stages.control_plan(
                    config, c, before, layer, result.clustering.labels, seed)  # fmt: skip
                merge = functools.partial(
                    stages.merge_and_compensate, config, before, plan, splits.train, seed, color
                )
                chain = (c or "merged") + (f" ({target})" if target else "")
                name = "_".join([c or "merged", *target.split()]) + f".layer{layer}.seed{seed}"
                refit = config.compensation != "none"  # else instant: nothing kept
                chains[c], errors = self.out.refit(name, merge) if refit else merge()
                self.out.compensation(layer, chain, seed, errors)
            if config.target and k < len(steps) - 1:
                continue  # a budget plan is one model: only its final step is a row
            self.add(recovered_spec(config, clusters, None, None, target), chains[None], seed_index)
            for c, model in chains.items():
                self.recover(model, clusters, c, seed_index, target)
            if config.scratch_epochs:
                self.scratch(chains[None], clusters, seed_index, target)

    def recover(
        self, model, clusters: Mapping[int, int], control, seed_index: int, target: str = ""
    ) -> None:
        """Adds `model` after each recovery budget: BN re-estimation, then fine-tuning
        from it; with no clusters, these are the budgets' baselines."""
        seed = self.config.seed + seed_index
        spec = recovered_spec(self.config, clusters, control, "bn", target)
        tag = f"{spec.key}.seed{seed}"
        model = stages.reestimate_bn(self.config, model, self.color, self.out.path("bn", tag), seed)
        self.add(spec, model, seed_index)
        if self.config.finetune_epochs:
            spec = recovered_spec(self.config, clusters, control, "finetune", target)
            model = stages.finetune(
                self.config, model, self.color, self.out.path("finetune", tag), seed
            )
            self.add(spec, model, seed_index)

    def scratch(self, merged, clusters: Mapping[int, int], seed_index: int, target: str) -> None:
        """Adds the scratch control of a merge: its widths trained afresh, compared with
        the merge in the last budget."""
        seed = self.config.seed + seed_index
        spec = recovered_spec(self.config, clusters, "scratch", self.config.budgets[-1], target)
        workdir = self.out.path("scratch", f"{spec.key}.seed{seed}")
        self.add(spec, stages.train_scratch(self.config, merged, workdir, seed), seed_index)


def _settings(config, color, chains, plans) -> dict[str, Any]:
    """The run's settings for the report; with one plan (or none) 'steps' and
    'budget_search' are as before sweeps, a sweep's hold one entry per plan."""
    steps = [[{"layer": layer, "clusters": count} for layer, count in c] for c in chains]
    return config_lib.to_json(config) | {
        "color_checkpoint": color.source,
        "steps": steps[0] if len(steps) == 1 else steps,
        "budget_search": budget.plans_to_json(plans) if plans else None,
    }
