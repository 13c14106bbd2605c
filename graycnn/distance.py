"""Pairwise distances between receptive-field images, as jitted (N, N) matrices.

The study compared receptive fields with MSE (layer 1), SSIM and IMED (layer 2)
before clustering them. Every metric here takes a stack of images and returns
the full symmetric matrix with a zero diagonal, so that `graycnn.cluster` can
consume any of them.

Registered metrics (`METRICS`):
  - ``mse``: mean of squared differences over pixels and channels.
  - ``ssim``: ``1 - SSIM`` as computed by ``dm_pix.ssim`` (per-channel Gaussian
    windows, averaged over pixels and channels).
  - ``imed``: the Image Euclidean Distance of Wang, Zhang & Feng (TPAMI 2005),
    ``d = sqrt((x - y)^T G (x - y))`` with a Gaussian metric ``G`` over pixel
    positions; for C channels the squared distances add up over channels.

Precision: float32 input (and every other dtype but float64, cast to float32) is
computed in float32 and gives a float32 jax.Array. float64 input is computed in float64
(JAX's x64 mode is switched on for the call) and gives float64: a jax.Array when x64 is
on, else a numpy array, since outside x64 JAX would cut a float64 jax.Array back to
float32 at its next operation.

Example:
  >>> images = np.random.default_rng(0).random((36, 32, 32))
  >>> d = pairwise(images, "imed", sigma=1.0)  # (36, 36) float64 numpy array
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from graycnn.config import check_number

# The default of dm_pix.ssim; shrunk to the image size when none is given.
_DEFAULT_SSIM_FILTER_SIZE = 11
# Pairs per vmapped dm_pix.ssim batch: bounds memory at ~15 (chunk, H, W, C) temporaries.
_SSIM_PAIR_CHUNK = 512
# IMED's sigma, in pixels: the distances scale as 1/sigma at both ends (plain Euclidean
# distance below, a difference of image sums above), and past 1e+-15 leave float32.
_IMED_SIGMA_RANGE = (1e-6, 1e6)
# SSIM's window sigma: at 0.1 px the window is one pixel already (two for even sizes),
# and below ~0.04 an even window underflows to 0 / 0 = NaN.
_SSIM_MIN_FILTER_SIGMA = 0.1


def _keeps_float64(metric: Callable[..., jax.Array]) -> Callable[..., Any]:
    """Computes float64 images in float64: with x64 off, JAX would silently cast them to
    float32, so x64 is switched on for the call and the result comes back as numpy."""

    @functools.wraps(metric)
    def wrapper(images: Any, **options: Any) -> Any:
        try:
            dtype = np.asarray(images).dtype
        except ValueError:  # ragged: the metric says why
            dtype = None
        # jax.config declares no attribute per flag (they are set dynamically).
        if dtype != np.float64 or jax.config.jax_enable_x64:  # type: ignore[attr-defined]
            return metric(images, **options)
        with jax.enable_x64(True):
            return np.asarray(metric(images, **options))

    return wrapper


def _as_image_stack(images: Any) -> np.ndarray:
    """Validates a stack of images and returns it as (N, H, W, C) numpy.

    Args:
      images: (N, H, W) or (N, H, W, C) real numbers, or a sequence of N
        arrays of one shape (H, W) or (H, W, C).

    Returns:
      (N, H, W, C) array, C = 1 for gray input; float32/float64 kept, other
      dtypes cast to float32.

    Raises:
      ValueError: mismatched shapes, wrong rank, N < 2, empty images,
        non-numeric dtype, or non-finite values.
    """
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        shapes = {np.shape(image) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"images: all images must have the same shape, got {sorted(shapes)}")
    # np.asarray on a jax.Array copies to host; validation needs concrete values anyway.
    array = np.asarray(images)
    if array.dtype == bool or array.dtype.kind == "c" or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"images: expected real numbers, got dtype {array.dtype}")
    if array.ndim not in (3, 4):
        raise ValueError(f"images: expected shape (N, H, W) or (N, H, W, C), got {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"images: need at least 2 images for pairs, got N={array.shape[0]}")
    if min(array.shape[1:]) < 1:
        raise ValueError(f"images: empty image dimensions in shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"images: {bad} non-finite values (NaN or inf)")
    if not np.issubdtype(array.dtype, np.floating) or array.dtype.itemsize < 4:
        # float16 loses the Gram-form distances to cancellation.
        array = array.astype(np.float32)
    if array.ndim == 3:
        array = array[..., None]
    return array


def _rescale(array: np.ndarray) -> tuple[np.ndarray, float]:
    """(array / s, s) for a power of two s that brings the largest |value| near 1.

    Every metric is homogeneous (mse scales by s^2, imed by s, correlation and ssim with
    `data_range / s` not at all), and dividing by a power of two is exact, so the
    distances of huge (>= 1e20: squares overflow float32) or tiny (squares underflow)
    images are computed on values near 1 and scaled back. Values in a comfortable range
    are left alone (s = 1).
    """
    peak = float(np.max(np.abs(array)))
    if peak == 0.0 or 2.0**-16 <= peak <= 2.0**16:
        return array, 1.0
    scale = 2.0 ** math.floor(math.log2(peak))
    return array / np.asarray(scale, array.dtype), scale


def _scale_back(distances: jax.Array, factor: float, metric: str) -> jax.Array:
    """`distances * factor`, refusing results the output dtype cannot hold."""
    if factor == 1.0:
        return distances
    host = np.asarray(distances, np.float64) * factor
    info = jnp.finfo(distances.dtype)
    positive = host[host > 0]
    if not np.all(np.isfinite(host)) or np.max(host) > float(info.max):
        extreme = f"reach {np.max(host):.3g}"
    elif positive.size and positive.min() < float(info.tiny):
        extreme = f"go down to {positive.min():.3g}"  # They would flush to 0: all "equal".
    else:
        return jnp.asarray(host.astype(distances.dtype))
    raise ValueError(
        f"images: {metric} distances {extreme}, beyond the range of {distances.dtype}; "
        "multiply or divide the images by a constant (distances scale with it)"
    )


def _to_device(array: np.ndarray) -> jax.Array:
    # Without a dtype argument jnp.asarray keeps float64 under x64 and quietly
    # gives float32 otherwise; asking for float64 explicitly would warn.
    return jnp.asarray(array)


def _finish(sq: jax.Array) -> jax.Array:
    """Makes a matrix of squared distances exactly symmetric, >= 0, zero-diagonal."""
    sq = 0.5 * (sq + sq.T)
    sq = jnp.maximum(sq, 0.0)
    return jnp.where(jnp.eye(sq.shape[0], dtype=bool), 0.0, sq)


def _squared_euclidean(features: jax.Array) -> jax.Array:
    """(N, D) features -> (N, N) squared Euclidean distances via one Gram matrix.

    The Gram form costs N^2 D in a single matmul instead of N^2 D elementwise
    passes; centering first keeps |a|^2 + |b|^2 - 2ab from cancelling badly in
    float32 (distances are translation invariant).
    """
    features = features - jnp.mean(features, axis=0, keepdims=True)
    gram = jnp.matmul(features, features.T, precision=jax.lax.Precision.HIGHEST)
    norms = jnp.diagonal(gram)
    return _finish(norms[:, None] + norms[None, :] - 2.0 * gram)


@jax.jit
def _mse_core(images: jax.Array) -> jax.Array:
    flat = images.reshape(images.shape[0], -1)
    return _squared_euclidean(flat) / flat.shape[1]


@_keeps_float64
def pairwise_mse(images: Any) -> jax.Array:
    """Mean squared error between every pair of images.

    Args:
      images: (N, H, W) or (N, H, W, C) float.

    Returns:
      (N, N) float32, or float64 for float64 input (see the module doc): d_ij = mean over
      H, W (and C) of (x_i - x_j)^2.
    """
    stack, scale = _rescale(_as_image_stack(images))
    return _scale_back(_mse_core(_to_device(stack)), scale * scale, "mse")


@jax.jit
def _correlation_core(images: jax.Array) -> jax.Array:
    flat = images.reshape(images.shape[0], -1)
    flat = flat - jnp.mean(flat, axis=1, keepdims=True)
    norms = jnp.sqrt(jnp.sum(flat * flat, axis=1))
    flat = flat / jnp.where(norms > 0, norms, 1.0)[:, None]
    corr = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
    return _finish(jnp.clip(1.0 - corr, 0.0, 2.0))


@_keeps_float64
def pairwise_correlation(images: Any) -> jax.Array:
    """Correlation distance 1 - Pearson r between every pair of (flattened) images.

    Fed filter responses on real images (N filters, each (B, H, W)), it measures how
    interchangeable two channels are once a BatchNorm has normalized them: positively
    proportional responses have distance 0, which is why merging them is nearly lossless.

    Args:
      images: (N, H, W) or (N, H, W, C) float.

    Returns:
      (N, N) float in [0, 2]; a constant image has r = 0 with every other.
    """
    stack, _ = _rescale(_as_image_stack(images))  # Scale-invariant, but r^2 could overflow.
    return _correlation_core(_to_device(stack))


@functools.lru_cache(maxsize=32)
def gaussian_metric_sqrt(size: int, sigma: float) -> np.ndarray:
    """Square root of the 1-D factor of the IMED metric, in float64.

    The 2-D metric g_ij = exp(-|P_i - P_j|^2 / 2 sigma^2) / (2 pi sigma^2)
    factors as G = G_y (x) G_x with (G_1)_ab = exp(-(a - b)^2 / 2 sigma^2) /
    (sqrt(2 pi) sigma), so the standardizing transform G^(1/2) = G_y^(1/2) (x)
    G_x^(1/2) is two small matrix products per image.

    Args:
      size: number of pixel positions along one axis.
      sigma: width of the Gaussian in pixels, > 0.

    Returns:
      (size, size) float64 symmetric S with S @ S = G_1 (up to round-off).
    """
    positions = np.arange(size, dtype=np.float64)
    diff = positions[:, None] - positions[None, :]
    g1 = np.exp(-(diff**2) / (2.0 * sigma**2)) / (np.sqrt(2.0 * np.pi) * sigma)
    eigvals, eigvecs = np.linalg.eigh(g1)
    # G_1 is positive definite in exact arithmetic; for wide sigma its smallest
    # eigenvalues are round-off and may come out slightly negative.
    root = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
    root.setflags(write=False)
    return root


@jax.jit
def _imed_core(images: jax.Array, sqrt_y: jax.Array, sqrt_x: jax.Array) -> jax.Array:
    # u = (G_y^(1/2) (x) G_x^(1/2)) x per channel: N H W (H + W) work instead of
    # forming the (HW x HW) metric; then IMED is plain Euclidean distance on u.
    standardized = jnp.einsum(
        "ab,nbwc,dw->nadc",
        sqrt_y.astype(images.dtype),
        images,
        sqrt_x.astype(images.dtype),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.sqrt(_squared_euclidean(standardized.reshape(images.shape[0], -1)))


@_keeps_float64
def pairwise_imed(images: Any, *, sigma: float = 1.0) -> jax.Array:
    """Image Euclidean Distance (Wang, Zhang & Feng, TPAMI 2005) between every pair.

    d_ij^2 = (x_i - x_j)^T G (x_i - x_j), with g_kl = exp(-|P_k - P_l|^2 /
    2 sigma^2) / (2 pi sigma^2) over pixel positions P. Computed through the
    separable standardizing transform; cost N H W C (H + W) + N^2 H W C.

    Args:
      images: (N, H, W) or (N, H, W, C) float. Channels are independent: the
        squared distances of the C channels are summed.
      sigma: width of the Gaussian metric in pixels, in [1e-6, 1e6] (outside, IMED is
        plain Euclidean distance or a difference of image sums, scaled by 1/sigma, and
        soon leaves float32). Default 1.

    Returns:
      (N, N) float: the distances d_ij (not squared).
    """
    low, high = _IMED_SIGMA_RANGE
    sigma = check_number("sigma", sigma, low=low, high=high, why=" (pixels)")
    stack, scale = _rescale(_as_image_stack(images))
    sqrt_y = gaussian_metric_sqrt(stack.shape[1], float(sigma))
    sqrt_x = gaussian_metric_sqrt(stack.shape[2], float(sigma))
    return _scale_back(_imed_core(_to_device(stack), sqrt_y, sqrt_x), scale, "imed")


@functools.partial(jax.jit, static_argnames=("filter_size", "filter_sigma", "k1", "k2"))
def _ssim_core(images: jax.Array, data_range: jax.Array, **window: Any) -> jax.Array:
    """1 - dm_pix.ssim of every pair; `window`: its filter_size, filter_sigma, k1, k2."""
    n = images.shape[0]
    # SSIM is symmetric in its arguments, so only the upper triangle is computed.
    rows, cols = jnp.triu_indices(n, k=1)

    def ssim_of_pair(pair):
        return dm_pix.ssim(images[pair[0]], images[pair[1]], max_val=data_range, **window)

    # lax.map with batch_size vmaps over chunks of pairs: vectorized, bounded memory.
    values = jax.lax.map(ssim_of_pair, (rows, cols), batch_size=_SSIM_PAIR_CHUNK)
    upper = jnp.zeros((n, n), images.dtype).at[rows, cols].set(1.0 - values)
    return _finish(upper + upper.T)


@_keeps_float64
def pairwise_ssim(
    images: Any,
    *,
    data_range: float = 1.0,
    filter_size: int | None = None,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Structural dissimilarity 1 - SSIM between every pair, via dm_pix.ssim.

    Args:
      images: (N, H, W) or (N, H, W, C) float; channels are filtered
        separately and averaged, as dm_pix does.
      data_range: max - min of the value range the images live in (dm_pix's
        `max_val`); SSIM's stabilizers scale with it. Deprocessed receptive
        fields are in [0, 1], hence the default 1.0. Images spanning more than
        `data_range` raise, since SSIM would then be silently wrong.
      filter_size: Gaussian window size; must fit in the image. None uses
        min(11, H, W), so images as small as 8 x 8 work.
      filter_sigma: Gaussian window width in pixels, >= 0.1 (a one-pixel window
        already; smaller ones underflow to NaN).
      k1: SSIM luminance stabilizer constant, > 0.
      k2: SSIM contrast stabilizer constant, > 0. (k1 * data_range)^2 and
        (k2 * data_range)^2 must be normal numbers of the dtype (for images rescaled
        to a peak near 1).

    Returns:
      (N, N) float (float64 for float64 input): 1 - SSIM, clipped at 0 (SSIM(x, x) = 1
      up to round-off), in [0, 2].
    """
    stack = _as_image_stack(images)
    data_range = check_number("data_range", data_range, positive=True)
    span = float(stack.max() - stack.min())
    if span > data_range * (1 + 1e-6):
        raise ValueError(
            f"data_range={data_range} is smaller than the span of the images "
            f"[{stack.min():.6g}, {stack.max():.6g}]; pass data_range explicitly"
        )
    # SSIM(x / s, y / s) with data_range / s is SSIM(x, y): its constants scale too.
    stack, scale = _rescale(stack)
    window = _ssim_window(stack, data_range, scale, filter_size, filter_sigma, k1, k2)
    device_images = _to_device(stack)
    return _ssim_core(device_images, jnp.asarray(data_range / scale, device_images.dtype), **window)


