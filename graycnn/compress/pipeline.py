"""The whole study in one call: fold a color model to gray, then for each layer compare
the filters, cluster and merge them, re-estimate BatchNorm, and evaluate every model.

Every row of the report is a model saved under `workdir/models/`, loadable by
`experiments.evaluate` with no further flags. The input checkpoint is only read.
"""

from typing import Any

from tqdm.auto import tqdm

from graycnn import config as config_lib
from graycnn.compress import stages
from graycnn.compress.config import CompressConfig, validate
from graycnn.compress.writer import Writer


def compress(config: CompressConfig, workdir: str) -> dict[str, Any]:
    """Runs the study; writes report.json, report.md, figures and one checkpoint per row.

    Returns:
        The report: {'rows': [...], 'config': {...}}.
    """
    out = Writer(workdir)
    validate(config)
    color = stages.color_model(config, out.path("color_model"))
    validate(config, len(color.graph().conv_order))
    splits = stages.load_splits(config)
    out.data_figure(splits)
    rows, checkpoints = [], []

    def add(name: str, key: str, view: str, model: stages.Model, **kw: Any) -> None:
        row = stages.evaluate(name, key, view, model, splits.validation, **kw)
        rows.append(row)
        checkpoints.append(out.model(row, model))
        tqdm.write(
            f"{name}: accuracy {row.accuracy:.4f}, {row.params:,} params, {row.flops:,} FLOPs"
        )

    def bn(model: stages.Model, key: str) -> stages.Model:
        return stages.reestimate_bn(config, model, out.path("bn", key))

    add("color model, color images", "color", "color", color)
    add("color model, gray images (naive)", "color", "gray3", color)
    gray = stages.fold_to_gray(config, color, splits.train)
    add(f"gray fold ({config.fold}), no BN re-estimation", "gray_fold", "gray", gray, bn="none")
    add("gray + BN re-estimation, no merge", "gray_bn", "gray", bn(gray, "gray"), bn=config.bn,
        baseline=True)  # fmt: skip
    # Merges chain on trees without BN re-estimation, and every row gets one re-estimation
    # of the baseline's budget: a deeper merge gets no extra BN training.
    current, clusters = gray, {}
    for layer in tqdm(config.layers, desc="layers", leave=False):
        result = stages.merge_layer(config, current, layer, splits.train, color)
        out.layer(result)
        current, clusters[layer] = result.merged, result.clustering.num_clusters
        names = "+".join(map(str, clusters))
        title = f"merged {'layers' if len(clusters) > 1 else 'layer'} {names}"
        add(f"{title}, no BN re-estimation", f"merged_{names}_raw", "gray", current,
            clusters=dict(clusters), bn="none")  # fmt: skip
        add(f"{title} + BN re-estimation", f"merged_{names}", "gray",
            bn(current, f"merged_{names}"), clusters=dict(clusters), bn=config.bn)  # fmt: skip
    settings = config_lib.to_json(config) | {"color_checkpoint": color.source}
    return out.finish(rows, checkpoints, settings)
