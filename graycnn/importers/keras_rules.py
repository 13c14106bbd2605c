"""The layer grammar of the Keras import: one rule per Keras layer kind, and a cursor.

Each rule names the Keras classes it accepts and checks a layer's config, saying what
is wrong (or None); `_Cursor` walks a saved model's layers (`graycnn.importers.keras_file`)
in order and consumes the one the DenseNet needs next, or raises the import's one error,
naming that layer. `graycnn.importers.keras` maps the layers onto the DenseNet with it.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

from graycnn.importers.keras_file import KerasLayer
from graycnn.models.common import BN_EPSILON


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, list | tuple) else (v, v)


def _conv_problem(c: Mapping, kernel: tuple[int, int], padding: str, bias: bool) -> str | None:
    same_1x1 = kernel == (1, 1)  # A 1x1 conv is the same under either padding.
    checks = {
        f"kernel {kernel}": _pair(c["kernel_size"]) == kernel,
        "strides 1": _pair(c.get("strides", 1)) == (1, 1),
        "dilation 1": _pair(c.get("dilation_rate", 1)) == (1, 1),
        "groups 1": c.get("groups", 1) == 1,
        f"padding {padding!r}": same_1x1 or c.get("padding") == padding,
        "no activation": c.get("activation", "linear") in ("linear", None),
        "use_bias" if bias else "no bias": bool(c.get("use_bias", True)) == bias,
        "channels_last": c.get("data_format") in (None, "channels_last"),
    }
    bad = [want for want, ok in checks.items() if not ok]
    return f"needs {', '.join(bad)}" if bad else None


def _bn_problem(c: Mapping, **_) -> str | None:
    if c.get("axis", -1) not in (-1, 3, [-1], [3]):
        return f"normalizes axis {c.get('axis')}, not the channels (last axis)"
    if abs(float(c.get("epsilon", 1e-3)) - BN_EPSILON) > 1e-12:
        # graycnn's BatchNorm epsilon is fixed at Keras's default; another one would
        # change every output a little, so refuse rather than import approximately.
        return f"epsilon {c['epsilon']} differs from graycnn's {BN_EPSILON}"
    return None


def _activation_problem(want: str) -> Callable[..., str | None]:
    def check(c: Mapping, **_) -> str | None:
        got = c.get("activation", want)  # ReLU and Softmax layers have no such key.
        if got != want or c.get("max_value") or c.get("negative_slope") or c.get("threshold"):
            return f"is not a plain {want}"
        if c.get("axis", -1) not in (-1, 1, [-1], [1]):
            return f"softmax over axis {c['axis']}"
        return None

    return check


def _pool_problem(c: Mapping, **_) -> str | None:
    strides = c.get("strides") or c.get("pool_size")
    if (_pair(c.get("pool_size")), _pair(strides), c.get("padding", "valid")) != (
        (2, 2),
        (2, 2),
        "valid",
    ):
        return "needs pool 2x2, strides 2, padding 'valid'"
    return None


def _concat_problem(c: Mapping, **_) -> str | None:
    return None if c.get("axis", -1) in (-1, 3) else f"joins axis {c['axis']}, not the channels"


def _rescaling_problem(c: Mapping, **_) -> str | None:
    scale, offset = c.get("scale", 1.0), c.get("offset", 0.0)
    if not all(isinstance(v, int | float) for v in (scale, offset)):
        return "needs a scalar scale and offset"
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(offset)):
        # graycnn's input scale is positive (a scale <= 0 inverts or erases the image).
        return f"needs a finite scale > 0 and a finite offset, has scale {scale}, offset {offset}"
    return None


# Dropout is accepted as the identity it is at inference.
_RULES: dict[str, tuple[tuple[str, ...], Callable[..., str | None]]] = {
    "input": (("InputLayer",), lambda c, **_: None),
    "rescaling": (("Rescaling",), _rescaling_problem),
    "conv": (("Conv2D", "Convolution2D"), _conv_problem),
    "bn": (("BatchNormalization",), _bn_problem),
    "relu": (("Activation", "ReLU"), _activation_problem("relu")),
    "dropout": (("Dropout",), lambda c, **_: None),
    "concat": (("Concatenate",), _concat_problem),
    "avgpool": (("AveragePooling2D", "AvgPool2D"), _pool_problem),
    "flatten": (("Flatten",), lambda c, **_: None),
    "softmax": (("Activation", "Softmax"), _activation_problem("softmax")),
}


class _Cursor:
    """Walks the layers in order; `take` consumes one that must fit a rule and read the
    given tensors, else raises the import's one error, naming that layer."""

    def __init__(self, layers: list[KerasLayer]):
        self.layers, self.i = layers, 0

    def peek(self) -> KerasLayer | None:
        return self.layers[self.i] if self.i < len(self.layers) else None

    def fits(self, rule: str, **expect: Any) -> bool:
        layer = self.peek()
        return layer is not None and self._problem(layer, rule, expect) is None

    def take(self, rule: str, reads: tuple[str, ...] = (), **expect: Any) -> KerasLayer:
        if self.i == len(self.layers):
            raise ValueError(f"the Keras model ends where the DenseNet needs a {rule} layer")
        layer = self.layers[self.i]
        problem = self._problem(layer, rule, expect)
        if problem is None and layer.inputs != reads:
            problem = f"reads {list(layer.inputs)}, the DenseNet here reads {list(reads)}"
        if problem is not None:
            self.fail(f"expected {rule}: {problem}")
        self.i += 1
        return layer

    def fail(self, why: str) -> None:
        layer = self.layers[self.i]
        raise ValueError(
            f"cannot map Keras layer {layer.name!r} ({layer.kind}, layer {self.i} of "
            f"{len(self.layers)}) onto the study's DenseNet: {why}"
        )

    @staticmethod
    def _problem(layer: KerasLayer, rule: str, expect: Mapping[str, Any]) -> str | None:
        kinds, check = _RULES[rule]
        if layer.kind not in kinds:
            return f"a {' or '.join(kinds)}, got {layer.kind}"
        if layer.calls > 1:
            return f"a layer called once, this one is shared ({layer.calls} calls)"
        return check(layer.config, **expect)