def _ssim_window(
    stack: np.ndarray, data_range: float, scale: float, size: Any, sigma: Any, k1: Any, k2: Any
) -> dict[str, Any]:
    """Checks pairwise_ssim's filter_size, filter_sigma, k1 and k2 for the (N, H, W, C)
    `stack` rescaled by `scale`; returns them as _ssim_core's keywords."""
    shape = stack.shape[1:3]
    smallest = min(shape)
    if size is None:
        size = min(_DEFAULT_SSIM_FILTER_SIZE, smallest)
    is_int = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
    if not (is_int and 1 <= size <= smallest):
        raise ValueError(
            f"filter_size must be an int in [1, min(H, W) = {smallest}] for images of "
            f"shape {shape}, got {size}"
        )
    sigma = check_number("filter_sigma", sigma, low=_SSIM_MIN_FILTER_SIGMA, why=" (pixels)")
    k1, k2 = (check_number(name, k, positive=True) for name, k in (("k1", k1), ("k2", k2)))
    info = np.finfo(stack.dtype)
    for name, k in (("k1", k1), ("k2", k2)):
        # SSIM divides by (k data_range)^2 (plus variances, 0 for flat images): it must
        # be a normal number of the dtype, or flat pairs give inf / inf or 0 / 0 = NaN.
        constant = (k * data_range / scale) ** 2
        if not float(info.tiny) <= constant <= float(info.max):
            raise ValueError(
                f"{name}={k:g} with data_range={data_range:g} puts SSIM's constant "
                f"({name} * data_range)^2 = {constant:.3g} outside the range of "
                f"{stack.dtype} for these images; give data_range the span the images live in, "
                "and k1, k2 near their defaults 0.01, 0.03"
            )
    return dict(filter_size=int(size), filter_sigma=float(sigma), k1=k1, k2=k2)


