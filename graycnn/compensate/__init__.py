"""Data-aware compensation of a merge: refit each consumer to its original outputs.

See `graycnn.compensate.compensation` for the method and its choices, `layer` for the
patches and the ridge solve of one layer.

Example:
    >>> plan = merge.plan_merge(graph.trace(model, gray, shape), 1, labels)
    >>> images = data.apply_view(train.images[:512], "gray")
    >>> new, report = compensate_merge(model, gray, plan, images, input_shape=shape)
"""

from graycnn.compensate.compensation import (
    BN_MODES,
    BatchNormSite,
    batchnorm_sites,
    compensate,
    compensate_merge,
)
from graycnn.compensate.layer import (
    LayerSpec,
    apply_matrix,
    kernel_from_matrix,
    kernel_matrix,
    layer_spec,
    normal_equations,
    output_map,
    patches,
    ridge_solve,
)
from graycnn.compensate.passes import Teacher

__all__ = [
    "BN_MODES",
    "BatchNormSite",
    "LayerSpec",
    "Teacher",
    "apply_matrix",
    "batchnorm_sites",
    "compensate",
    "compensate_merge",
    "kernel_from_matrix",
    "kernel_matrix",
    "layer_spec",
    "normal_equations",
    "output_map",
    "patches",
    "ridge_solve",
]
