"""Flax NNX modules as pure functions of linen-style variables.

The tracer, the fold, the merge and the FLOP count read a model as a pure function of a
variable tree `{'params': {...}, 'batch_stats': {...}}` whose leaves are named
'collection/module path/name'. An `nnx.Module` holds its arrays itself, so it is split
once at each public entry point (`adapt`) into:

* an `NNXModel`: the module's `nnx.GraphDef` plus its leaves' names and shapes, hashable
  by value (two instances of one architecture are equal, so the per-architecture caches
  work), with `apply(variables, x)` and `init(rng, x)` like a linen module;
* the variables: every `nnx.Variable` that holds an array, under its linen collection
  name: `nnx.Param` -> 'params', `nnx.BatchStat` -> 'batch_stats', so an `nnx.Conv` at
  attribute `blocks[0].conv` has 'params/blocks/0/conv/kernel', (kh, kw, in, out) as in
  linen, and an `nnx.BatchNorm` has 'params/.../scale', 'batch_stats/.../mean' etc.
  RNG state (`nnx.RngState`: keys and counts) is not exposed: it stays in the model.

Results go back through `adapt`'s third value: a new `nnx.State` when an `nnx.State`
was given, a new `nnx.Module` (`to_module`, with `in_features`, `out_features`,
`num_features` set from the new arrays) when the variables were None. The user's module
is never modified: every run merges a private copy (`NNXModel.module`), in eval mode
(`module.eval()`, and `train=False` if `__call__` takes `train`).

Module calls inside a model, linen or NNX, are seen through `graycnn.graph.capture`,
the library's one interception: `NNXModel.module` taps its private copy there
(`capture.tap_modules`). `intercept_methods`, `module_path`, `CallContext` and
`layer_output_fn` are importable from here as before; they live in `capture`.

Example:
    >>> model, variables, back = adapt(nnx_module, None)
    >>> logits = model.apply(variables, images)
    >>> new_module = back(merged_variables)
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from graycnn.tree import flatten, unflatten

CONVS = (nn.Conv, nnx.Conv)
BATCHNORMS = (nn.BatchNorm, nnx.BatchNorm)


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """An nnx.Module's architecture as a pure function of linen-style variables.

    Attributes:
        graphdef: The module's nnx.GraphDef (classes and static attributes).
        leaves: ((variable name 'params/a/b/kernel', nnx path, shape, dtype), ...) of
            every exposed Variable, as the module holds them.
        takes_train: The root's `__call__` takes `train` (it gets train=False).
        features: ((conv path, output width), ...) that `init` gives those convs, as
            `graph.Rebuilt` does for linen.
        template: The module's nnx.FlatState with exposed values made abstract (its RNG
            state kept): Variable types and metadata. Not compared: same architecture,
            same model.
    """

    graphdef: Any
    leaves: tuple[tuple[str, tuple, tuple[int, ...], Any], ...]
    takes_train: bool = False
    features: tuple[tuple[str, int], ...] = ()
    template: Any = dataclasses.field(default=None, compare=False, repr=False)

    def module(self, variables: Mapping[str, Any]) -> nnx.Module:
        """A private eval-mode copy holding `variables`; widths set from its arrays."""
        flat = flatten(variables)
        names = {path: name for name, path, _, _ in self.leaves}
        items = []
        for path, var in self.template:
            name = names.get(path)
            items.append((path, var.replace(var.get_value() if name is None else flat[name])))
        module = nnx.merge(self.graphdef, nnx.from_flat_state(items))
        sync_widths(module)
        module.eval()
        _capture().tap_modules(module)
        return module

    def apply(self, variables: Mapping[str, Any], x: jax.Array, **kwargs: Any) -> jax.Array:
        """The model's output for images x (N, H, W, C), in eval mode."""
        return self._run(self.module(variables), x, **kwargs)

    def init(self, rng: jax.Array, x: jax.Array, **kwargs: Any) -> dict[str, Any]:
        """The variables this architecture makes for x: every conv, dense and BatchNorm
        sized by its input's channels (the convs in `features` get those many outputs),
        the other leaves as the module holds them. Zeros; `rng` is unused."""
        del rng
        zeros = unflatten({name: jnp.zeros(s, d) for name, _, s, d in self.leaves})
        module = self.module(zeros)
        widths = dict(self.features)

        capture = _capture()

        def resize(next_fun, args, kw, context):
            _resize(context.module, args[0], widths.get(capture.module_path(context)))
            return next_fun(*args, **kw)

        with capture.intercept(resize, linen=False):
            self._run(module, x, **kwargs)
        state = dict(nnx.to_flat_state(nnx.state(module)))
        return unflatten({name: state[path].get_value() for name, path, _, _ in self.leaves})

    def _run(self, module: nnx.Module, x: jax.Array, **kwargs: Any) -> jax.Array:
        return module(x, **({"train": False} if self.takes_train else {}), **kwargs)


