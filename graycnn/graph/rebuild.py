"""Modules that run a merged tree: conv widths read off the tree.

A merged tree has fewer output channels in some convs, so the module that made it no
longer matches it. Two ways back:

* The project's models (any module with a `widths` attribute of ((conv path, width),
  ...)) are cloned with `widths` read off the tree; `widths_of` gives the same widths for
  `ModelConfig(..., widths=...)`, so a checkpoint of the merged model rebuilds itself.
* Any other Flax module is wrapped in `Rebuilt`, which runs the module unchanged except
  that each `nn.Conv` named in its table gets that many `features`.
* An nnx.Module holds its arrays: `rebuild` returns a new nnx.Module holding the tree,
  its convs', dense layers' and BatchNorms' `in_features`, `out_features` and
  `num_features` read off the arrays (`nnx_adapter.to_module`); the user's module is
  not modified. Inside the library an `NNXModel` gets the conv widths for its `init`.

How `Rebuilt` works, and its limits: the wrapper shares its scope with the wrapped
module (`nn.share_scope`), so variable paths are unchanged, and runs it under
`capture.intercept`; the interceptor sets `features` on each `nn.Conv` instance just
before its `__call__` (instances are created afresh for every init/apply, so this never
leaks into the user's module object). Only `nn.Conv` (and subclasses) widths are
rewritten: a module that sizes a variable from its own attribute (e.g. a custom
per-channel scale of `self.channels` entries) rather than from its input's shape will
not match the merged tree, and `check_variables` says which leaf.

Example:
    >>> merged = merge_layer(model, variables, 1, labels, input_shape=(1, 32, 32, 1))
    >>> model = rebuild(model, merged, (1, 32, 32, 1))
    >>> logits = model.apply(merged, images)
"""

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
from flax import nnx

from graycnn import layers, nnx_adapter
from graycnn.graph import capture
from graycnn.tree import tree_get


class Rebuilt(nn.Module):
    """`module` with the `features` of the convs named in `features` overridden.

    Attributes:
        module: The user's module (its own variable paths are kept).
        features: ((conv module path, output width), ...).
    """

    module: nn.Module
    features: tuple[tuple[str, int], ...] = ()

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        widths = dict(self.features)

        def rewrite(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.Conv) and context.method_name == "__call__":
                width = widths.get(capture.module_path(context))
                if width is not None and width != module.features:
                    # A per-call bound instance, so mutating it cannot leak (see module doc).
                    object.__setattr__(module, "features", width)
            return next_fun(*args, **kwargs)

        with capture.intercept(rewrite):
            return self.module(*args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a `Rebuilt` wrapper, else `model` itself."""
    return model.module if isinstance(model, Rebuilt) else model


def widths_of(
    model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> dict[str, int]:
    """Output width of every conv, read off a (merged) tree.

    Args:
        model: The architecture (merged or not: only conv paths are read from it).
        variables: {'params': ..., ...}; arrays or jax.ShapeDtypeStruct; for an
            nnx.Module, an nnx.State or None (its own state).
        input_shape: (N, H, W, C) of the images the tree expects.

    Returns:
        {conv path: width} for every conv, in forward order.

    Raises:
        ValueError: a conv of the model has no kernel in the tree (naming the path).
    """
    model, variables, _ = nnx_adapter.adapt(model, variables)
    widths = {}
    for path in layers.conv_layers(unwrap(model), input_shape):
        try:
            kernel = tree_get(variables, f"params/{path}/kernel")
        except KeyError as e:
            raise ValueError(f"the tree does not match the model: {e.args[0]}") from None
        widths[path] = int(kernel.shape[-1])
    return widths


def with_widths(model: nn.Module, widths: Mapping[str, int]) -> nn.Module:
    """`model` (as `rebuild` returns it, or an NNXModel) with the convs in `widths`
    given those output widths; the other convs keep theirs.

    Example:
        >>> with_widths(g.model, {"stem": 20}).init(key, images)  # the merged shapes
    """
    if isinstance(model, nnx_adapter.NNXModel):
        features = {**dict(model.features), **widths}
        return dataclasses.replace(model, features=tuple(sorted(features.items())))
    base = unwrap(model)
    if "widths" in {f.name for f in dataclasses.fields(base)}:
        return base.clone(widths=tuple(sorted({**dict(base.widths), **widths}.items())))
    features = {**dict(model.features if isinstance(model, Rebuilt) else ()), **widths}
    return Rebuilt(base, tuple(sorted(features.items())))


@typing.overload
def rebuild(
    model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> nn.Module: ...
@typing.overload
def rebuild(
    model: nnx.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> nnx.Module: ...
def rebuild(
    model: nn.Module | nnx.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> nn.Module | nnx.Module:
    """Returns a module like `model` whose conv widths are those of `variables`.

    Args:
        model: The original (or an earlier rebuilt) module.
        variables: A (merged) tree; for an nnx.Module an nnx.State or None.
        input_shape: (N, H, W, C) of the images the tree expects.

    Returns:
        `model.clone(widths=...)` for modules with a `widths` attribute (the project's
        models), a `Rebuilt` wrapper for other linen modules, and for an nnx.Module a
        new nnx.Module holding the tree (checked against the model first).

    Raises:
        ValueError: for an nnx.Module, a tree that does not fit it (naming the path).
    """
    if isinstance(model, nnx.Module):
        from graycnn.graph.trace import check_variables  # trace imports this module

        adapted, tree, _ = nnx_adapter.adapt(model, variables)
        check_variables(rebuild(adapted, tree, input_shape), tree, input_shape)
        return nnx_adapter.to_module(model, tree)
    if isinstance(model, nnx_adapter.NNXModel):
        widths = widths_of(model, variables, input_shape)
        return dataclasses.replace(model, features=tuple(sorted(widths.items())))
    base = unwrap(model)
    widths = tuple(widths_of(base, variables, input_shape).items())
    if "widths" in {f.name for f in dataclasses.fields(base)}:
        return base.clone(widths=tuple(sorted(widths)))
    return Rebuilt(base, widths)
