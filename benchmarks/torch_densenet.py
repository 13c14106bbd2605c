"""A PyTorch reference of graycnn's DenseNet, to time the same network in PyTorch eager.

Optional: only the benchmarks import it, and only when `torch` is importable (torch is not
in requirements.txt). Same topology as `graycnn.models.densenet.DenseNet`: a 3x3 stem;
dense blocks of BN-ReLU-Conv3x3 whose outputs are concatenated to their inputs;
transitions BN-ReLU-Conv1x1-AvgPool2; a head BN-ReLU-AvgPool2-Conv2x2(valid, bias).
`load_flax_variables` copies a graycnn variable tree in, so that both compute the same
function (tests/test_torch_densenet.py checks it on one batch).

Example:
    >>> net = TorchDenseNet.from_config(ModelConfig("densenet_tiny"))
    >>> net.load_flax_variables(variables)
    >>> logits = net(torch.from_numpy(images_nhwc_uint8))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from graycnn.models import ModelConfig, build_model
from graycnn.models.common import BN_EPSILON, BN_MOMENTUM


def _bn(channels: int) -> nn.BatchNorm2d:
    # Flax's momentum is the weight of the old statistics; PyTorch's that of the new.
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=1.0 - BN_MOMENTUM)


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, features: int):
        super().__init__()
        self.bn = _bn(in_channels)
        self.conv = nn.Conv2d(in_channels, features, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], dim=1)


class _Transition(nn.Module):
    def __init__(self, in_channels: int, features: int):
        super().__init__()
        self.bn = _bn(in_channels)
        self.conv = nn.Conv2d(in_channels, features, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(self.conv(torch.relu(self.bn(x))), 2)


class _Head(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = _bn(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.avg_pool2d(torch.relu(self.bn(x)), 2)
        return self.conv(x).flatten(1)


class TorchDenseNet(nn.Module):
    """graycnn's DenseNet in PyTorch; takes (N, H, W, C) pixels 0-255 like the Flax model.

    Module names follow the Flax paths (`stem`, `block1.layer1.conv`, ...), with dots.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        stem_features: int = 36,
        growth_rate: int = 18,
        transition_features: int = 18,
        layers_per_block: Sequence[int] = (12, 12, 12, 12),
        input_scale: float = 1.0,
        input_offset: float = 0.0,
        channels_last: bool = True,
    ):
        super().__init__()
        self.input_scale, self.input_offset = input_scale, input_offset
        self.channels_last = channels_last
        self.stem = nn.Conv2d(in_channels, stem_features, 3, padding=1, bias=False)
        channels = stem_features
        for b, num_layers in enumerate(layers_per_block, start=1):
            block = nn.Module()
            for i in range(1, num_layers + 1):
                block.add_module(f"layer{i}", _DenseLayer(channels, growth_rate))
                channels += growth_rate
            self.add_module(f"block{b}", block)
            if b < len(layers_per_block):
                self.add_module(f"transition{b}", _Transition(channels, transition_features))
                channels = transition_features
        self.head = _Head(channels, num_classes)
        self.num_blocks = len(layers_per_block)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, config: ModelConfig, **kwargs: Any) -> TorchDenseNet:
        """The PyTorch twin of `build_model(config)` (no width overrides)."""
        if config.widths:
            raise ValueError("TorchDenseNet does not support width overrides")
        flax_model = build_model(config)
        return cls(
            in_channels=config.in_channels,
            num_classes=flax_model.num_classes,
            stem_features=flax_model.stem_features,
            growth_rate=flax_model.growth_rate,
            transition_features=flax_model.transition_features,
            layers_per_block=tuple(flax_model.layers_per_block),
            input_scale=flax_model.input_scale,
            input_offset=flax_model.input_offset,
            **kwargs,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Maps pixels (N, H, W, C) 0-255 (uint8 or float) to logits (N, classes)."""
        x = images.permute(0, 3, 1, 2).float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.input_offset:
            x = x - self.input_offset
        if self.input_scale != 1.0:
            x = x * self.input_scale
        x = self.stem(x)
        for b in range(1, self.num_blocks + 1):
            for layer in getattr(self, f"block{b}").children():
                x = layer(x)
            if b < self.num_blocks:
                x = getattr(self, f"transition{b}")(x)
        return self.head(x)

    @torch.no_grad()
    def load_flax_variables(self, variables: Mapping[str, Any]) -> None:
        """Copies a graycnn variable tree ({'params', 'batch_stats'}) into this network."""
        params, stats = variables["params"], variables.get("batch_stats", {})
        for name, module in self.named_modules():
            path = name.split(".") if name else []
            if isinstance(module, nn.Conv2d):
                leaf = _lookup(params, path)
                # HWIO -> OIHW.
                module.weight.copy_(_tensor(leaf["kernel"]).permute(3, 2, 0, 1))
                if module.bias is not None:
                    module.bias.copy_(_tensor(leaf["bias"]))
            elif isinstance(module, nn.BatchNorm2d):
                leaf, stat = _lookup(params, path), _lookup(stats, path)
                module.weight.copy_(_tensor(leaf["scale"]))
                module.bias.copy_(_tensor(leaf["bias"]))
                module.running_mean.copy_(_tensor(stat["mean"]))
                module.running_var.copy_(_tensor(stat["var"]))


def _tensor(x: Any) -> torch.Tensor:
    return torch.tensor(np.asarray(x))


def _lookup(tree: Mapping[str, Any], path: list[str]) -> Any:
    node = tree
    for i, key in enumerate(path):
        if key not in node:
            raise KeyError(f"no variable at {'/'.join(path[: i + 1])}; have {sorted(node)}")
        node = node[key]
    return node


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, per image, as
    `graycnn.training.data.augment` does (not the same random draws). images: (N, H, W, C)."""
    n, h, w, _ = images.shape
    padded = nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    rows = (offsets[:, 0, None] + torch.arange(h))[:, :, None]
    cols = offsets[:, 1, None] + torch.arange(w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]
