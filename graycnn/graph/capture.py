"""Running a model and seeing its module calls: the library's one interception.

Every place that looks into a model (the tracer, the conv numbering, the fold, the
receptive fields, compensation, the summary, `Rebuilt`) does it here, for linen and NNX
alike. Two levels:

* `capture(model, variables, x, select=...)` runs the model (a linen module with its
  variables, an nnx.Module with an nnx.State or None, or an `nnx_adapter.NNXModel`) in
  inference mode and returns {module path: `Call`} of the selected modules' first
  `__call__`s: the module, its inputs and its output. Given `x` as a
  jax.ShapeDtypeStruct it computes nothing (`jax.eval_shape`) and the Call holds shapes;
  inside a jitted function it returns tracers, and XLA drops what no output needs.
  `layer_output_fn` and the conv order (`graycnn.layers.conv_layers`) are built on it.
* `intercept(interceptor)`, for those that rewrite calls (the tracer's module rules,
  `Rebuilt`'s conv widths): a context in which `interceptor(next_fun, args, kwargs,
  context)` (linen's signature) runs around every linen module method and every
  `__call__` of an NNX module run by `NNXModel.apply`; `module_path(context)` names the
  module either way. It is the only caller of `nn.intercept_methods` in the library.

Linen's `nn.intercept_methods` does not see NNX modules. NNX calls are seen by giving
each module of the private copy `NNXModel.module` makes a subclass whose `__call__` runs
the active interceptors (`tap_modules`: a copy only, the user's classes and objects are
not patched). Modules run by nnx transforms inside the model (nnx.jit, nnx.remat) are
new objects and are not seen.

Example:
    >>> calls = capture(model, variables, images, select=nn.Conv)
    >>> calls["stem"].output.shape
    (4, 32, 32, 24)
"""

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from graycnn import nnx_adapter

# Interceptors of NNX calls active in this context (outermost first); a contextvar so
# that threads do not see each other's.
_INTERCEPTORS: contextvars.ContextVar[tuple[Callable, ...]] = contextvars.ContextVar(
    "graycnn_nnx_interceptors", default=()
)
_CALLER: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "graycnn_nnx_caller", default=()
)

Select = Callable[[str, Any], bool] | type | tuple[type, ...] | Collection[str] | None


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


@dataclasses.dataclass(frozen=True)
class Call:
    """A module's first `__call__` in a run.

    Attributes:
        path: The module path 'a/b/c'.
        module: The (bound linen, or private NNX) module called.
        args, kwargs: Its arguments.
        output: What it returned.
        count: How many times it was called in the run (> 1: shared weights).
    """

    path: str
    module: Any
    args: tuple
    kwargs: Mapping[str, Any]
    output: Any
    count: int = 1

    @property
    def input(self) -> Any:
        """The first argument (positional, else keyword)."""
        return self.args[0] if self.args else next(iter(self.kwargs.values()))


def module_path(context: Any) -> str:
    """'a/b/c' of the module an interceptor was called for (linen or NNX)."""
    if isinstance(context, CallContext):
        return "/".join(context.path)
    return "/".join(context.module.path)


@contextlib.contextmanager
def intercept(interceptor: Callable, *, linen: bool = True) -> Iterator[None]:
    """Runs `interceptor(next_fun, args, kwargs, context)` around every NNX `__call__`
    and, with `linen`, every linen module method, in this context (see module doc)."""
    token = _INTERCEPTORS.set((*_INTERCEPTORS.get(), interceptor))
    try:
        with nn.intercept_methods(interceptor) if linen else contextlib.nullcontext():
            yield
    finally:
        _INTERCEPTORS.reset(token)


def intercept_methods(interceptor: Callable) -> contextlib.AbstractContextManager[None]:
    """`nn.intercept_methods(interceptor)` that also sees NNX `__call__`s: `intercept`."""
    return intercept(interceptor)


