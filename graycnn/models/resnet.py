"""CIFAR ResNets (He et al. 2016): ResNet-20 (3 stages of 3 basic blocks, 16-32-64)
and the CIFAR variant of ResNet-18 (3x3 stem, no max-pool, 4 stages of 2 blocks).

Conv paths (the keys of `widths`): `stem/conv`, `stage{s}_block{b}/conv1/conv`,
`.../conv2/conv`, `.../shortcut/conv`. Channels joined by a residual add must keep
equal widths: the merge code treats each add as one channel group.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from graycnn.models.common import BN_EPSILON, BN_MOMENTUM, Widths, scale_input, width_of


class ResNet(nn.Module):
    """A CIFAR ResNet of basic blocks with 1x1 projection shortcuts where shapes change.

    Attributes:
        num_classes: Output classes.
        stage_sizes: Basic blocks per stage.
        stage_features: Filters per stage.
        widths: Output-width overrides, ((conv path, width), ...).
        input_scale, input_offset: The model sees (pixels - offset) * scale.
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (3, 3, 3)
    stage_features: Sequence[int] = (16, 32, 64)
    widths: Widths = ()
    input_scale: float = 1.0 / 255.0
    input_offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps pixels (N, H, W, C) in 0-255 to logits (N, num_classes)."""
        x = scale_input(x, self.input_scale, self.input_offset)
        x = ConvBN(
            width_of(self.widths, "stem/conv", self.stage_features[0]), train=train, name="stem"
        )(x)
        x = nn.relu(x)
        for s, (num_blocks, features) in enumerate(
            zip(self.stage_sizes, self.stage_features, strict=True), start=1
        ):
            for b in range(1, num_blocks + 1):
                name = f"stage{s}_block{b}"
                x = BasicBlock(
                    width_of(self.widths, f"{name}/conv1/conv", features),
                    width_of(self.widths, f"{name}/conv2/conv", features),
                    width_of(self.widths, f"{name}/shortcut/conv", features),
                    strides=2 if (b == 1 and s > 1) else 1,
                    train=train,
                    name=name,
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class ConvBN(nn.Module):
    """Conv (no bias) followed by BatchNorm, as submodules `conv` and `bn`."""

    features: int
    kernel: tuple[int, int] = (3, 3)
    strides: int = 1
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding="SAME",
            use_bias=False,
            name="conv",
        )(x)
        return nn.BatchNorm(
            use_running_average=not self.train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            name="bn",
        )(x)


class BasicBlock(nn.Module):
    """conv1-BN-ReLU-conv2-BN, plus the input (projected when its shape changes), ReLU."""

    features1: int
    features2: int
    shortcut_features: int
    strides: int = 1
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = ConvBN(self.features1, strides=self.strides, train=self.train, name="conv1")(x)
        y = nn.relu(y)
        y = ConvBN(self.features2, train=self.train, name="conv2")(y)
        if self.strides != 1 or x.shape[-1] != self.features2:
            x = ConvBN(
                self.shortcut_features,
                kernel=(1, 1),
                strides=self.strides,
                train=self.train,
                name="shortcut",
            )(x)
        return nn.relu(x + y)