def from_module(module: nnx.Module) -> tuple[NNXModel, dict[str, Any]]:
    """(NNXModel, linen-style variables) of an nnx.Module; the module is not modified."""
    graphdef, state = nnx.split(module)
    flat = nnx.to_flat_state(state)
    leaves, template = [], []
    seen: dict[str, Any] = {}
    for path, var in flat:
        value = var.get_value()
        if _exposed(var):
            name = _name(var, path)
            if name in seen:
                raise ValueError(f"NNX variables {seen[name]} and {path} both map to {name}")
            seen[name] = path
            leaves.append((name, tuple(path), tuple(value.shape), value.dtype))
            value = jax.ShapeDtypeStruct(value.shape, value.dtype)
        template.append((path, var.replace(value)))
    try:
        takes_train = "train" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        takes_train = False
    model = NNXModel(
        graphdef, tuple(leaves), takes_train, template=nnx.FlatState(template, sort=False)
    )
    return model, to_variables(state)


def to_variables(state: nnx.State) -> dict[str, Any]:
    """Linen-style variables {'params': ..., 'batch_stats': ...} of an nnx.State."""
    return unflatten(
        {
            _name(var, path): var.get_value()
            for path, var in nnx.to_flat_state(state)
            if _exposed(var)
        }
    )


def to_state(variables: Mapping[str, Any], template: nnx.State) -> nnx.State:
    """A new nnx.State like `template` (types, metadata, RNG state) holding `variables`."""
    flat = flatten(variables)
    items = []
    for path, var in nnx.to_flat_state(template):
        value = flat[_name(var, path)] if _exposed(var) else var.get_value()
        items.append((path, var.replace(value)))  # new Variables: nothing is shared
    return nnx.from_flat_state(items)


