import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from graycnn.models import ModelConfig, build_model
from graycnn.models.conv import conv, conv_nhwc

_DIMS = ("NHWC", "HWIO", "NHWC")


def _grads(f, x, w):
    # A loss that weights every output differently, so a wrong tap or channel shows.
    def loss(x, w):
        y = f(x, w)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size)

    return jax.grad(loss, (0, 1))(x, w)


@pytest.mark.parametrize(
    "kernel, padding, size, c, f",
    [
        ((3, 3), "SAME", 6, 9, 4),  # a dense layer: input wider than output
        ((3, 3), "SAME", 6, 3, 8),  # the stem: input narrower
        ((1, 1), "VALID", 6, 10, 4),  # a transition
        ((2, 2), "VALID", 2, 12, 5),  # the head
        ((3, 3), ((0, 2), (1, 0)), 5, 6, 6),  # uneven padding
        ((2, 3), ((1, 0), (2, 1)), 5, 2, 7),
    ],
)
@pytest.mark.parametrize("forward_dot, kernel_dot", [(True, True), (True, False), (False, True)])
def test_custom_vjp_equals_autodiff_of_lax_conv(
    kernel, padding, size, c, f, forward_dot, kernel_dot
):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (3, size, size, c))
    w = jax.random.normal(k2, (*kernel, c, f))
    pads = padding
    if isinstance(padding, str):
        pads = tuple(lax.padtype_to_pads(x.shape[1:3], kernel, (1, 1), padding))

    def reference(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DIMS)

    want = _grads(reference, x, w)
    got = _grads(lambda x, w: conv_nhwc(x, w, pads, forward_dot, kernel_dot), x, w)
    np.testing.assert_allclose(
        conv_nhwc(x, w, pads, forward_dot, kernel_dot), reference(x, w), rtol=1e-5, atol=1e-5
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
    # conv(), as nn.Conv calls it, is the same function.
    dims = lax.conv_dimension_numbers(x.shape, w.shape, _DIMS)
    np.testing.assert_allclose(
        conv(x, w, (1, 1), padding, dimension_numbers=dims), reference(x, w), rtol=1e-5, atol=1e-5
    )


def test_uncovered_calls_are_lax_conv():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
    y = conv(x, w, (2, 2), "SAME", dimension_numbers=_DIMS)
    np.testing.assert_array_equal(
        y, lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=_DIMS)
    )


def test_densenet_keeps_variables_and_plain_convs_outside_training():
    model = build_model(ModelConfig("densenet_test")).clone(conv_dots="")
    fast = model.clone(conv_dots="train")
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(fast.init, jax.random.key(0), x) == variables
    assert jax.eval_shape(model.clone(conv_dots="always").init, jax.random.key(0), x) == variables

    def conv_functions(train, fast=fast):
        seen = []

        def record(f, args, kwargs, context):
            if isinstance(context.module, nn.Conv):
                seen.append(context.module.conv_general_dilated)
            return f(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(
                lambda v: fast.apply(v, x, train=train, mutable=["batch_stats"]), variables
            )
        return seen

    # Eval-mode forwards (the tracer's, compensation's) hold plain nn.Conv modules.
    assert len(conv_functions(False)) == 10 and not any(conv_functions(False))
    assert all(f is conv for f in conv_functions(True))
    # An evaluation step's model (build_model(..., eval_step=True)) uses them in eval mode.
    always = model.clone(conv_dots="always")
    assert len(conv_functions(False, always)) == 10
    assert all(f is conv for f in conv_functions(False, always))
    with pytest.raises(ValueError, match="conv_dots must be"):
        model.clone(conv_dots="yes").init(jax.random.key(0), x)


@pytest.mark.slow
def test_eval_step_model_computes_the_same_logits():
    # densenet_seed's widths (18-channel dense layers after 36 inputs and up), where the
    # forward dot is used in its dense layers, at one block of 6 layers to stay small.
    config = ModelConfig("densenet_seed", layers_per_block=(6, 1))
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), maxval=255.0)
    plain = build_model(config).clone(conv_dots="")
    variables = plain.init(jax.random.key(0), x)
    fast = build_model(config, eval_step=True)
    assert fast.conv_dots == "always"
    want = plain.apply(variables, x)
    np.testing.assert_allclose(
        fast.apply(variables, x), want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want)))
    )