def capture(
    model: Any,
    variables: Any,
    x: Any,
    select: Select = None,
    *,
    stop: str | Collection[str] | None = None,
) -> dict[str, Call]:
    """Runs the model on `x` in inference mode; returns the selected modules' first calls.

    Args:
        model: A linen module, an nnx.Module or an NNXModel.
        variables: The model's variables (for an nnx.Module an nnx.State or None, its
            own); None for a linen module or NNXModel runs its `init` instead.
        x: (N, H, W, C) images, or a jax.ShapeDtypeStruct to capture shapes only.
        select: Which modules: None (all), module classes, paths, or a function
            (path, module) -> bool.
        stop: Stop the run once the module at this path (or every module at these
            paths) has returned: a trace of the rest costs time, and a jitted caller
            needs none of it. Calls after that are not seen (nor counted).

    Returns:
        {path: Call} in the order the modules were first called.
    """
    model, variables = _runnable(model, variables)
    if not isinstance(x, jax.ShapeDtypeStruct):
        return _record(model, variables, x, select, stop)
    found: dict[str, Call] = {}
    jax.eval_shape(lambda v, x: found.update(_record(model, v, x, select, stop)), variables, x)
    return {p: dataclasses.replace(c, **_abstract(c)) for p, c in found.items()}


def layer_output_fn(model: Any, path: str) -> Callable[[Any, jax.Array], jax.Array]:
    """f(variables, images) -> the output of the module at `path` (its first call),
    inference mode. For an nnx.Module `variables` is an nnx.State (or linen-style).
    Under jit, XLA drops the rest of the network."""
    model = nnx_adapter.adapt_model(model)

    def output(variables: Any, images: jax.Array) -> jax.Array:
        if isinstance(variables, nnx.State):
            variables = nnx_adapter.to_variables(variables)
        calls = capture(model, variables, images, {path}, stop=path)
        if path not in calls:
            raise ValueError(f"module {path!r} is never called")
        return calls[path].output

    return output


