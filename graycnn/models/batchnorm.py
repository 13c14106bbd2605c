"""BatchNorm whose train-mode statistics take one pass over the input (a CPU speed-up).

XLA's CPU backend computes Flax's batch mean and mean square as two tree reductions
(`reduce-window` ops) after writing `x * x` to memory, and the backward pass as several
more; in a DenseNet, whose every BatchNorm normalizes a whole concatenation, that was a
quarter of a train step (BUILD_NOTES.md, Performance). `BatchNorm(one_pass=True)` sums
x and x * x in one variadic reduction, per image and then over the batch, and its custom
VJP sums both backward reductions in one more. Same variables, same update of the running
statistics, equal results up to float rounding (tests/test_models.py); inference, and
any option this path does not cover (axis_name, masks, other axes), is nn.BatchNorm's.
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
    def __call__(self, x, use_running_average=None, *, mask=None):
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
        y, mean, var = normalize_batch(x, scale, bias, self.epsilon)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch-normalizes x (N, ..., C) with its own statistics, as nn.BatchNorm in train mode.

    Returns:
        (y like x, batch mean (C,), biased batch variance (C,)).
    """
    return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    count = x.size // x.shape[-1]
    sum_x, sum_xx = _channel_sums(x, x * x)
    mean = sum_x / count
    # nn.BatchNorm's fast variance: E[x^2] - E[x]^2, clipped at 0.
    var = jnp.maximum(0.0, sum_xx / count - mean * mean)
    rstd = lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _backward(epsilon, residuals, cotangents):
    del epsilon
    x, mean, rstd, scale = residuals
    g, g_mean, g_var = cotangents
    count = x.size // x.shape[-1]
    centered = x - mean
    x_hat = centered * rstd
    sum_g, sum_g_xhat = _channel_sums(g, g * x_hat)
    # d/dx of y through x_hat, mean and var; then the direct terms of the mean and var
    # outputs (zero in training, where they only feed the running statistics).
    g_x = (rstd * scale) * (g - (sum_g + x_hat * sum_g_xhat) / count)
    g_x = g_x + (g_mean + 2.0 * g_var * centered) / count
    return g_x, sum_g_xhat, sum_g


normalize_batch.defvjp(_forward, _backward)
