"""Models and helpers shared by the graycnn.merge tests (no tests of its own).

The user-style models are written here, not taken from graycnn.models, to check that
the tracer needs nothing from the project's architectures.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.tree import flatten, unflatten


class VGG(nn.Module):
    """conv-BN-ReLU-maxpool, conv(bias)-ReLU, flatten, dense-ReLU-dense."""

    padding: str = "SAME"
    batchnorm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x / 255.0
        x = nn.Conv(6, (3, 3), padding=self.padding, use_bias=not self.batchnorm, name="conv1")(x)
        if self.batchnorm:
            x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(5, (3, 3), padding=self.padding, name="conv2")(x)
        x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(7, name="fc1")(x))
        return nn.Dense(3, name="fc2")(x)


class Residual(nn.Module):
    """A stem and two residual adds; `res3` both reads and feeds the residual group."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x / 255.0 - 0.5
        x = nn.Conv(6, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        y = nn.relu(nn.Conv(4, (3, 3), name="res1")(x))
        y = nn.Conv(6, (3, 3), name="res2")(y)
        x = nn.relu(x + y)
        x = x + nn.Conv(6, (1, 1), name="res3")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(3, name="head")(x)


class LayerNormNet(nn.Module):
    """conv1's channels are mixed by a LayerNorm: not mergeable."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.LayerNorm(name="ln")(x)
        x = nn.Conv(3, (3, 3), name="conv2")(x)
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


class SliceNet(nn.Module):
    """conv2 reads only the first 3 of conv1's 4 channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.Conv(3, (3, 3), name="conv2")(x[..., :3])
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


class UNet(nn.Module):
    """U-Net-like: an encoder conv, a strided conv down, a ConvTranspose back up, its
    output concatenated with the encoder's (the skip), a decoder conv, a head."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        skip = nn.Conv(6, (3, 3), use_bias=False, name="enc")(x / 255.0)
        skip = nn.relu(nn.BatchNorm(use_running_average=not train, name="enc_bn")(skip))
        y = nn.relu(nn.Conv(5, (3, 3), strides=2, name="down")(skip))
        y = nn.relu(nn.ConvTranspose(4, (2, 2), strides=(2, 2), name="up")(y))
        x = nn.relu(nn.Conv(4, (3, 3), name="dec")(jnp.concatenate([y, skip], axis=-1)))
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(6, (3, 3), name="conv2")(nn.relu(nn.Conv(4, (3, 3), name="conv1")(x)))


class RematNet(nn.Module):
    """A stem, then a residual block under nn.remat (recomputed in backward)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(6, (3, 3), use_bias=False, name="stem")(x / 255.0)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = nn.relu(x + nn.remat(_Block)(name="block")(x))
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


USER_MODELS = {
    "vgg": VGG,
    "vgg_valid": lambda: VGG(padding="VALID"),
    "residual": Residual,
    "unet": UNet,
    "remat": RematNet,
}


def user_model(name: str) -> tuple[nn.Module, dict, tuple[int, ...]]:
    """(module, perturbed variables, input shape) of a model defined in this file."""
    model = USER_MODELS[name]()
    shape = (1, 8, 8, 3)
    variables = model.init(jax.random.key(0), jnp.zeros(shape))
    return model, perturb(variables), shape


@functools.cache
def project_model(name: str) -> tuple[nn.Module, dict, tuple[int, ...]]:
    """(module, perturbed variables, input shape) of a registered model.

    Kernels are He-normal numpy draws on `eval_shape`'s shapes: compiling a real init
    of densenet_tiny costs more than every merge test together.
    """
    config = ModelConfig(name)
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    return build_model(config), perturb(he_normal(shapes)), config.input_shape


def he_normal(shapes: dict) -> dict:
    """Seeded numpy draws for a tree of shapes: He-normal kernels, N(0, 1) elsewhere."""
    rng = np.random.default_rng(0)
    variables = {}
    for path, s in flatten(shapes).items():
        fan_in = int(np.prod(s.shape[:-1])) if path.endswith("/kernel") else 1
        variables[path] = rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape).astype(np.float32)
    return unflatten(variables)


def any_model(name: str):
    if name in USER_MODELS:
        return user_model(name)
    return project_model(name)


def perturb(variables, seed: int = 0) -> dict:
    """Random BN statistics, scales and biases, so merging them is really exercised."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, x in flatten(variables).items():
        x = np.asarray(x, np.float32)
        if path.endswith("/var"):
            x = rng.uniform(0.3, 3.0, x.shape)
        elif path.endswith("/mean") or path.endswith("/bias"):
            x = rng.normal(0.0, 0.5, x.shape)
        elif path.endswith("/scale"):
            x = rng.uniform(0.5, 1.5, x.shape)
        out[path] = np.asarray(x, np.float32)
    return unflatten(out)


def tie_clusters(graph, variables, path: str, labels) -> dict:
    """Copies, within each cluster, the first member's filter and every per-channel
    parameter (conv bias, BatchNorm vectors) over the other members', in every conv of
    the residual group of `path`. Consumer kernels are left alone: their slices are
    summed, which is exact for any values."""
    labels = np.asarray(labels)
    first = np.array([np.flatnonzero(labels == k)[0] for k in labels])
    flat = {p: np.array(v) for p, v in flatten(variables).items()}
    members = set(graph.group(path))
    for use in graph.uses_of(path):
        if use.kind == "contract":
            continue
        leaf, pos = np.moveaxis(flat[use.leaf], use.axis, 0), 0
        for seg in use.segments:
            if seg.source in members:
                leaf[pos : pos + seg.length] = leaf[pos + first]
            pos += seg.length
    return unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, images):
    return model.apply(variables, images, train=False)


def logits(model, variables, images) -> np.ndarray:
    """Inference logits, float64; compiled once per (module, shapes)."""
    return np.asarray(_apply(model, variables, images), np.float64)


def images(shape, seed: int = 1) -> np.ndarray:
    """Random 0-255 float32 images (N=4) of `shape`'s H, W, C."""
    return np.random.default_rng(seed).uniform(0, 255, (4, *shape[1:])).astype(np.float32)