def to_module(module: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """A new nnx.Module like `module` holding `variables`, with the `in_features`,
    `out_features` and `num_features` of its convs, dense layers and BatchNorms read off
    the arrays; `module` is not modified."""
    graphdef, state = nnx.split(module)
    new = nnx.merge(graphdef, to_state(variables, state))
    sync_widths(new)
    return new


def adapt(model: Any, variables: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(model, variables, back) for the library's functions.

    Args:
        model: A linen module (returned as is), an NNXModel (as is) or an nnx.Module.
        variables: Linen-style variables; for an nnx.Module, an nnx.State or None (the
            module's own).

    Returns:
        The model as the library runs it (an NNXModel for nnx.Module), its linen-style
        variables, and `back`, which turns a result tree into what the caller gave: the
        tree itself, a new nnx.State, or (for variables=None) a new nnx.Module.
    """
    if not isinstance(model, nnx.Module):
        if variables is None:
            raise ValueError("variables are required unless the model is an nnx.Module")
        if isinstance(variables, nnx.State):
            raise ValueError("an nnx.State needs its nnx.Module as the model")
        return model, variables, lambda tree: tree
    adapted, own = from_module(model)
    if variables is None:
        return adapted, own, lambda tree: to_module(model, tree)
    if isinstance(variables, nnx.State):
        return adapted, to_variables(variables), lambda tree: to_state(tree, variables)
    return adapted, variables, lambda tree: tree


def adapt_model(model: Any) -> Any:
    """The model as the library runs it: an NNXModel for an nnx.Module, else `model`."""
    return from_module(model)[0] if isinstance(model, nnx.Module) else model


def sync_widths(module: nnx.Module) -> None:
    """Sets in/out/num_features of every nnx.Conv, ConvTranspose, Linear and BatchNorm of
    `module` (in place) from the shapes of the arrays it holds."""
    for _, m in nnx.iter_modules(module):
        if isinstance(m, nnx.Conv):
            shape = _shape(m.kernel)
            m.kernel_shape = shape
            m.in_features = shape[-2] * m.feature_group_count
            m.out_features = shape[-1]
        elif isinstance(m, nnx.ConvTranspose):  # not an nnx.Conv subclass
            shape = _shape(m.kernel)
            m.kernel_shape = shape
            # transpose_kernel stores the kernel as (..., out, in).
            m.in_features, m.out_features = shape[-2:][::-1] if m.transpose_kernel else shape[-2:]
        elif isinstance(m, nnx.Linear):
            m.in_features, m.out_features = _shape(m.kernel)
        elif isinstance(m, nnx.BatchNorm) and len(_shape(m.mean)) == 1:
            m.num_features = _shape(m.mean)[0]


def _capture() -> Any:
    # capture runs NNXModels, so it imports this module; this one reaches it lazily.
    from graycnn.graph import capture

    return capture


_MOVED = ("CallContext", "intercept_methods", "layer_output_fn", "module_path")


def __getattr__(name: str) -> Any:
    """The interception names that moved to `graycnn.graph.capture`, importable here."""
    if name in _MOVED:
        return getattr(_capture(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resize(module: nnx.Module, x: jax.Array, width: int | None) -> None:
    """Gives a conv, dense layer or BatchNorm the shapes its input `x` calls for."""

    def put(var, shape):
        if var is not None:
            var.set_value(jnp.zeros(shape, var.get_value().dtype))

    channels = x.shape[-1]
    if isinstance(module, nnx.Conv):
        kernel = _shape(module.kernel)
        out = kernel[-1] if width is None else width
        put(module.kernel, (*kernel[:-2], channels // module.feature_group_count, out))
        put(module.bias, (out,))
    elif isinstance(module, nnx.ConvTranspose):
        kernel = _shape(module.kernel)
        if module.transpose_kernel:
            out = kernel[-2] if width is None else width
            put(module.kernel, (*kernel[:-2], out, channels))
        else:
            out = kernel[-1] if width is None else width
            put(module.kernel, (*kernel[:-2], channels, out))
        put(module.bias, (out,))
    elif isinstance(module, nnx.Linear):
        put(module.kernel, (channels, _shape(module.kernel)[-1]))
    elif isinstance(module, nnx.BatchNorm) and isinstance(module.axis, int):
        for var in (module.mean, module.var, module.scale, module.bias):
            put(var, (x.shape[module.axis],))
    else:
        return
    sync_widths(module)


def _exposed(var: nnx.Variable) -> bool:
    value = var.get_value()
    return not isinstance(var, nnx.RngState) and hasattr(value, "shape") and hasattr(value, "dtype")


def _name(var: nnx.Variable, path: Sequence[Any]) -> str:
    """'params/a/b/kernel' for an nnx.Param at attribute path ('a', 'b', 'kernel')."""
    return "/".join((_collection(type(var)), *(str(p) for p in path)))


def _collection(kind: type[nnx.Variable]) -> str:
    if issubclass(kind, nnx.Param):
        return "params"
    if issubclass(kind, nnx.BatchStat):
        return "batch_stats"
    try:
        return nnx.variablelib.variable_name_from_type(kind)
    except ValueError:
        return kind.__name__


def _shape(var: nnx.Variable) -> tuple[int, ...]:
    return tuple(var.get_value().shape)
