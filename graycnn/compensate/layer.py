"""The linear algebra of refitting one conv or dense layer: patches, kernels, ridge.

A flax nn.Conv computes out = patches(x) @ kernel_matrix(kernel) + bias, row by row
(one row per image and output position); a dense layer is the case where the input is
its own patch. The patches are `lax.conv_general_dilated_patches`', whose features are
ordered channel-major, (c, *window), so the (*window, C, O) kernel is moved to (C,
*window, O) before it is flattened.

Example:
    >>> spec = layer_spec(conv_module)
    >>> out = patches(x, spec) @ kernel_matrix(kernel)   # (N * H' * W', O)
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import scipy.linalg
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 or bf16 passes on GPUs
# lax dimension numbers of a channels-last conv of 1, 2 or 3 spatial dimensions.
_DIMENSIONS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the fit needs of a consumer module: how its patches are cut.

    Attributes:
        kind: 'conv' (flax nn.Conv) or 'dense' (flax nn.Dense).
        window: The conv's kernel size (spatial), () for dense.
        strides, padding, input_dilation, kernel_dilation: As lax takes them.
        use_bias: Whether the module adds a bias.
    """

    kind: str
    window: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: Any = "VALID"
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()
    use_bias: bool = False


def layer_spec(module: Any, path: str | None = None) -> LayerSpec:
    """The LayerSpec of a flax Conv or Dense (linen's nn.Conv, nn.Dense; NNX's nnx.Conv,
    nnx.Linear), at module path `path` (linen modules know theirs).

    Raises:
        ValueError: naming the module, for any other module, a grouped or masked conv,
            or padding done outside lax (CIRCULAR, REFLECT, CAUSAL).
    """
    name = path or (
        "/".join(module.path)
        if getattr(module, "scope", None) is not None
        else type(module).__name__
    )
    if isinstance(module, nn.Dense | nnx.Linear):
        return LayerSpec("dense", use_bias=bool(module.use_bias))
    if not isinstance(module, nn.Conv | nnx.Conv):
        raise ValueError(
            f"consumer {name!r} is a {type(module).__name__}: compensation refits flax "
            "nn.Conv and nn.Dense (nnx.Conv, nnx.Linear) layers only"
        )
    size = module.kernel_size
    window = (int(size),) if isinstance(size, int) else tuple(int(k) for k in size)

    def per_axis(v: Any) -> tuple[int, ...]:
        v = 1 if v is None else v
        return (int(v),) * len(window) if isinstance(v, int) else tuple(int(i) for i in v)

    padding = nn.linear.canonicalize_padding(module.padding, len(window))
    if (
        module.feature_group_count != 1
        or module.mask is not None
        or padding in ("CIRCULAR", "REFLECT", "CAUSAL")
        or len(window) not in _DIMENSIONS
    ):
        raise ValueError(
            f"consumer {name!r}: compensation supports convs of 1-3 spatial dims without "
            "feature groups, masks or CIRCULAR/REFLECT/CAUSAL padding"
        )
    return LayerSpec(
        "conv",
        window,
        per_axis(module.strides),
        padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        per_axis(module.input_dilation),
        per_axis(module.kernel_dilation),
        bool(module.use_bias),
    )


def patches(inputs: jax.Array, spec: LayerSpec) -> jax.Array:
    """The im2col matrix of a layer's input: patches(x) @ kernel_matrix(k) = layer(x).

    Args:
        inputs: (N, *spatial, C) for a conv, (..., C) for dense.
        spec: The layer's LayerSpec.

    Returns:
        (M, D): M = N x output positions rows, in the order of the layer's output
        reshaped to (M, O); D = C x prod(window) features, channel-major (c, *window).
    """
    if spec.kind == "dense":
        return inputs.reshape(-1, inputs.shape[-1])
    out = jax.lax.conv_general_dilated_patches(
        inputs,
        spec.window,
        spec.strides,
        spec.padding,
        lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=_DIMENSIONS[len(spec.window)],
        precision=HIGHEST,
    )
    return out.reshape(-1, out.shape[-1])


def kernel_matrix(kernel: Any) -> np.ndarray:
    """(*window, C, O) kernel -> (C x prod(window), O), rows in `patches`' order; a dense
    (C, O) kernel is its own matrix."""
    kernel = np.asarray(kernel)
    return np.moveaxis(kernel, -2, 0).reshape(-1, kernel.shape[-1])


def kernel_from_matrix(matrix: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of `kernel_matrix` for a kernel of `shape`."""
    shape = tuple(shape)
    return np.moveaxis(np.reshape(matrix, (shape[-2], *shape[:-2], shape[-1])), 0, -2)


def ridge_solve(gram: Any, cross: Any, ridge: float) -> tuple[np.ndarray, float]:
    """argmin_X ||P X - R||^2 + lam ||X||^2 from G = P^T P and B = P^T R, in float64.

    Args:
        gram: (D, D) P^T P.
        cross: (D, O) P^T R.
        ridge: lam = ridge x trace(G) / D, the Gram's mean eigenvalue scaled: the
            same relative damping whatever the input's scale.

    Returns:
        (X (D, O), lam). With lam = 0 and a singular G: the least-norm solution.
    """
    gram = np.asarray(gram, np.float64)
    cross = np.asarray(cross, np.float64)
    lam = float(ridge) * float(np.trace(gram)) / max(gram.shape[0], 1)
    system = gram + lam * np.eye(gram.shape[0])
    try:
        return scipy.linalg.solve(system, cross, assume_a="pos"), lam
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(system, cross, rcond=None)[0], lam


def output_map(labels: Any) -> np.ndarray:
    """(K, F): a merged conv's K outputs as a map of its F original ones. Row k averages
    the filters labelled k; filters labelled -1 (pruned) are read by no row."""
    labels = np.asarray(labels)
    one_hot = (labels[None, :] == np.arange(labels.max() + 1)[:, None]).astype(np.float64)
    return one_hot / one_hot.sum(axis=1, keepdims=True)
