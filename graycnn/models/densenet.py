"""The study's DenseNet (32x32 images), and smaller variants of the same design.

Topology (Keras notebook "Densenet_on_Cifar_10"): a 3x3 stem conv; dense blocks of
BN-ReLU-Conv3x3 layers whose outputs are concatenated to their inputs; transitions
BN-ReLU-Conv1x1-AvgPool2 between blocks; a head BN-ReLU-AvgPool2-Conv2x2(valid, bias).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from graycnn.models.common import BN_EPSILON, BN_MOMENTUM, Widths, scale_input, width_of
from graycnn.models.conv import conv as conv_with_dots
from graycnn.models.one_pass_bn import BatchNorm, batch_moments


class DenseNet(nn.Module):
    """DenseNet of `num_blocks` blocks of `layers_per_block` layers.

    Conv paths (the keys of `widths`): `stem`, `block{b}/layer{l}/conv`,
    `transition{b}/conv`, `head/conv`. Every BatchNorm sits in front of the conv
    that reads its output, at the sibling path ending in `bn`.

    Attributes:
        num_classes: Output classes.
        stem_features: Filters of the stem conv (the study: 36).
        growth_rate: Filters of each dense layer (the study: 18).
        transition_features: Filters of each transition conv (the study: 18).
        layers_per_block: Dense layers in each block, e.g. (12, 12, 12, 12).
        widths: Output-width overrides, ((conv path, width), ...), for merged models.
        input_scale, input_offset: The model sees (pixels - offset) * scale, where pixels
            are 0-255 (the study: 1 and 0, raw pixels).
        bn_one_pass: Train-mode BatchNorm statistics in one fused pass (graycnn.models.
            batchnorm), faster on CPU; `build_model` turns it on there. Same variables.
        conv_dots: Where convolutions take their forward and kernel gradient as dots
            where that is faster (graycnn.models.conv), a CPU speed-up: '' nowhere,
            'train' in train-mode forwards, 'always' in eval-mode forwards too.
            `build_model` sets it on CPU: 'train', or 'always' for an evaluation step,
            which no interceptor reads. Same variables.
    """

    num_classes: int = 10
    stem_features: int = 36
    growth_rate: int = 18
    transition_features: int = 18
    layers_per_block: Sequence[int] = (12, 12, 12, 12)
    widths: Widths = ()
    input_scale: float = 1.0
    input_offset: float = 0.0
    bn_one_pass: bool = False
    conv_dots: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps pixels (N, H, W, C) in 0-255 to logits (N, num_classes)."""
        x = scale_input(x, self.input_scale, self.input_offset)
        x = _conv(
            _dots(train, self.conv_dots),
            width_of(self.widths, "stem", self.stem_features),
            (3, 3),
            padding="SAME",
            use_bias=False,
            name="stem",
        )(x)
        for b, num_layers in enumerate(self.layers_per_block, start=1):
            x = DenseBlock(
                tuple(
                    width_of(self.widths, f"block{b}/layer{i}/conv", self.growth_rate)
                    for i in range(1, num_layers + 1)
                ),
                train=train,
                bn_one_pass=self.bn_one_pass,
                conv_dots=self.conv_dots,
                name=f"block{b}",
            )(x)
            if b < len(self.layers_per_block):
                x = Transition(
                    width_of(self.widths, f"transition{b}/conv", self.transition_features),
                    train=train,
                    bn_one_pass=self.bn_one_pass,
                    conv_dots=self.conv_dots,
                    name=f"transition{b}",
                )(x)
        head = width_of(self.widths, "head/conv", self.num_classes)
        return Head(
            head,
            train=train,
            bn_one_pass=self.bn_one_pass,
            conv_dots=self.conv_dots,
            name="head",
        )(x)