def pairwise_merge_cost(responses: Any, jacobians: Any) -> np.ndarray:
    """How much merging each pair of channels changes a model's output, to first order.

    Merging channels i and k replaces both normalized responses n_i, n_k by their mean,
    so channel i moves by (n_k - n_i) / 2 and k by the opposite. Through the output's
    derivatives G (one per output, in each channel) the output c moves by

        T_c(i, k) = sum over positions of (G_ci - G_ck) (n_k - n_i) / 2,

    zero when the two respond alike (n_i = n_k) and when the rest of the network reads
    them alike (G_ci = G_ck): a pair of channels nothing downstream tells apart merges as
    freely as a pair of duplicates. With outputs whitened by the softmax's Fisher
    information (see `graycnn.study.stages.merge_costs`), 1/2 sum_c T_c^2 is the KL
    divergence the merge causes, to second order.

    Args:
        responses: (B, P, F) normalized responses of F channels at P positions of B
            images.
        jacobians: (B, C, P, F) derivatives of C outputs in the same responses.

    Returns:
        (F, F) float64 sqrt of the mean over images of 1/2 sum_c T_c^2: symmetric, zero
        diagonal, non-negative.
    """
    n = np.asarray(responses, np.float64)
    g = np.asarray(jacobians, np.float64)
    if n.ndim != 3 or g.ndim != 4 or g.shape[:1] + g.shape[2:] != n.shape:
        raise ValueError(
            f"responses must be (B, P, F) and jacobians (B, C, P, F) of the same B, P, F; "
            f"got {n.shape} and {g.shape}"
        )
    # M[b, c, i, k] = sum_p G_ci n_k; T = (M_ik + M_ki - M_ii - M_kk) / 2.
    m = np.einsum("bcpi,bpk->bcik", g, n)
    d = np.diagonal(m, axis1=2, axis2=3)
    t = ((m + np.swapaxes(m, 2, 3)) - (d[..., :, None] + d[..., None, :])) / 2  # symmetric
    cost = 0.5 * np.mean(np.sum(t**2, axis=1), axis=0)
    return np.sqrt(np.maximum(cost, 0.0))


METRICS: dict[str, Callable[..., jax.Array]] = {
    "mse": pairwise_mse,
    "ssim": pairwise_ssim,
    "imed": pairwise_imed,
    "correlation": pairwise_correlation,
}


def pairwise(images: Any, metric: str, **options: Any) -> jax.Array:
    """The (N, N) distance matrix of a stack of images under one metric.

    Args:
      images: (N, H, W) or (N, H, W, C) float, N >= 2, all finite.
      metric: a key of `METRICS`: "mse", "ssim", "imed" or "correlation".
      **options: keyword options of that metric, e.g. `sigma` for "imed",
        `data_range` and `filter_size` for "ssim" (see `pairwise_<metric>`).

    Returns:
      (N, N) float32 jax.Array, symmetric, zero diagonal, non-negative; for float64
      input float64, computed in float64: a jax.Array under x64, else a numpy array.

    Raises:
      ValueError: unknown metric (the message lists the known ones) or bad input,
        naming the argument.

    Example:
      >>> d = pairwise(np.zeros((3, 8, 8)), "mse")
      >>> d.shape
      (3, 3)
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {sorted(METRICS)}")
    return METRICS[metric](images, **options)