def perturbed_fn(model: Any, path: str) -> Callable[[Any, jax.Array, jax.Array], Any]:
    """f(variables, images, delta) -> the model's output, inference mode, with `delta`
    added to the output of the module at `path` (its first call): the derivative in
    `delta` at 0 is the output's derivative in that module's output."""
    model = nnx_adapter.adapt_model(model)

    def output(variables: Any, images: jax.Array, delta: jax.Array) -> Any:
        if isinstance(variables, nnx.State):
            variables = nnx_adapter.to_variables(variables)
        seen = [False]

        def add(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__" or module_path(context) != path or seen[0]:
                return out
            seen[0] = True
            return out + delta

        with intercept(add):
            out = run(model, variables, images)
        if not seen[0]:
            raise ValueError(f"module {path!r} is never called")
        return out

    return output


def call_kwargs(model: Any) -> dict[str, Any]:
    """{'train': False} if the module's __call__ takes `train`, else {}."""
    if isinstance(model, nnx_adapter.NNXModel):
        return {}  # NNXModel.apply runs in eval mode, with train=False where taken.
    from graycnn.graph.rebuild import unwrap  # Rebuilt intercepts with this module

    try:
        params = inspect.signature(type(unwrap(model)).__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {"train": False} if "train" in params else {}


def run(model: Any, variables: Any, x: Any) -> Any:
    """The model's output for `x` in inference mode (`init`'s variables for None)."""
    kwargs = call_kwargs(model)
    if variables is None:
        return model.init(jax.random.key(0), x, **kwargs)
    return model.apply(variables, x, **kwargs)


def elements_until(model: Any, path: str, input_shape: tuple[int, ...]) -> int:
    """Output elements of every module call that returns before or with the first call
    of `path` returns (shapes only; `init`'s variables)."""
    elements, done = [0], [False]

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if not done[0] and context.method_name == "__call__":
            elements[0] += sum(x.size for x in jax.tree.leaves(out))
            done[0] = module_path(context) == path
        return out

    with intercept(record):
        jax.eval_shape(lambda x: run(model, None, x), _zeros(input_shape))
    return elements[0]


def check_runs(model: Any, input_shape: tuple[int, ...]) -> None:
    """Raises ValueError if the model cannot run on images of `input_shape` (1, H, W, C),
    naming the image_shape (H, W, C) and where it fails: most often the convs and pools
    reduce a small image to nothing."""
    sizes, stack = [], []

    def record(next_fun, args, kwargs, context):
        stack.append(module_path(context) or "<model>")
        out = next_fun(*args, **kwargs)
        stack.pop()
        if getattr(out, "ndim", 0) == 4:
            sizes.append((out.shape[1], out.shape[2], module_path(context)))
        return out

    try:
        with intercept(record):
            jax.eval_shape(lambda x: run(model, None, x), _zeros(input_shape))
    except Exception as e:  # Flax and lax raise many types for shapes they cannot build.
        message = " ".join(str(e).split()).split(" (https://")[0]
        h, w = input_shape[1:3]
        reached = ""
        if sizes:
            hh, ww, where = min(sizes, key=lambda s: s[0] * s[1])
            reached = f"its layers reduce the {h}x{w} image to {hh}x{ww} (at {where}), and "
        raise ValueError(
            f"image_shape {input_shape[1:]} is too small or does not fit the model: {reached}"
            f"{stack[-1] if stack else 'the model'} fails on it ({message})"
        ) from None


def tap_modules(module: nnx.Module) -> None:
    """Makes every module of `module` (a private copy) run the active interceptors."""
    for path, m in nnx.iter_modules(module):
        # The path as a static attribute: the graphdef carries it into the copies
        # that nnx.remat and other NNX transforms make inside their bodies.
        # An attribute of our own on a Flax module, which mypy cannot know.
        m._graycnn_path = tuple(str(p) for p in path)  # type: ignore[attr-defined]
        cls = type(m)
        if any("__call__" in c.__dict__ for c in cls.__mro__[:-1]):
            m.__class__ = _tapped(cls)


class _Stop(Exception):
    pass


def _runnable(model: Any, variables: Any) -> tuple[Any, Any]:
    if isinstance(model, nnx.Module):
        model, variables, _ = nnx_adapter.adapt(model, variables)
    elif isinstance(variables, nnx.State):
        variables = nnx_adapter.to_variables(variables)
    return model, variables


def _select(select: Select) -> Callable[[str, Any], bool]:
    if select is None:
        return lambda path, module: True
    if isinstance(select, type) or (
        isinstance(select, tuple) and select and all(isinstance(s, type) for s in select)
    ):
        return lambda path, module: isinstance(module, select)  # type: ignore[arg-type]
    if callable(select):
        return select
    wanted = set(select)
    return lambda path, module: path in wanted


def _record(
    model, variables, x, select: Select, stop: str | Collection[str] | None
) -> dict[str, Call]:
    keep = _select(select)
    pending = set() if stop is None else {stop} if isinstance(stop, str) else set(stop)
    calls: dict[str, tuple[Any, tuple, dict, Any]] = {}
    counts: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = module_path(context)
        if keep(path, context.module):
            counts[path] = counts.get(path, 0) + 1
            if counts[path] == 1:
                calls[path] = (context.module, args, dict(kwargs), None)
        out = next_fun(*args, **kwargs)
        if path in calls and counts[path] == 1 and calls[path][-1] is None:
            calls[path] = (*calls[path][:-1], out)
        if pending:
            pending.discard(path)
            if not pending:
                raise _Stop
        return out

    try:
        with intercept(record):
            run(model, variables, x)
    except _Stop:
        pass
    return {p: Call(p, m, a, k, out, counts[p]) for p, (m, a, k, out) in calls.items()}


def _abstract(call: Call) -> dict[str, Any]:
    def shape(a):
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype) if isinstance(a, jax.Array) else a

    return {k: jax.tree.map(shape, getattr(call, k)) for k in ("args", "kwargs", "output")}


def _zeros(input_shape: tuple[int, ...]) -> jax.Array:
    return jnp.zeros(input_shape, jnp.float32)


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
