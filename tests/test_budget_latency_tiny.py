"""--target_latency on the shipped densenet_tiny: the plan reaches its target as timed on
the planned model, with a stand-in clock (no timed asserts: the machine is noisy)."""

import math
import os

import numpy as np
import pytest
from flax import traverse_util

from graycnn import graph, merge
from graycnn.models import build_model
from graycnn.study import CompressConfig, budget, stages
from graycnn.training import checkpoint, data

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "graycnn", "assets", "densenet_tiny_color")
LANE = 8  # the stand-in's vector width: channels are processed in groups of 8
OVERHEAD = 0.02  # per layer, as a fraction of the gray model's mean layer cost


class _PaddedClock:
    """A deterministic stand-in for timing that is not FLOPs-proportional: each conv or
    dense layer costs its FLOPs with both channel counts padded up to a multiple of LANE
    (a 9-wide layer costs as a 16-wide one), plus a fixed overhead per layer.

    A model is given by its kernels' shapes, {kernel leaf: shape}: the gray model's, a
    plan's (its widths carried along the gray model's channel graph), or a merged
    model's own tree.
    """

    def __init__(self, gray: stages.Model):
        self.gray, self.g = gray, gray.graph()
        self.shapes = {k: tuple(s) for k, s in self.g.leaf_shapes.items()}
        self.full = self.cost(self.shapes, overhead=0.0)
        self.overhead = OVERHEAD * self.full / len(self.kernel_ops())
        self.full = self.cost(self.shapes)
        self.calls: list[dict[str, dict[int, int]]] = []

    def kernel_ops(self):
        return [op for op in self.g.layers.values() if op.kernel is not None]

    def cost(self, shapes: dict[str, tuple[int, ...]], overhead: float | None = None) -> float:
        overhead = self.overhead if overhead is None else overhead
        total = 0.0
        for op in self.kernel_ops():
            before, now = self.shapes[op.kernel], shapes[op.kernel]
            per_pair = op.flops / (before[op.in_axis] * before[op.out_axis])
            padded = [LANE * math.ceil(now[a] / LANE) for a in (op.in_axis, op.out_axis)]
            total += per_pair * padded[0] * padded[1] + overhead
        return total

    def plan_shapes(self, steps: dict[int, int]) -> dict[str, tuple[int, ...]]:
        """Each kernel's shape with every planned conv (and its residual group) at its
        count: an axis holding a narrowed conv's channels holds `count` of them."""
        count = {}
        for layer, k in steps.items():
            count |= dict.fromkeys(self.g.group(self.g.conv_order[layer - 1]), k)
        shapes = {leaf: list(s) for leaf, s in self.shapes.items()}
        for use in self.g.uses:
            shapes[use.leaf][use.axis] = sum(count.get(s.source, s.length) for s in use.segments)
        return {leaf: tuple(s) for leaf, s in shapes.items()}

    def latency(self, steps: dict[int, int]) -> float:
        return self.cost(self.plan_shapes(steps)) / self.full

    def __call__(self, gray, plans: dict[str, dict[int, int]]) -> dict[str, float]:
        assert gray is self.gray
        self.calls.append(plans)
        return {name: self.latency(steps) for name, steps in plans.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shipped color densenet_tiny, folded to gray on 10 real images per class; the
    search scores its options on 20 of them."""
    split = data.load_dataset("cifar10_sample", "all")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:10] for c in range(10)])
    path = tmp_path_factory.mktemp("data") / "ten.npz"
    np.savez(path, images=split.images[idx], labels=split.labels[idx])
    model_config, variables, _ = checkpoint.load_model(SHIPPED)
    assert model_config.name == "densenet_tiny"
    config = CompressConfig(
        checkpoint=SHIPPED, dataset=f"npz:{path}", target_latency=(0.55,),
        objective="activation", metric="correlation", cluster="complete",
        search_images=20,  # the cheaper score (one BN batch): the subject is the clock
    )  # fmt: skip
    train_split = data.load_dataset(config.dataset, "train")
    color = stages.Model(model_config, variables, SHIPPED)
    gray = stages.fold_color_model(config, color, train_split)
    return config, color, gray, train_split


def _merged(gray: stages.Model, steps: dict[int, int]) -> stages.Model:
    """`gray` with each planned layer merged for real to its count, in forward order."""
    model, rng = gray, np.random.default_rng(0)
    for layer, k in sorted(steps.items()):
        g = model.graph()
        width = g.widths[g.conv_order[layer - 1]]
        labels = rng.permutation(np.arange(width) % k)  # every cluster used
        model = stages.apply_plan(model, merge.plan_merge(g, layer, labels, "moments"))
    return model


@pytest.mark.slow
def test_the_latency_plan_on_densenet_tiny_meets_its_target_as_timed(tiny):
    config, color, gray, train_split = tiny
    clock = _PaddedClock(gray)
    [plan] = budget.search(config, gray, color, train_split, time_plans=clock)
    steps = dict(plan.steps)
    assert plan.target == ("latency", 0.55) and len(steps) >= 2
    # The clock is not FLOPs-proportional: padding makes the savings of two layers
    # differ from their sum, the case the planner's measurement of the plan is for.
    full_flops = gray.graph().flops()["total"]
    assert any(
        abs(clock.latency({o.layer: o.clusters}) - o.flops / full_flops) > 0.005
        for o in plan.options
    )
    # Every option's latency is the clock's; the plan was timed whole, with the other
    # candidates, and is the least predicted drop of those that met the target.
    for o in plan.options:
        assert o.latency == pytest.approx(clock.latency({o.layer: o.clusters}))
    assert steps in clock.calls[-1].values()
    drops = {(o.layer, o.clusters): max(o.drop, 0.0) for o in plan.options}
    met = [s for s in clock.calls[-1].values() if clock.latency(s) <= 0.55]
    assert min(sum(drops[k] for k in s.items()) for s in met) == pytest.approx(
        sum(drops[k] for k in steps.items()))  # fmt: skip
    reached = clock.latency(steps)
    assert reached <= 0.55
    assert plan.achieved["latency"] == pytest.approx(reached, abs=1e-12)
    # The plan merged for real: every planned conv has its count, the tree's kernels
    # are the shapes the clock timed, and its FLOPs are the plan's fraction.
    merged = _merged(gray, steps)
    g = merged.graph()
    for layer, k in steps.items():
        assert g.widths[g.conv_order[layer - 1]] == k
    leaves = traverse_util.flatten_dict(merged.variables, sep="/")
    shapes = {leaf: tuple(v.shape) for leaf, v in leaves.items() if leaf in clock.shapes}
    assert shapes == clock.plan_shapes(steps)
    assert clock.cost(shapes) / clock.full == pytest.approx(reached, abs=1e-12)
    color_flops = graph.count_flops(
        build_model(color.config), color.variables, color.config.input_shape
    )["total"]
    assert g.flops()["total"] / color_flops == pytest.approx(plan.achieved["flops"])
