"""Everything compress writes: run.json (the settings), budget_search.json (each target's
plan), figures, clusters_layer*.json, one checkpoint per report row and per refit
(refits/), report.json and report.md. Every file is written atomically; the input
checkpoint is only read. In a multi-process run process 0 writes them all (every process
takes part in the checkpoints' saves), and reads what decides a resume for all.

A run is resumable: its settings are written first, and a rerun of the same settings
into the same workdir finds every finished checkpoint (rows, refits, BN training,
fine-tuning) and recomputes only the rest, with the same seeds, so it ends with the
report an uninterrupted run writes. Different settings are refused.
"""

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from graycnn import io
from graycnn.study import report
from graycnn.study.config import ALLOCATION
from graycnn.study.figures import charts
from graycnn.study.figures import clusters as cluster_figures
from graycnn.study.figures import receptive_fields as rf_figures
from graycnn.study.schema import Compensation, Report, Row
from graycnn.study.stages import LayerResult, Model, Splits
from graycnn.study.table import RowSpec
from graycnn.training import checkpoint, parallel


class Writer:
    """The files of one compress run under `workdir`.

    Args:
        settings: The run's settings (JSON); a workdir holding a run with other
            settings is refused, one with the same settings is resumed.

    Raises:
        FileExistsError: `workdir` is a file, or holds a run of other settings.
        ValueError: `workdir` cannot be written.
    """

    def __init__(self, workdir: str, settings: Mapping[str, Any]):
        self.workdir = os.path.abspath(workdir)
        self.figures = os.path.join(self.workdir, "figures")
        self.compensations: list[Compensation] = []
        self.settings = json.loads(json.dumps(dict(settings)))  # as it reads back
        # Process 0's verdict: another process could already see the files it writes.
        refusal = parallel.from_primary(self._refusal)
        if refusal is not None:
            raise FileExistsError(refusal)

    def _refusal(self) -> str | None:
        """Why the workdir cannot take this run, or None."""
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            return f"--workdir {self.workdir} is a file, not a directory"
        run = self.path("run.json")
        settings = self.settings
        if os.path.exists(run):
            with open(run) as f:
                before = _upgraded(json.load(f))
            changed = sorted(k for k in before.keys() | settings.keys()
                             if before.get(k) != settings.get(k))  # fmt: skip
            if changed:
                return (
                    f"{self.workdir} holds a compress run with other settings ("
                    + ", ".join(
                        f"{k}: {before.get(k)!r} there, {settings.get(k)!r} now"
                        for k in changed[:4]
                    )  # fmt: skip
                    + "); pass a new --workdir, or delete it"
                )
        elif os.path.exists(self.path("models")):
            return f"{self.workdir} already holds a compress run; pass a new --workdir or delete it"
        return None

    def begin(self) -> None:
        """Records the run's settings: call once every input is checked, before the long
        work, so that a failed check leaves nothing behind and a rerun can resume."""
        if not parallel.primary():
            return
        try:
            io.write_json(self.path("run.json"), self.settings)
        except OSError as e:
            raise ValueError(f"--workdir {self.workdir} is not writable: {e}") from None

    def computed_once(self, name: str, compute: Callable[[], Any], everywhere: bool = True) -> Any:
        """compute()'s JSON result, kept as `name` in the workdir with the run's
        settings: a rerun of the same settings reads it back instead of computing it
        again (the budget search, minutes, runs before `begin`).

        Args:
            everywhere: Every process computes (`compute` runs collectives, as the budget
                search's evaluations do); else process 0 alone, shared with the others
                (the speed table: one device's timings).
        """
        path = self.path(name)

        def saved() -> Any:
            if os.path.exists(path):
                with open(path) as f:
                    found = json.load(f)
                if _upgraded(found.get("settings") or {}) == self.settings:
                    return found
            return None

        found = parallel.from_primary(saved)
        if found is not None:
            return found["result"]
        result = compute() if everywhere else parallel.from_primary(compute)
        if parallel.primary():
            io.write_json(path, {"settings": self.settings, "result": result})
        return result

    def path(self, *parts: str) -> str:
        """A path inside the workdir (for stages that keep their own state, e.g. BN
        training checkpoints)."""
        return os.path.join(self.workdir, *parts)

    def data_figure(self, splits: Splits) -> None:
        if not parallel.primary():
            return
        charts.plot_color_vs_gray(
            splits.validation.images, os.path.join(self.figures, "color_vs_gray.png")
        )

    def layer(self, result: LayerResult) -> None:
        """The layer's fields (gray and color), distances, clusters and labels."""
        if not parallel.primary():
            return
        layer, path = result.layer, result.path
        rf_figures.plot_receptive_fields(
            result.fields.fields,
            os.path.join(self.figures, f"fields_gray_layer{layer}.png"),
            title=f"layer {layer} ({path}) of the gray model",
        )
        if result.color_fields is not None:
            rf_figures.plot_color_and_gray(
                result.color_fields,
                os.path.join(self.figures, f"fields_color_layer{layer}.png"),
                title=f"layer {layer} ({path}) of the color model",
            )
        labels = result.clustering.labels
        cluster_figures.plot_distance_matrix(
            result.distances,
            labels,
            os.path.join(self.figures, f"distances_layer{layer}.png"),
            title=f"layer {layer}: {result.metric} distances",
        )
        cluster_figures.plot_clusters(
            result.fields.fields[..., 0],
            labels,
            os.path.join(self.figures, f"clusters_layer{layer}.png"),
        )
        io.write_json(
            self.path(f"clusters_layer{layer}.json"),
            {
                "layer": layer,
                "path": path,
                "labels": labels.tolist(),
                "members": result.clustering.members,
                "eps": result.clustering.eps,
            },
        )

    def compensation(
        self, layer: int, control: str | None, seed: int, errors: Sequence[dict[str, Any]]
    ) -> None:
        """Keeps each consumer's reconstruction error before and after compensation, for
        report.json and report.md."""
        for e in errors:
            self.compensations.append(
                Compensation(
                    layer=layer,
                    chain=control or "merged",
                    seed=seed,
                    **{k: e[k] for k in ("consumer", "images", "error_before", "error_after")},
                )
            )

    def model(self, model_dir: str, seed_index: int, spec: RowSpec, model: Model) -> str:
        """Saves a row's model under models/ (once per directory: the two color rows
        share one; seeds after the first get `.seed<k>`) and returns its path relative
        to the workdir."""
        name = model_dir if seed_index == 0 else f"{model_dir}.seed{seed_index}"
        directory = self.path("models", name)
        # Every process saves (orbax's barriers), so all must agree whether to.
        if not parallel.from_primary(lambda: _kept(directory)):
            checkpoint.save_model(
                directory, model.config, model.variables, row=spec.name, view=spec.image_type
            )
        return os.path.relpath(directory, self.workdir)

    def refit(
        self, name: str, compute: Callable[[], tuple[Model, list[dict[str, Any]]]]
    ) -> tuple[Model, list[dict[str, Any]]]:
        """compute()'s refit model and its consumers' errors, kept under refits/`name`: a
        rerun of the same settings loads them instead of refitting again (the refit of a
        large model takes minutes)."""
        directory = self.path("refits", name)
        if parallel.from_primary(lambda: _kept(directory)):
            model_config, variables, extra = checkpoint.load_model(directory)
            return Model(model_config, variables), extra["errors"]
        model, errors = compute()
        errors = json.loads(json.dumps(errors, default=float))  # as it reads back
        checkpoint.save_model(directory, model.config, model.variables, errors=errors)
        return model, errors

    def finish(self, rows: Sequence[Row], config: dict[str, Any]) -> Report:
        """Writes report.json, report.md and the accuracy figure; returns the report."""
        result = Report(
            rows=tuple(rows),
            compensation=tuple(self.compensations),
            config=config | {"workdir": self.workdir},
        )
        if not parallel.primary():
            return result
        io.write_json(self.path("report.json"), result.to_json())
        io.write_text(self.path("report.md"), report.format_report(result))
        charts.plot_pareto(result.rows, os.path.join(self.figures, "pareto.png"))
        if config.get("speed"):
            batch = max(config["speed"]["batch_sizes"])
            charts.plot_speed(result.rows, batch, os.path.join(self.figures, "speed.png"))
        return result


def _upgraded(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as an older run wrote them, as this one writes them: a --target_* was
    one fraction (0: none), now a list; --round_to's default was 1, now 0, the same
    without a --target_* (so such runs still resume); a run before --search_images
    or --allocation searched with their defaults; --allocation's default was 'additive',
    now 'checked', the same without a --target_flops or --target_params."""
    out = {"search_images": 0, "allocation": "additive"} | dict(settings)
    targets = ("target_flops", "target_params", "target_latency")
    for key in targets:
        value = out.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = [value] if value else []
    if out.get("round_to") == 1 and not any(out.get(k) for k in targets):
        out["round_to"] = 0
    if out["allocation"] == "additive" and not any(out.get(k) for k in targets[:2]):
        out["allocation"] = ALLOCATION
    return out


def _kept(directory: str) -> bool:
    """Whether `directory` holds a complete checkpoint; a partial one (its save killed
    midway) is removed, to be saved again."""
    if checkpoint.is_complete(directory):
        return True
    shutil.rmtree(directory, ignore_errors=True)
    return False
