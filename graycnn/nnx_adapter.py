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

Linen's `nn.intercept_methods` does not see NNX modules. `intercept_methods` here calls
one interceptor, with linen's signature `(next_fun, args, kwargs, context)`, around
every linen module method and every `__call__` of an NNX module run by
`NNXModel.apply`; `module_path(context)` names the module either way. NNX calls are
seen by giving each module of the private copy a subclass whose `__call__` runs the
active interceptors (a copy only: the user's classes and objects are not patched).
Modules run by nnx transforms inside the model (nnx.jit, nnx.remat) are new objects
and are not seen.

Example:
    >>> model, variables, back = adapt(nnx_module, None)
    >>> logits = model.apply(variables, images)
    >>> new_module = back(merged_variables)
"""

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from graycnn.tree import flatten, unflatten

CONVS = (nn.Conv, nnx.Conv)
BATCHNORMS = (nn.BatchNorm, nnx.BatchNorm)

# Interceptors active in this context (outermost first); a contextvar so that threads
# do not see each other's.
_INTERCEPTORS: contextvars.ContextVar[tuple[Callable, ...]] = contextvars.ContextVar(
    "graycnn_nnx_interceptors", default=()
)
_CALLER: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "graycnn_nnx_caller", default=()
)


@dataclasses.dataclass(frozen=True)
class CallContext:
    """What an interceptor is told about an NNX call (as linen's InterceptorContext).

    Attributes:
        module: The module of the private copy being called.
        method_name: Always '__call__'.
        path: Attribute path from the root, e.g. ('blocks', '0', 'conv').
    """

    module: nnx.Module
    method_name: str
    path: tuple[str, ...]


def module_path(context: Any) -> str:
    """'a/b/c' of the module an interceptor was called for (linen or NNX)."""
    if isinstance(context, CallContext):
        return "/".join(context.path)
    return "/".join(context.module.path)


@contextlib.contextmanager
def intercept_methods(interceptor: Callable) -> Iterator[None]:
    """`nn.intercept_methods(interceptor)` that also sees NNX `__call__`s (see module doc)."""
    token = _INTERCEPTORS.set((*_INTERCEPTORS.get(), interceptor))
    try:
        with nn.intercept_methods(interceptor):
            yield
    finally:
        _INTERCEPTORS.reset(token)


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
        for path, m in nnx.iter_modules(module):
            # The path as a static attribute: the graphdef carries it into the copies
            # that nnx.remat and other NNX transforms make inside their bodies.
            # An attribute of our own on a Flax module, which mypy cannot know.
            m._graycnn_path = tuple(str(p) for p in path)  # type: ignore[attr-defined]
            cls = type(m)
            if any("__call__" in c.__dict__ for c in cls.__mro__[:-1]):
                m.__class__ = _tapped(cls)
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

        def resize(next_fun, args, kw, context):
            _resize(context.module, args[0], widths.get(module_path(context)))
            return next_fun(*args, **kw)

        with _only_nnx(resize):
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


def layer_output_fn(model: NNXModel, path: str) -> Callable[[Any, jax.Array], jax.Array]:
    """f(variables, images) -> output of the module at `path` (its first call), eval mode.

    `variables` are linen-style or an nnx.State. Under jit, XLA drops the rest of the
    network.
    """

    def output(variables: Any, images: jax.Array) -> jax.Array:
        if isinstance(variables, nnx.State):
            variables = to_variables(variables)
        seen: list[jax.Array] = []

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if not seen and module_path(context) == path:
                seen.append(out)
            return out

        with _only_nnx(capture):
            model.apply(variables, images)
        if not seen:
            raise ValueError(f"module {path!r} is never called")
        return seen[0]

    return output


@contextlib.contextmanager
def _only_nnx(interceptor: Callable) -> Iterator[None]:
    token = _INTERCEPTORS.set((*_INTERCEPTORS.get(), interceptor))
    try:
        yield
    finally:
        _INTERCEPTORS.reset(token)


@functools.cache
def _tapped(cls: type) -> type:
    """A subclass of `cls` whose __call__ runs the active interceptors around it."""

    def __call__(self, *args, **kwargs):
        call = functools.partial(cls.__call__, self)
        path = getattr(self, "_graycnn_path", None)
        if path is None:
            return call(*args, **kwargs)
        context = CallContext(self, "__call__", path)
        for interceptor in reversed(_INTERCEPTORS.get()):
            call = functools.partial(_intercepted, interceptor, call, context)
        # Name the module's ops in the jaxpr as linen does (the tracer's error messages
        # name the module): the path relative to the enclosing call.
        outer = _CALLER.get()
        name = "/".join(path[len(outer) :] if path[: len(outer)] == outer else path)
        token = _CALLER.set(path)
        try:
            with jax.named_scope(name) if name else contextlib.nullcontext():
                return call(*args, **kwargs)
        finally:
            _CALLER.reset(token)

    namespace = {
        "__call__": __call__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    return type(cls)(cls.__name__, (cls,), namespace)


def _intercepted(interceptor, next_fun, context, *args, **kwargs):
    return interceptor(next_fun, args, kwargs, context)


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