class DenseBlock(nn.Module):
    """Dense layers `layer1..layerL`, each fed the concatenation of all before it."""

    features: Sequence[int]
    train: bool = False
    bn_one_pass: bool = False
    conv_dots: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # In a one-pass train-mode forward, a channel's batch statistics are the same for
        # every later layer that normalizes it: computed once per block input and layer
        # output, not once per layer (a CPU speed-up: benchmarks/README.md).
        shared = self.train and self.bn_one_pass
        moments: tuple[jax.Array, ...] | None = batch_moments(x) if shared else None
        for i, features in enumerate(self.features, start=1):
            y = DenseLayer(
                features, self.train, self.bn_one_pass, self.conv_dots, name=f"layer{i}"
            )(x, moments)
            x = jnp.concatenate([x, y], axis=-1)
            if moments is not None:  # shared
                moments = tuple(
                    jnp.concatenate([a, b]) for a, b in zip(moments, batch_moments(y), strict=True)
                )
        return x


class DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 without bias; the caller concatenates its output."""

    features: int
    train: bool = False
    bn_one_pass: bool = False
    conv_dots: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, moments=None) -> jax.Array:
        """x (N, H, W, C) -> (N, H, W, features); `moments`: x's batch (mean, variance),
        each (C,), for a one-pass train-mode BatchNorm, or None."""
        bn = _bn(self.train, self.bn_one_pass)
        # Only the one-pass subclass (graycnn.models.one_pass_bn) gets moments.
        x = bn(x) if moments is None else bn(x, moments=moments)  # type: ignore[call-arg]
        x = nn.relu(x)
        return _conv(
            _dots(self.train, self.conv_dots),
            self.features,
            (3, 3),
            padding="SAME",
            use_bias=False,
            name="conv",
        )(x)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1-AvgPool2."""

    features: int
    train: bool = False
    bn_one_pass: bool = False
    conv_dots: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _bn(self.train, self.bn_one_pass)(x)
        x = nn.relu(x)
        x = _conv(
            _dots(self.train, self.conv_dots), self.features, (1, 1), use_bias=False, name="conv"
        )(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Head(nn.Module):
    """BN-ReLU-AvgPool-Conv2x2(valid, bias)-flatten: an even HxW map becomes logits.

    The study's 4x4 map (32x32 images) is pooled 2x2 to 2x2; a larger map (e.g. 8x8 from
    64x64 images) is pooled with a window of half its size, to the same 2x2.
    """

    num_classes: int
    train: bool = False
    bn_one_pass: bool = False
    conv_dots: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _bn(self.train, self.bn_one_pass)(x)
        x = nn.relu(x)
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            raise ValueError(
                f"the DenseNet head needs a feature map of even height and width (e.g. 4x4 "
                f"from 32x32 images through 4 blocks); it got {h}x{w}: choose an image size "
                "or a number of blocks that gives one"
            )
        x = nn.avg_pool(x, (h // 2, w // 2), strides=(h // 2, w // 2))
        x = _conv(
            _dots(self.train, self.conv_dots),
            self.num_classes,
            (2, 2),
            padding="VALID",
            name="conv",
        )(x)
        return x.reshape((x.shape[0], -1))


def _bn(train: bool, one_pass: bool) -> nn.BatchNorm:
    # The one-pass module only where it changes something, a train-mode forward: in
    # eval mode nn.BatchNorm itself runs, so method interceptors (compensation, the
    # tracer) see one BatchNorm call, not the subclass's and its parent's.
    kwargs: dict[str, Any] = dict(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="bn"
    )
    return BatchNorm(one_pass=True, **kwargs) if train and one_pass else nn.BatchNorm(**kwargs)


def _dots(train: bool, conv_dots: str) -> bool:
    if conv_dots not in ("", "train", "always"):
        raise ValueError(f"conv_dots must be '', 'train' or 'always', got {conv_dots!r}")
    return conv_dots == "always" or (train and conv_dots == "train")


def _conv(dots: bool, *args, **kwargs) -> nn.Conv:
    # nn.Conv itself, with graycnn.models.conv's dots where `conv_dots` asks for them:
    # the same module and variables for the tracer and checkpoints, and plain
    # convolutions in the eval-mode forwards that the tracer and compensation read.
    if dots:
        kwargs["conv_general_dilated"] = conv_with_dots
    return nn.Conv(*args, **kwargs)
