"""BatchNorm whose train-mode statistics take one pass over the input (a CPU speed-up).

XLA's CPU backend computes Flax's batch mean and mean square as two tree reductions
(`reduce-window` ops) after writing `x * x` to memory, and the backward pass as several
more; in a DenseNet, whose every BatchNorm normalizes a whole concatenation, that was a
quarter of a train step (BUILD_NOTES.md, Performance). `BatchNorm(one_pass=True)` sums
x and x * x in one variadic reduction, per image and then over the batch
(`batch_moments`), and `normalize`'s custom VJP sums both backward reductions in one
more. A caller may pass the statistics in (`moments`): a dense block computes each
channel's once, not once per later layer (graycnn.models.densenet). Same variables,
same update of the running statistics, equal results up to float rounding
(tests/test_models.py); inference, and any option this path does not cover
(axis_name, masks, other axes), is nn.BatchNorm's.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm, with `one_pass` train-mode statistics on request.

    Attributes:
        one_pass: Compute train-mode statistics and their gradients with fused one-pass
            reductions (faster on CPU); False is exactly nn.BatchNorm.
    """

    one_pass: bool = False

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None, moments=None):
        """nn.BatchNorm's call; in a covered train-mode call, `moments` ((C,) mean, (C,)
        biased variance), when given, are x's batch statistics computed by the caller
        (`batch_moments`), e.g. once for channels that several BatchNorms normalize."""
        running = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        covered = (
            self.one_pass
            and mask is None
            and self.axis_name is None
            and self.axis in (-1, x.ndim - 1)
            and self.use_scale
            and self.use_bias
            and self.use_fast_variance
            and x.dtype == jnp.float32
            and self.dtype in (None, jnp.float32)
            and self.param_dtype == jnp.float32
        )
        if running or not covered:
            return super().__call__(x, use_running_average, mask=mask)
        features = (x.shape[-1],)
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features
        )
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        mean, var = batch_moments(x) if moments is None else moments
        y = normalize(x, mean, var, scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of a, sum of b) over every axis but the last, reading both in one pass.

    Per image first (the pass XLA splits over the batch and threads), then over images.
    """
    zero = np.zeros((), a.dtype)
    axes = tuple(range(1, a.ndim - 1))
    sa, sb = lax.reduce((a, b), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]), axes)
    return jnp.sum(sa, axis=0), jnp.sum(sb, axis=0)


@jax.custom_vjp
def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Batch mean and biased variance (C,) of x (N, ..., C), as nn.BatchNorm's train mode
    computes them (E[x^2] - E[x]^2, clipped at 0), in one pass over x."""
    count = x.size // x.shape[-1]
    sum_x, sum_xx = _channel_sums(x, x * x)
    mean = sum_x / count
    return mean, jnp.maximum(0.0, sum_xx / count - mean * mean)


def _moments_forward(x):
    mean, var = batch_moments(x)
    return (mean, var), (x, mean)


def _moments_backward(residuals, cotangents):
    # Elementwise: d mean / dx = 1 / count, d var / dx = 2 (x - mean) / count.
    x, mean = residuals
    g_mean, g_var = cotangents
    count = x.size // x.shape[-1]
    return ((g_mean + 2.0 * g_var * (x - mean)) / count,)


batch_moments.defvjp(_moments_forward, _moments_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias for x (N, ..., C), the rest (C,).

    Its VJP sums both of its reductions in one pass over x; the gradients into mean and
    var flow on to whatever computed them (`batch_moments`), once per use.
    """
    return _normalize_forward(x, mean, var, scale, bias, epsilon)[0]


def _normalize_forward(x, mean, var, scale, bias, epsilon):
    rstd = lax.rsqrt(var + epsilon)
    return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _normalize_backward(epsilon, residuals, g):
    del epsilon
    x, mean, rstd, scale = residuals
    x_hat = (x - mean) * rstd
    sum_g, sum_g_xhat = _channel_sums(g, g * x_hat)
    g_mean = -rstd * scale * sum_g
    g_var = -0.5 * scale * rstd * rstd * sum_g_xhat
    return g * (rstd * scale), g_mean, g_var, sum_g_xhat, sum_g


normalize.defvjp(_normalize_forward, _normalize_backward)
