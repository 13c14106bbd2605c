"""Everything compress writes: figures, clusters_layer*.json, one checkpoint per report
row, report.json and report.md. Every file is written atomically; the input checkpoint
is only read."""

import os
from collections.abc import Sequence
from typing import Any

from graycnn import checkpoint, io
from graycnn.compress import report
from graycnn.compress.stages import LayerResult, Model, Splits
from graycnn.compress.table import RowSpec
from graycnn.figures import clusters as cluster_figures
from graycnn.figures import receptive_fields as rf_figures
from graycnn.figures import report as report_figures


class Writer:
    """The files of one compress run under `workdir`.

    Raises:
        FileExistsError: `workdir` already holds a compress run.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        if os.path.exists(os.path.join(self.workdir, "models")):
            raise FileExistsError(
                f"{self.workdir} already holds a compress run; pass a new --workdir or delete it"
            )
        self.figures = os.path.join(self.workdir, "figures")

    def path(self, *parts: str) -> str:
        """A path inside the workdir (for stages that keep their own state, e.g. BN
        training checkpoints)."""
        return os.path.join(self.workdir, *parts)

    def data_figure(self, splits: Splits) -> None:
        report_figures.plot_color_vs_gray(
            splits.validation.images, os.path.join(self.figures, "color_vs_gray.png")
        )

    def layer(self, result: LayerResult) -> None:
        """The layer's fields (gray and color), distances, clusters and labels."""
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

    def model(self, model_dir: str, seed_index: int, spec: RowSpec, model: Model) -> str:
        """Saves a row's model under models/ (once per directory: the two color rows
        share one; seeds after the first get `.seed<k>`) and returns its path relative
        to the workdir."""
        name = model_dir if seed_index == 0 else f"{model_dir}.seed{seed_index}"
        directory = self.path("models", name)
        if not os.path.exists(directory):
            checkpoint.save_model(
                directory, model.config, model.variables, row=spec.name, view=spec.image_type
            )
        return os.path.relpath(directory, self.workdir)

    def finish(self, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
        """Writes report.json, report.md and the accuracy figure; returns the report."""
        result = {"rows": list(rows), "config": config | {"workdir": self.workdir}}
        io.write_json(self.path("report.json"), result)
        io.write_text(self.path("report.md"), report.format_report(result))
        report_figures.plot_pareto(result["rows"], os.path.join(self.figures, "pareto.png"))
        return result
