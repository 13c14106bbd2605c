"""graycnn: turn a color-trained CNN into a smaller gray one (README.md).

The library, for any Flax model (linen, or NNX): the names below, and the packages
`graycnn.graph` (tracing), `graycnn.merge`, `graycnn.compensate` and `graycnn.models`.
`graycnn.training` trains and evaluates; `graycnn.study` is the compress application
(its stages, budget, controls, statistics, report, pool and baselines);
`graycnn.transfer` takes a color model to the user's own gray task (a new head for any
linen or NNX model: `graycnn.transfer.replace_head`); `graycnn.cli` is the
command-line plumbing of experiments/.

Importing it changes no process state; CPU tuning is opt-in:
`graycnn.xla_options.enable_cpu_defaults()`.

Example:
    >>> gray = graycnn.fold_to_gray(model, variables)
    >>> fields = graycnn.compute_receptive_fields(model, gray, 1, image_shape=(32, 32, 1))
    >>> labels = graycnn.cluster.cluster(graycnn.pairwise(fields, "ssim"), "dbscan").labels
    >>> merged = graycnn.merge_layer(model, gray, 1, labels, input_shape=(1, 32, 32, 1))
"""

__version__ = "0.1.0"

import importlib as _importlib
import warnings as _warnings
from typing import TYPE_CHECKING

# The public API, name -> the module it lives in. Loaded on first use (PEP 562), so a
# script that imports one part of graycnn does not pay for the others' imports.
_API = {
    "compute_receptive_fields": "graycnn.receptive_field",
    "count_flops": "graycnn.graph",
    "fit_gray_coefficients": "graycnn.fold",
    "fold_to_gray": "graycnn.fold",
    "compensate_merge": "graycnn.compensate",
    "merge_layer": "graycnn.merge",
    "merge_layers": "graycnn.merge",
    "pairwise": "graycnn.distance",
    "plan_merge": "graycnn.merge",
    "plan_prune": "graycnn.merge",
    "rebuild": "graycnn.graph",
    "register_rule": "graycnn.graph",
    "trace": "graycnn.graph",
}
_PACKAGES = ("cluster", "compensate", "deploy", "graph", "merge", "models")
__all__ = [
    "cluster",
    "compensate",
    "compensate_merge",
    "compute_receptive_fields",
    "count_flops",
    "deploy",
    "fit_gray_coefficients",
    "fold_to_gray",
    "graph",
    "merge",
    "merge_layer",
    "merge_layers",
    "models",
    "pairwise",
    "plan_merge",
    "plan_prune",
    "rebuild",
    "register_rule",
    "trace",
]

if TYPE_CHECKING:
    from graycnn import cluster, compensate, deploy, graph, merge, models
    from graycnn.compensate import compensate_merge
    from graycnn.distance import pairwise
    from graycnn.fold import fit_gray_coefficients, fold_to_gray
    from graycnn.graph import count_flops, register_rule
    from graycnn.graph.rebuild import rebuild
    from graycnn.graph.trace import trace
    from graycnn.merge import merge_layer, merge_layers, plan_merge, plan_prune
    from graycnn.receptive_field import compute_receptive_fields

# Modules that moved into graycnn.training, graycnn.study and graycnn.cli: `from
# graycnn import data` keeps working for a release, with a DeprecationWarning.
_MOVED = {
    "data": "graycnn.training.data",
    "train": "graycnn.training.train",
    "evaluation": "graycnn.training.evaluation",
    "checkpoint": "graycnn.training.checkpoint",
    "parallel": "graycnn.training.parallel",
    "batchnorm": "graycnn.training.bn_reestimate",
    "compress": "graycnn.study",
    "baselines": "graycnn.study.baselines",
    "controls": "graycnn.study.controls",
    "stats": "graycnn.study.stats",
    "figures": "graycnn.study.figures",
    "runtime": "graycnn.cli.runtime",
    "workdir": "graycnn.cli.workdir",
}


def __getattr__(name: str):
    """The public API (`_API`, `_PACKAGES`), imported on first use; the moved modules
    (`_MOVED`), with a DeprecationWarning naming where they live now."""
    if name in _API:
        value = getattr(_importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name in _PACKAGES:
        return _importlib.import_module(f"graycnn.{name}")
    if name not in _MOVED:
        raise AttributeError(f"module 'graycnn' has no attribute {name!r}")
    _warnings.warn(
        f"graycnn.{name} moved to {_MOVED[name]}; import it from there",
        DeprecationWarning,
        stacklevel=2,
    )
    return _importlib.import_module(_MOVED[name])
