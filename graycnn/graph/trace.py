"""Where each conv's output channels go, traced once from the model's jaxpr.

`trace` runs `jax.make_jaxpr` on `model.apply` (inference mode) as a function of the
flattened variables, so every jaxpr input is a named leaf, and follows each conv's
output channels forward (see `rules`): through BatchNorm, activations and pooling;
through concatenation, at their offset (DenseNet's fan-out to every later layer of a
block and to the transition); through a residual add, which ties the added convs into
one group whose channels can only be merged together; through a flatten into a dense
head. It records every leaf axis indexed by the channels (`Use`), and for each conv,
what it cannot follow (`problems`). Only shapes are traced, so no arrays are computed,
and the same code serves the project's models and a user's own Flax model.

The graph is the one source of what the rest of the library needs to know about a
model's structure: the conv order, the widths, the FLOPs, which modules are BatchNorms,
and what a merge must touch. A trace is cached by (module, leaf shapes, input shape), so
one run traces each architecture once however many stages ask.

Example:
    >>> graph = trace(model, variables, (1, 32, 32, 3))
    >>> graph.consumers("stem")
    ['block1/layer1/conv', 'block1/layer2/conv', ..., 'transition1/conv']
    >>> graph.flops()["total"]
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from graycnn import layers, nnx_adapter
from graycnn.graph import capture, rules
from graycnn.graph.capture import call_kwargs, module_path
from graycnn.graph.rebuild import rebuild, unwrap, with_widths
from graycnn.graph.values import FirstOp, LayerOp, Recorder, Use, Value, module_of
from graycnn.models import conv as dot_conv
from graycnn.models import one_pass_bn
from graycnn.nnx_adapter import BATCHNORMS
from graycnn.tree import flatten, unflatten

DROPOUTS = (nn.Dropout, nnx.Dropout)
OUTPUT_REASON = "its channels are part of the model's output"


@dataclasses.dataclass(frozen=True)
class ChannelGraph:
    """Where each conv's output channels go.

    Attributes:
        convs: Module paths of the convs whose outputs are traced, in forward order.
        widths: conv path -> output channels.
        uses: Every leaf axis indexed by traced channels.
        first_ops: The first non-layout op reading each conv's raw output.
        problems: conv path -> why its channels cannot be merged.
        batchnorms: nn.BatchNorm (or nnx.BatchNorm) module path -> epsilon.
        layers: conv/dense path -> LayerOp (kernel leaf, axes, FLOPs for one image).
        roots: conv path -> representative of its residual group.
        model: The module that runs the traced tree (rebuilt with its conv widths); for
            an nnx.Module, the `nnx_adapter.NNXModel` that runs it.
        input_shape: (1, H, W, C) of the traced images.
        conv_order: Every nn.Conv's (or nnx.Conv's) path in the order the forward pass
            calls it: the layer numbers 1..N (see graycnn.layers).
        leaf_shapes: Every variable leaf ('params/...') -> its shape.
    """

    convs: tuple[str, ...]
    widths: Mapping[str, int]
    uses: tuple[Use, ...]
    first_ops: tuple[FirstOp, ...]
    problems: Mapping[str, tuple[str, ...]]
    batchnorms: Mapping[str, float]
    layers: Mapping[str, LayerOp]
    roots: Mapping[str, str]
    model: nn.Module
    input_shape: tuple[int, ...]
    conv_order: tuple[str, ...]
    leaf_shapes: Mapping[str, tuple[int, ...]]

    def flops(self) -> dict[str, Any]:
        """FLOPs of one image's forward pass: {'total': int, 'per_layer': {path: int}}.

        A FLOP is one multiply or one add: a layer costs 2 x its multiply-accumulates.
        Only convs and dense layers count (BatchNorm, activations and pooling are a few
        percent of a CNN's cost and are left out, as in the usual tables).
        """
        per_layer = {path: int(op.flops) for path, op in self.layers.items()}
        return {"total": sum(per_layer.values()), "per_layer": per_layer}

    def batchnorm_labels(self, params: Mapping[str, Any]) -> Any:
        """'train' for every BatchNorm's scale and bias, 'freeze' for the rest: an optax
        `multi_transform` label tree shaped like `params`."""
        return unflatten(
            {
                p: "train" if module_of(f"params/{p}") in self.batchnorms else "freeze"
                for p in flatten(params)
            }
        )

    def group(self, path: str) -> tuple[str, ...]:
        """The convs whose channels are added to `path`'s (itself included), in order."""
        root = self.roots.get(path, path)
        return tuple(c for c in self.convs if self.roots[c] == root)

    def uses_of(self, path: str) -> list[Use]:
        """The uses that index channels of `path`'s group."""
        members = set(self.group(path))
        return [u for u in self.uses if any(s.source in members for s in u.segments)]

    def consumers(self, path: str) -> list[str]:
        """Module paths of the convs and dense layers that read `path`'s group channels."""
        seen: dict[str, None] = {}  # an ordered set
        for u in self.uses_of(path):
            if u.kind == "contract":
                seen.setdefault(module_of(u.leaf), None)
        return list(seen)

    def leaf_shapes_at(self, widths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Every leaf's shape as the model makes it with the convs in `widths` at those
        output widths (the others unchanged): what a merged tree must match.

        Raises:
            ValueError: the model cannot be built at those widths, with Flax's reason.
        """
        key = tuple(sorted(widths.items()))
        try:
            hash(self.model)
        except TypeError:
            return _shapes_at.__wrapped__(self.model, key, self.input_shape)
        return _shapes_at(self.model, key, self.input_shape)

    def check_mergeable(self, path: str) -> None:
        """Raises ValueError, naming the conv, unless `path`'s channels can be merged."""
        if path not in self.widths:
            raise ValueError(
                f"conv {path!r} does not produce traced channels (its input or kernel is not "
                f"a plain image tensor and variable leaf); traced convs: {list(self.convs)}"
            )
        found = [(m, r) for m in self.group(path) for r in self.problems.get(m, ())]
        output = [f"{m}: {r}" for m, r in found if r == OUTPUT_REASON]
        reasons = [f"{m}: {r}" for m, r in found if r != OUTPUT_REASON]
        consumers = self.consumers(path)
        if reasons:
            # The op that stopped the trace comes first: a conv read only by, say, a
            # depthwise conv has no traced consumers *because* of it.
            past = "; no conv or dense layer is traced reading its channels past that"
            raise ValueError(
                f"cannot merge conv {path!r}: "
                + "; ".join(reasons + output)
                + ("" if consumers else past)
            )
        if not consumers:
            raise ValueError(
                f"conv {path!r} has no traced consumers (no conv or dense layer reads its "
                "channels: is it the classifier?), so its channels cannot be merged"
                + "".join(f"; {r}" for r in output)
            )
        if output:
            raise ValueError(f"cannot merge conv {path!r}: " + "; ".join(output))


@functools.lru_cache(maxsize=64)
def _shapes_at(model, widths: tuple, input_shape: tuple) -> dict[str, tuple[int, ...]]:
    resized = with_widths(model, dict(widths))
    x = jnp.zeros(input_shape, jnp.float32)
    try:
        tree = jax.eval_shape(lambda: resized.init(jax.random.key(0), x, **call_kwargs(resized)))
    except Exception as e:  # Flax raises many types for shapes it cannot build.
        names = ", ".join(f"{p} at {w}" for p, w in widths)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"the model cannot be built with conv {names} filters: {first}") from e
    return {p: tuple(leaf.shape) for p, leaf in flatten(tree).items()}


def check_variables(
    model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> None:
    """Raises ValueError, naming the path, unless `variables` fit `model` exactly.

    Checks that every leaf is finite (leaves given as shapes are not), and that the tree
    has exactly the paths and shapes `model.init` makes for `input_shape`. An nnx.Module
    takes an nnx.State or None (its own state).
    """
    model, variables, _ = nnx_adapter.adapt(model, variables)
    check_finite(variables)
    _check_shapes(model, variables, tuple(input_shape))


def check_finite(variables: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first leaf that holds NaN or inf (shapes pass)."""
    for path, leaf in flatten(variables).items():
        if isinstance(leaf, jax.ShapeDtypeStruct):
            continue
        # On the host where it can be: jnp would compile a program per new leaf shape
        # (every merge makes some). jnp for a sharded array not all on this host.
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            finite = jnp.isfinite(leaf).all()
        else:
            finite = np.isfinite(np.asarray(leaf)).all()
        if not bool(finite):
            raise ValueError(f"variables: {path} holds NaN or inf")


def _check_shapes(model: nn.Module, variables: Mapping[str, Any], input_shape) -> None:
    flat = flatten(variables)
    x = jnp.zeros(input_shape, jnp.float32)
    try:
        expected = flatten(
            jax.eval_shape(lambda: model.init(jax.random.key(0), x, **call_kwargs(model)))
        )
    except Exception as e:  # Flax raises many types for shapes it cannot build.
        raise ValueError(
            f"the model cannot be built for input shape {tuple(input_shape)}: {e}"
        ) from e
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = [
        f"{p} is {shape_of(flat[p])}, the model makes {tuple(expected[p].shape)}"
        for p in sorted(set(flat) & set(expected))
        if shape_of(flat[p]) != tuple(expected[p].shape)
    ]
    if missing or extra or wrong:
        parts = [
            f"missing {_few(missing)}" if missing else "",
            f"unexpected {_few(extra)}" if extra else "",
            f"wrong shapes: {_few(wrong)}" if wrong else "",
        ]
        raise ValueError(
            f"the tree does not match the model for input shape {tuple(input_shape)}: "
            + "; ".join(p for p in parts if p)
        )


def trace(
    model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> ChannelGraph:
    """Traces where every conv's output channels go; cached per architecture.

    Args:
        model: A Flax module taking images (N, H, W, C), linen or NNX; called with
            train=False if its __call__ takes `train` (an nnx.Module also in eval mode).
            Conv widths are read off `variables`, so the original module works for a
            merged tree.
        variables: Arrays or jax.ShapeDtypeStruct leaves; for an nnx.Module an
            nnx.State or None (its own state).
        input_shape: (N, H, W, C) of the images; N is ignored (one image is traced).

    Raises:
        ValueError: the tree does not fit the model, or holds NaN, naming the path.
    """
    model, variables, _ = nnx_adapter.adapt(model, variables)
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, H, W, C), got {tuple(input_shape)}")
    check_finite(variables)
    signature = tuple((p, shape_of(x), str(dtype_of(x))) for p, x in flatten(variables).items())
    one = (1, *(int(s) for s in input_shape[1:]))
    try:
        hash(model)
    except TypeError:  # A module with unhashable attributes: trace without the cache.
        return _trace.__wrapped__(model, signature, one)
    return _trace(model, signature, one)


@functools.lru_cache(maxsize=32)
def _trace(model: nn.Module, signature: tuple, input_shape: tuple[int, ...]) -> ChannelGraph:
    shapes = unflatten({p: jax.ShapeDtypeStruct(s, d) for p, s, d in signature})
    try:
        rebuilt = rebuild(model, shapes, input_shape)
    except ValueError:
        rebuilt = model  # _check_shapes names what is wrong.
    _check_shapes(rebuilt, shapes, input_shape)
    flat = flatten(shapes)
    paths = sorted(flat)
    kwargs = call_kwargs(rebuilt)
    batchnorms: dict[str, float] = {}
    modules: dict[str, str] = {}

    def apply(leaves, x):
        return rebuilt.apply(unflatten(dict(zip(paths, leaves, strict=True))), x, **kwargs)

    leaves = [flat[p] for p in paths]
    with capture.intercept(functools.partial(_record, modules, batchnorms)):
        closed = jax.make_jaxpr(apply)(leaves, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    inputs = [
        Value(s.shape, leaves={p: tuple(range(len(s.shape)))}, exact=True)
        for p, s in zip(paths, leaves, strict=True)
    ]
    inputs.append(Value(tuple(input_shape), data=True))
    rec = Recorder(modules)
    for out in rules.interpret(closed, inputs, rec):
        rec.taint([out], OUTPUT_REASON)
    return ChannelGraph(
        convs=tuple(rec.sources),
        widths=dict(rec.sources),
        uses=tuple(rec.uses),
        first_ops=tuple(rec.first_ops),
        problems={k: tuple(v) for k, v in rec.problems.items()},
        batchnorms=batchnorms,
        layers=dict(rec.layers),
        roots={c: rec.find(c) for c in rec.sources},
        model=rebuilt,
        input_shape=input_shape,
        # The one source of layer numbers (cached: rebuild has just asked for them).
        conv_order=tuple(layers.conv_layers(unwrap(model), input_shape)),
        leaf_shapes={p: tuple(flat[p].shape) for p in paths},
    )


def _record(modules: dict, batchnorms: dict, next_fun, args, kw, context):
    """The tracer's interceptor: names every module, keeps each BatchNorm's epsilon, and
    binds each call of a registered module class as one op (see rules.MODULES)."""
    path = module_path(context)
    _check_plain(context, args, kw)
    modules.setdefault(path, type(context.module).__name__)
    if isinstance(context.module, BATCHNORMS):
        batchnorms[path] = float(context.module.epsilon)
    rule = rules.module_rule(context.module)
    if rule is None or context.method_name != "__call__" or not args:
        return next_fun(*args, **kw)
    if not isinstance(args[0], jax.Array):
        return next_fun(*args, **kw)
    out = next_fun(rules.ENTER.bind(args[0]), *args[1:], **kw)
    if not isinstance(out, jax.Array):
        raise ValueError(
            f"module {path!r} is registered with graph.register_rule but returns no single array"
        )
    return rules.EXIT.bind(out, args[0], rule=rule)


def _check_plain(context, args: tuple, kw: Mapping[str, Any]) -> None:
    """Refuses, naming the module, what the rules would mis-read instead of following."""
    # The rules follow XLA's convolution and nn.BatchNorm's two reductions. The CPU
    # speed-ups compute the same function otherwise (dots over reshaped windows, one
    # variadic reduction with a custom VJP), which the rules would mis-read;
    # build_model keeps them out of eval-mode forwards, and this holds it to that.
    module, path = context.module, module_path(context)
    if isinstance(module, nn.Conv) and module.conv_general_dilated is dot_conv.conv:
        raise ValueError(
            f"conv {path!r} computes with graycnn.models.conv's dots "
            "(conv_dots, a CPU speed-up), which the tracer cannot follow: trace the model "
            "build_model(config) makes (plain convolutions in eval mode), not an eval step's"
        )
    if isinstance(module, one_pass_bn.BatchNorm) and module.one_pass:
        raise ValueError(
            f"BatchNorm {path!r} is one-pass (bn_one_pass, a train-mode "
            "CPU speed-up), which the tracer cannot follow: trace an eval-mode forward, "
            "whose BatchNorms are nn.BatchNorm"
        )
    if context.method_name != "__call__":
        return
    # A BatchNorm's running statistics are per-channel leaves the merge rewrites; batch
    # statistics would make each image's output depend on the others', and dropout
    # draws random masks: the traced function would not be the model's inference.
    if isinstance(module, BATCHNORMS) and not _called_with(module, args, kw, "use_running_average"):
        raise ValueError(
            f"BatchNorm {path!r} runs in training mode (use_running_average is not True) "
            "in the traced forward: the tracer follows inference, with running statistics; "
            "pass train=False or use_running_average=True there"
        )
    if (
        isinstance(module, DROPOUTS)
        and module.rate
        and not _called_with(module, args, kw, "deterministic")
    ):
        raise ValueError(
            f"Dropout {path!r} is not deterministic in the traced forward: the tracer "
            "follows inference; pass deterministic=True there (or train=False)"
        )


def _called_with(module: Any, args: tuple, kw: Mapping[str, Any], name: str) -> bool:
    """The flag `name` as the call sees it: its argument (second positional or keyword)
    where given, else the module's attribute, as linen's merge_param and NNX do."""
    value = kw.get(name, args[1] if len(args) > 1 else None)
    return bool(getattr(module, name, None) if value is None else value)


# A registered rule changes what a trace finds.
rules.ON_CHANGE.append(_trace.cache_clear)


def shape_of(leaf: Any) -> tuple[int, ...]:
    """The shape of an array or jax.ShapeDtypeStruct."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def dtype_of(leaf: Any) -> Any:
    """The dtype of an array or jax.ShapeDtypeStruct."""
    return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _few(items: Sequence[str], limit: int = 8) -> str:
    more = f" ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
