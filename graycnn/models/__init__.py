"""Model registry and the config that every checkpoint carries.

Example:
    >>> config = ModelConfig("densenet_seed", in_channels=1, widths={"stem": 20})
    >>> model = build_model(config)
    >>> variables = init_variables(config, jax.random.key(0))
"""

import dataclasses
import functools
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from graycnn import xla_options
from graycnn.config import check_number
from graycnn.models.densenet import DenseNet
from graycnn.models.resnet import ResNet

# Every model takes 0-255 pixels; `input_scale` is part of the architecture so that a
# checkpoint carries it. The study's DenseNet saw raw pixels (scale 1).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "densenet_seed": functools.partial(DenseNet, layers_per_block=(12, 12, 12, 12)),
    # Same design, 3 layers per block: ~10x fewer FLOPs, so it trains on a 2-core CPU in
    # minutes, while layer 1 still has the study's 36 filters and layer 2 its 18.
    "densenet_tiny": functools.partial(
        DenseNet, layers_per_block=(3, 3, 3, 3), input_scale=1.0 / 255.0
    ),
    "resnet20": functools.partial(ResNet, stage_sizes=(3, 3, 3), stage_features=(16, 32, 64)),
    "resnet18": functools.partial(
        ResNet, stage_sizes=(2, 2, 2, 2), stage_features=(64, 128, 256, 512)
    ),
}
# Test-only variants: tiny and fast, kept out of the public list.
TEST_MODELS: dict[str, Callable[..., nn.Module]] = {
    "densenet_test": functools.partial(
        DenseNet,
        layers_per_block=(2, 1, 1, 1),
        stem_features=8,
        growth_rate=4,
        transition_features=6,
        input_scale=1.0 / 255.0,
    ),
    "resnet_test": functools.partial(ResNet, stage_sizes=(1, 1), stage_features=(4, 8)),
}
_ALL = {**MODELS, **TEST_MODELS}
# The path, as `widths` keys it, of each family's classifier: its outputs are the classes.
_HEADS: dict[Any, str] = {DenseNet: "head/conv", ResNet: "head"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved as JSON next to its variables.

    Attributes:
        name: A key of MODELS.
        in_channels: 3 for color, 1 for gray.
        num_classes: Output classes.
        widths: Conv path -> output width, for merged (narrower) models.
        image_size: Height and width of the input.
        input_scale, input_offset: Override the model's pixel scaling; None keeps it.
        layers_per_block: DenseNet models only: override the dense layers in each block,
            e.g. (2, 2, 2, 2) for a model imported from Keras at a depth no registry entry
            has; None keeps the registry's (and is left out of the JSON, so checkpoints
            without it read and write as before).
        class_names: The name of each output class, () if only indexed. A dataset that
            names its classes is matched to them by name (`graycnn.training.data.match_classes`).
    """

    name: str
    in_channels: int = 3
    num_classes: int = 10
    widths: Mapping[str, int] = dataclasses.field(default_factory=dict)
    image_size: int = 32
    input_scale: float | None = None
    input_offset: float | None = None
    layers_per_block: tuple[int, ...] | None = None
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.name not in _ALL:
            raise ValueError(f"unknown model {self.name!r}; known models: {sorted(MODELS)}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        for field in ("num_classes", "image_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, field, int(value))
        for key, value in dict(self.widths).items():
            # int() would truncate 5.7 to 5, and fail on NaN without naming the entry.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"widths[{key!r}] must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "widths", {str(k): int(v) for k, v in self.widths.items()})
        head = head_path(self.name)
        if head in self.widths and self.widths[head] != self.num_classes:
            # The head's outputs are the classes: a narrower head is another task, not a
            # merged model, and evaluation would read labels >= its width as misses.
            raise ValueError(
                f"widths: {head!r} is the classifier head, its {self.num_classes} outputs "
                f"are the classes (num_classes); it cannot be narrowed to {self.widths[head]}"
            )
        # A scale <= 0 inverts or erases the image; NaN or inf make every logit NaN.
        if self.input_scale is not None:
            check_number("input_scale", self.input_scale, positive=True)
        if self.input_offset is not None:
            check_number("input_offset", self.input_offset)
        if self.layers_per_block is not None:
            if getattr(_ALL[self.name], "func", None) is not DenseNet:
                raise ValueError(f"layers_per_block applies to DenseNet models, not {self.name!r}")
            blocks = tuple(self.layers_per_block)  # JSON gives a list.
            if not blocks or not all(
                isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1
                for n in blocks
            ):
                raise ValueError(f"layers_per_block must be positive counts, got {blocks}")
            blocks = tuple(int(n) for n in blocks)
            object.__setattr__(self, "layers_per_block", blocks)
        names = tuple(str(n) for n in self.class_names)
        if names and (len(names) != self.num_classes or len(set(names)) != len(names)):
            raise ValueError(
                f"class_names must be {self.num_classes} distinct names, one per class; "
                f"got {list(names)}"
            )
        object.__setattr__(self, "class_names", names)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape (1, H, W, C) of a dummy batch for init and tracing."""
        return (1, self.image_size, self.image_size, self.in_channels)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self) | {
            "widths": dict(self.widths),
            "class_names": list(self.class_names),
        }
        if self.layers_per_block is None:
            del data["layers_per_block"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"model config has unknown keys {sorted(unknown)}")
        return cls(**data)


