"""Whether a planned merge fits the model: the tree at the merged width against the
shapes the model makes there (or, where it cannot be initialised there, runs)."""

import re
import typing

import jax
import numpy as np

from graycnn import graph
from graycnn.graph import ChannelGraph
from graycnn.tree import unflatten

if typing.TYPE_CHECKING:
    from graycnn.merge.plan import MergePlan


def check_shapes(g: ChannelGraph, plan: "MergePlan") -> None:
    """Raises ValueError naming the leaf unless the planned tree fits the model at the
    merged width (a variable whose size the module fixes itself, e.g. a custom
    self.param of (C,) multiplied onto the conv's output, does not follow it)."""
    count, members = plan.num_clusters, set(plan.group)
    widths = {m: count for m in plan.group}
    planned = {leaf: list(shape) for leaf, shape in g.leaf_shapes.items()}
    for step in plan.steps:
        whole = [s for s in step.segments if s.source in members]
        for _, leaf in step.leaves:
            planned[leaf][step.axis] += len(whole) * count - sum(s.length for s in whole)
    where = f"cannot {'prune' if plan.prune else 'merge'} conv {plan.path!r} to {count} filters"
    why = (
        "(the merge does not follow this variable: its module fixes its size rather than "
        "reading it off its input, or uses it inside a module registered as one op)"
    )
    try:
        expected = g.leaf_shapes_at(widths)
    except ValueError as e:
        # Initialising at the merged width fails, e.g. on the fixed-size variable itself;
        # whether the merged tree runs decides (an nnx.Module runs the arrays it holds).
        if (reason := _runs(g, widths, planned)) is None:
            return
        raise ValueError(f"{where}: {reason} {why}") from e
    for leaf, shape in planned.items():
        if expected.get(leaf) != tuple(shape):
            made = "no such leaf" if leaf not in expected else str(expected[leaf])
            raise ValueError(
                f"{where}: {leaf} would be {tuple(shape)}, but the model makes {made} {why}"
            )
    extra = sorted(set(expected) - set(planned))
    if extra:
        raise ValueError(f"{where}: the model then makes leaves the tree lacks: {extra[:8]}")


def _runs(g: ChannelGraph, widths: dict[str, int], planned: dict[str, list[int]]) -> str | None:
    """None if the model at `widths` runs a tree of the `planned` shapes, else why not,
    naming the leaf where Flax does."""
    dtypes = {p: np.dtype(np.float32) for p in planned}
    shapes = unflatten({p: jax.ShapeDtypeStruct(tuple(s), dtypes[p]) for p, s in planned.items()})
    model = graph.with_widths(g.model, widths)
    x = jax.ShapeDtypeStruct(g.input_shape, np.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, **graph.call_kwargs(model)), shapes, x)
    except Exception as e:  # Flax raises many types for trees that do not fit.
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        found = re.search(r'For parameter "([^"]+)" in "([^"]*)".*generate shape (\(.*?\))', text)
        if found is None:
            return f"the merged model does not run: {text}"
        name, scope, made = found.groups()
        leaf = "/".join(["params", *(p for p in scope.split("/") if p), name])
        got = tuple(planned[leaf]) if leaf in planned else "changed"
        return f"{leaf} would be {got}, but the model makes {made}"
    return None
