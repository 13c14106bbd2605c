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
import jax.numpy as jnp
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
    out = jax.lax.conv_general_dilated_patches(inputs, spec.window, **_conv_args(spec))
    return out.reshape(-1, out.shape[-1])


def _conv_args(spec: LayerSpec) -> dict[str, Any]:
    """The layer's lax conv arguments after the input and the kernel (or window)."""
    return {
        "window_strides": spec.strides,
        "padding": spec.padding,
        "lhs_dilation": spec.input_dilation,
        "rhs_dilation": spec.kernel_dilation,
        "dimension_numbers": _DIMENSIONS[len(spec.window)],
        "precision": HIGHEST,
    }


def apply_matrix(inputs: jax.Array, matrix: jax.Array, spec: LayerSpec) -> jax.Array:
    """patches(inputs, spec) @ matrix without the patches: the layer with kernel
    `kernel_from_matrix(matrix)` and no bias, as (M, O) rows.

    Args:
        inputs: (N, *spatial, C) for a conv, (..., C) for dense.
        matrix: (D, O) a kernel in `kernel_matrix`'s layout.
        spec: The layer's LayerSpec.
    """
    if spec.kind == "dense":
        return jnp.matmul(patches(inputs, spec), matrix, precision=HIGHEST)
    channels = inputs.shape[-1]
    kernel = jnp.moveaxis(matrix.reshape(channels, *spec.window, -1), 0, -2)
    out = jax.lax.conv_general_dilated(inputs, kernel, **_conv_args(spec))
    return out.reshape(-1, out.shape[-1])


def normal_equations(
    inputs: jax.Array, residual: jax.Array, spec: LayerSpec
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(P^T P, P^T residual, P^T 1) for P = patches(inputs, spec), in float32.

    A 2-d conv of row stride 1 and a window of kh > 1 rows is summed without P: its
    patches at window row dy are the input rows shifted by dy, so the Gram's (dy, dy')
    block is the product of one row-shifted matrix R (width x channels of one window
    row, kw x C features) with itself d = dy' - dy rows further, over the output rows.
    One product per d serves every block of that d but for a few border rows, added row
    by row: kh products of (kw C)^2 instead of one of (kh kw C)^2, and no (M, D) patches
    for the cross products. Other layers form P.

    Args:
        inputs: (N, *spatial, C) for a conv, (..., C) for dense; rows that must not
            count (padding) set to zero.
        residual: (M, O) rows in `patches`' order.
        spec: The layer's LayerSpec.

    Returns:
        (D, D), (D, O) and (D,) float32 arrays, features in `patches`' order.
    """
    inputs = inputs.astype(jnp.float32)
    window = spec.window
    if (
        spec.kind != "conv"
        or len(window) != 2
        or window[0] == 1
        or spec.strides[0] != 1
        or any(d != 1 for d in spec.input_dilation)
    ):
        p = patches(inputs, spec)
        gram = jnp.matmul(p.T, p, precision=HIGHEST)
        return gram, jnp.matmul(p.T, residual, precision=HIGHEST), jnp.sum(p, axis=0)
    (kh, kw), dh = window, spec.kernel_dilation[0]
    shifted = _row_shifted(inputs, spec)  # (N, rows in, W', kw C)
    n, rows_in, width, features = shifted.shape
    rows_out = rows_in - (kh - 1) * dh
    channels = inputs.shape[-1]
    residual = residual.reshape(n, rows_out, width, -1)

    def flat(rows: slice) -> jax.Array:
        return shifted[:, rows].reshape(-1, features)

    # The Gram, (dy, dy') block by block: output row i reads input row i + dh * dy.
    blocks: dict[tuple[int, int], jax.Array] = {}
    for d in range(kh):
        offset = d * dh
        core_start = dh * (kh - 1 - d)  # every block of this d reads rows core_start..
        core = None
        if core_start < rows_out:
            first = flat(slice(core_start, rows_out))
            second = flat(slice(core_start + offset, rows_out + offset))
            core = jnp.matmul(first.T, second, precision=HIGHEST)
        for dy in range(kh - d):
            start = dh * dy
            edge = [r for r in range(start, start + rows_out) if not core_start <= r < rows_out]
            block = core if core is not None else jnp.zeros((features, features), jnp.float32)
            if edge:
                idx = np.asarray(edge)
                block = block + jnp.einsum(
                    "nrjk,nrjl->kl", shifted[:, idx], shifted[:, idx + offset], precision=HIGHEST
                )
            blocks[dy, dy + d] = block
            if d:
                blocks[dy + d, dy] = block.T
    gram = jnp.stack([jnp.stack([blocks[i, j] for j in range(kh)]) for i in range(kh)])
    # (dy, dy', (dx, c), (dx', c')) -> ((c, dy, dx), (c', dy', dx')), `patches`' order.
    gram = gram.reshape(kh, kh, kw, channels, kw, channels).transpose(3, 0, 2, 5, 1, 4)
    reads = [flat(slice(dh * dy, dh * dy + rows_out)) for dy in range(kh)]
    res = residual.reshape(-1, residual.shape[-1])
    cross = jnp.stack([jnp.matmul(r.T, res, precision=HIGHEST) for r in reads])
    ones = jnp.stack([jnp.sum(r, axis=0) for r in reads])
    size = channels * kh * kw

    def order(a: jax.Array) -> jax.Array:  # (kh, (kw, C), ...) -> ((C, kh, kw), ...)
        a = a.reshape(kh, kw, channels, *a.shape[2:])
        return jnp.moveaxis(a, 2, 0).reshape(size, *a.shape[3:])

    return gram.reshape(size, size), order(cross), order(ones)


def _row_shifted(inputs: jax.Array, spec: LayerSpec) -> jax.Array:
    """(N, H + padding, W', kw x C): the padded input's rows, each cut into the kw
    columns every output column reads (features (dx, c))."""
    (kh, kw), (dh, dw), (_, sw) = spec.window, spec.kernel_dilation, spec.strides
    spatial = inputs.shape[1:3]
    extent = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    pads = (
        jax.lax.padtype_to_pads(spatial, extent, spec.strides, spec.padding)
        if isinstance(spec.padding, str)
        else spec.padding
    )
    config = [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)]
    padded = jax.lax.pad(inputs, jnp.zeros((), inputs.dtype), config)
    width = (padded.shape[2] - extent[1]) // sw + 1
    cols = [padded[:, :, dw * dx : dw * dx + sw * (width - 1) + 1 : sw] for dx in range(kw)]
    return jnp.concatenate(cols, axis=-1)


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