def check_name(name: str, flag: str = "--model") -> None:
    """Raises ValueError naming `flag` unless `name` is a model (or a test-only one)."""
    if name not in {**MODELS, **TEST_MODELS}:
        raise ValueError(f"{flag}: unknown model {name!r}; models: {sorted(MODELS)}")


def head_path(name: str) -> str | None:
    """The `widths` key of model `name`'s classifier (its outputs are the classes), e.g.
    'head/conv' for a DenseNet; None for a model of no known family."""
    return _HEADS.get(getattr(_ALL.get(name), "func", None))


def build_model(config: ModelConfig, eval_step: bool = False) -> nn.Module:
    """Returns the Flax module described by `config`.

    Implementation choices that leave the variables and the function unchanged (to float
    rounding) are made here for the default backend: on CPU, when the process opted in
    (`graycnn.xla_options.enable_cpu_defaults`), DenseNets compute
    train-mode BatchNorm statistics in one pass (`bn_one_pass`, graycnn.models.one_pass_bn)
    and train-mode convolutions' forwards and kernel gradients as dots where that is
    faster (`conv_dots`, graycnn.models.conv); see `graycnn.xla_options.cpu_speedups`.

    Args:
        eval_step: The model of an evaluation step (graycnn.training.evaluation), whose eval-mode
            convolutions take the forward dot too. Other eval-mode forwards keep plain
            convolutions: the tracer and compensation read each one.
    """
    kwargs: dict[str, Any] = {
        "num_classes": config.num_classes,
        "widths": tuple(sorted(config.widths.items())),
    }
    fields = _fields(_ALL[config.name])
    fast = xla_options.cpu_speedups()
    if "bn_one_pass" in fields:
        kwargs["bn_one_pass"] = fast
    if "conv_dots" in fields:
        kwargs["conv_dots"] = ("always" if eval_step else "train") if fast else ""
    if config.input_scale is not None:
        kwargs["input_scale"] = config.input_scale
    if config.input_offset is not None:
        kwargs["input_offset"] = config.input_offset
    if config.layers_per_block is not None:
        kwargs["layers_per_block"] = config.layers_per_block
    return _ALL[config.name](**kwargs)


def _fields(factory: Callable[..., nn.Module]) -> set[str]:
    cls = factory.func if isinstance(factory, functools.partial) else factory
    return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # a Flax module class


def init_variables(config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """Returns fresh variables {'params': ..., 'batch_stats': ...} for `config`."""
    model = build_model(config)
    return jax.jit(lambda r: model.init(r, jnp.zeros(config.input_shape, jnp.float32)))(rng)


def count_params(variables: Mapping[str, Any]) -> int:
    """Counts every array entry, BatchNorm statistics included (as Keras counts)."""
    return int(sum(x.size for x in jax.tree.leaves(variables)))
