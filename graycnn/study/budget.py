"""Compression to a target size: which layers to merge, and to how many clusters.

1. Sensitivity: every conv the tracer can merge is merged alone to a few fractions of
   its width (with the run's own comparison, clustering and merge), its BatchNorm
   recalibrated, and the accuracy lost measured on a *selection split carved from the
   training data*. The validation and held-out splits are never read.
2. Allocation (`allocation`): greedy on the cost of each step, accuracy lost per FLOP
   (or parameter) saved, from no merge towards smaller widths, until the planned model
   (its exact widths, counted on the channel graph) meets the target, then widens planned
   layers into what the coarse last step left. Drops are taken as additive across layers;
   the default (`--allocation=checked`) then measures the plan whole, reads each planned
   layer's share of its drop back into the options and allocates again (`floor`: each
   drop at least the selection split's noise). Sizes are not assumed additive but
   counted. A latency target times whole candidate plans and keeps the least predicted
   drop that is fast enough.

The plan is [(layer, clusters)] in forward order, with the measurements behind it.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from graycnn import cluster, distance, graph, merge
from graycnn import receptive_field as rf
from graycnn.deploy import measure_speed
from graycnn.models import ModelConfig, build_model, count_params
from graycnn.study import allocation, search_proxy, stages
from graycnn.study.config import ACTIVATION, FISHER, CompressConfig
from graycnn.training import data, evaluation, parallel

FRACTIONS = allocation.FRACTIONS
SELECTION_PER_CLASS = search_proxy.SELECTION_PER_CLASS


@dataclasses.dataclass(frozen=True)
class Option:
    """Merging `layer` alone to `clusters`: its accuracy lost on the selection split
    (points) and the model's size then."""

    layer: int
    clusters: int
    drop: float
    params: int
    flops: int
    latency: float = 0.0  # measured, a fraction of the gray model's; --target_latency only


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen merges and what they reach.

    Attributes:
        steps: [(layer, clusters)] in forward order.
        target: ('flops' or 'params', fraction of the color model's).
        achieved: The planned model's size as a fraction of the color model's.
        options: Every measured option (the sensitivity table).
        selection_accuracy: The unmerged gray model's score (default: selection accuracy).
    """

    steps: list[tuple[int, int]]
    target: tuple[str, float]
    achieved: dict[str, float]
    options: list[Option]
    selection_accuracy: float

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": [{"layer": layer, "clusters": k} for layer, k in self.steps],
            "target": {self.target[0]: self.target[1]},
            "achieved": self.achieved,
            "selection_accuracy": self.selection_accuracy,
            "options": [dataclasses.asdict(o) for o in self.options],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        """The plan `to_json` wrote (a resumed run reads its search back)."""
        ((kind, fraction),) = d["target"].items()
        return cls(
            [(s["layer"], s["clusters"]) for s in d["steps"]],
            (kind, fraction),
            d["achieved"],
            [Option(**o) for o in d["options"]],
            d["selection_accuracy"],
        )


def selection_split(train: data.Split, per_class: int = SELECTION_PER_CLASS) -> data.Split:
    """The last `per_class` training images of each class: the budget search's data."""
    keep = np.zeros(len(train), bool)
    for c in range(train.num_classes):
        keep[np.flatnonzero(train.labels == c)[-per_class:]] = True
    return data.Split(train.images[keep], train.labels[keep], train.num_classes)


def search(
    config: CompressConfig,
    gray: stages.Model,
    color: stages.Model,
    train: data.Split,
    time_plans: Callable[[Any, dict[str, dict[int, int]]], dict[str, float]] | None = None,
    score: Callable[[Any], float] | None = None,
) -> list[Plan]:
    """Picks layers and cluster counts to reach each of config.target_flops /
    target_params (a sweep: one plan per fraction) or config.target_latency.

    The sensitivities do not depend on the target: they are measured once, and each
    target's plan is allocated from the same options.

    Args:
        gray: The gray model; color: the color model, for the size fractions.
        train: The training split; the selection split is carved from it. Nothing else
            is read: the search cannot see the validation or held-out data.
        time_plans: For --target_latency: (gray, {name: steps}) -> {name: the planned
            model's measured latency as a fraction of the gray model's}; default
            `measure_plans` (tests replace it).
        score: variables (in gray's shapes) -> a quality in [0, 1] read from `train` only;
            an option's drop is 100 x (gray's score - its). Default: the selection
            accuracy after a short BN recalibration (transfer scores features instead).

    Returns:
        One plan per target, in the order the fractions were given.
    """
    kind, targets = config.targets_of()
    g = gray.graph()
    candidates = [
        (i, p) for i, p in enumerate(g.conv_order, start=1)
        if p in g.widths and _counts(g.widths[p], config.rounding) and _mergeable(g, p)
    ]  # fmt: skip
    counts = {layer: _counts(g.widths[path], config.rounding) for layer, path in candidates}
    narrowest = {layer: c[-1] for layer, c in counts.items()}
    time_plans = time_plans or functools.partial(measure_plans, config=config)
    color_size = _size(color.config, color.variables)  # traced once for every fraction
    counted = {k: functools.partial(_counted_size, gray, g, k) for k in ("params", "flops")}
    full, size_of, timed = _measure(kind, gray, color_size, counted, counts, narrowest, time_plans)
    # Every candidate at its narrowest option is the smallest plan: refuse a target it
    # misses before measuring any sensitivity (minutes), not after.
    smallest = timed["smallest"] if kind == "latency" else size_of(narrowest)
    if smallest > min(targets) * full:
        raise ValueError(allocation.unreachable(kind, min(targets) * full))
    selected = selection_split(train, search_proxy.per_class(config.search_images, train))
    score = score or search_proxy.search_score(config, gray, train, selected, _accuracy)
    options, base_accuracy, merges = _sensitivities(
        config, gray, train, candidates, counts, timed, score
    )
    floor = allocation.noise_floor(options) if config.allocation == "floor" else None
    # --allocation=measured and checked: whole plans scored as the options were, each once
    drop_of = functools.partial(_drop_of_plan, gray, merges, score, base_accuracy, {})
    plans = []
    for target in targets:
        achieved = {}
        if kind == "latency":
            at_flops = functools.partial(
                _plan_at_flops, options, color_size["flops"], counted["flops"]
            )
            steps, achieved["latency"] = allocation.meet_latency(
                gray, options, target, size_of, at_flops, time_plans
            )
        elif config.allocation == "measured":
            steps = allocation.allocate_measured(options, kind, target * full, size_of, drop_of)
        elif config.allocation == "checked":
            steps = allocation.allocate_checked(
                options, kind, target * full, full, size_of, drop_of
            )
        else:
            steps = allocation.allocate(options, kind, target * full, full, size_of, floor)
        size = _size_of_plan(gray, steps, g)
        achieved = {k: v / color_size[k] for k, v in size.items()} | achieved
        plans.append(Plan(sorted(steps.items()), (kind, target), achieved, options, base_accuracy))
    return plans


def _sensitivities(config, gray, train, candidates, counts, timed, score) -> tuple:
    """Every candidate layer merged alone to each of its `counts`: the options, the
    unmerged model's score (`search`) they are measured against, and each option's
    merge plan, {(layer, count): MergePlan}."""
    g = gray.graph()
    base_accuracy = score(gray.variables)
    options, merges = [], {}
    for layer, path in tqdm(candidates, desc="budget: sensitivity", leave=False):
        distances = _distances(config, gray, layer, path, train)
        for i, k in enumerate(counts[layer]):
            # The model's own shape check (its init traced at the merged width) at the
            # conv's first count only: a module whose variables do not follow the width
            # fails it at any count, and the plan kept is merged with the check.
            labels = _cluster(config, distances, k)
            plan = merge.plan_merge(g, layer, labels, config.bn_rule, check=i == 0)
            merges[layer, k] = plan
            # The merged function in the gray model's shapes: every option then runs on
            # the programs compiled for the base accuracy, instead of compiling its own.
            merged = plan.apply(gray.variables, keep_widths=True)
            acc = score(merged)
            size = _size_of_plan(gray, {layer: k}, g)
            latency = timed.get(f"{layer}:{k}", 0.0)
            options.append(Option(layer, k, 100 * (base_accuracy - acc), **size, latency=latency))
    return options, base_accuracy, merges


def _drop_of_plan(gray, merges, score, base_accuracy, seen: dict, steps: dict) -> float:
    """--allocation=measured and checked: the points a whole plan loses, its options'
    merges applied in forward order in the gray model's shapes (each clustered on the
    unmerged model), scored as the options were; `seen` keeps each plan's."""
    key = tuple(sorted(steps.items()))
    if key not in seen:
        variables = gray.variables
        for layer, k in key:
            variables = merges[layer, k].apply(variables, keep_widths=True)
        seen[key] = 100 * (base_accuracy - score(variables))
    return seen[key]


def plans_to_json(plans: list[Plan]) -> dict[str, Any]:
    """budget_search.json's result: one plan as `Plan.to_json` (as before sweeps), a
    sweep as {'plans': [each plan's]}."""
    return plans[0].to_json() if len(plans) == 1 else {"plans": [p.to_json() for p in plans]}


def plans_from_json(d: dict[str, Any]) -> list[Plan]:
    """The plans `plans_to_json` wrote (a single-plan file of an older run too)."""
    return [Plan.from_json(p) for p in d["plans"]] if "plans" in d else [Plan.from_json(d)]


def _measure(kind, gray, color_size, counted, counts, narrowest, time_plans) -> tuple:
    """The unmerged size, a plan's size (`size_of(steps)`) and, for latency, every
    option's and the narrowest plan's measured latency fraction (`timed`).

    Args:
        color_size: The color model's {'params', 'flops'}; counted: {kind: steps -> the
            planned gray model's size}.
    """
    if kind != "latency":
        return color_size[kind], counted[kind], {}
    plans = {f"{layer}:{k}": {layer: k} for layer in counts for k in counts[layer]}
    timed = time_plans(gray, plans | {"smallest": narrowest})
    return 1.0, functools.partial(allocation.latency_of_plan, timed), timed


def measure_plans(gray: Any, plans: dict[str, dict[int, int]], config: Any) -> dict[str, float]:
    """Each plan's model (weights of ones: time depends only on widths) against the gray
    model, in interleaved rounds at --speed_batch: its latency as a fraction of the gray
    model's (median of per-round ratios), timed by process 0 alone for one plan on all."""

    def measure() -> dict[str, float]:  # process 0's: the others need no timed models
        models = {"gray": (gray.config, gray.variables)}
        for name, steps in plans.items():
            model_config = _config_of_plan(gray, steps)
            shapes = _abstract_variables(model_config)  # traced, not compiled
            models[name] = (model_config, jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes))
        with tqdm(total=len(models), desc="budget: timing each option", leave=False) as bar:
            rounds, step = max(config.speed_rounds, 3), lambda done, _: bar.update(done - bar.n)
            timed = measure_speed(models, (config.speed_batch,), rounds, progress=step)
        return {name: 1 / timed[name].speedup_over("gray", config.speed_batch) for name in plans}

    return parallel.from_primary(measure)


def _plan_at_flops(options, full: int, size_of: Callable, fraction: float) -> dict[int, int]:
    """The plan --target_flops=fraction makes of the same options (full: the color
    model's FLOPs)."""
    return allocation.allocate(options, "flops", fraction * full, full, size_of)


def _counted_size(gray, g, kind: str, steps: dict[int, int]) -> int:
    """The planned gray model's size `kind` ('params' or 'flops'), counted on `g`."""
    return _size_of_plan(gray, steps, g)[kind]


def _counts(width: int, multiple: int = 1) -> list[int]:
    """The cluster counts tried for a layer of `width` filters, widest first: each of
    FRACTIONS of the width, rounded to a multiple of `multiple` (--round_to), narrower
    than the layer; none for a layer of 2 filters or fewer."""
    if width <= 2:
        return []
    counts = {max(multiple, multiple * round(width * f / multiple)) for f in FRACTIONS}
    return sorted((k for k in counts if k < width), reverse=True)


def _config_of_plan(gray, steps: dict[int, int], g: Any = None) -> ModelConfig:
    """`gray`'s config with each planned layer at its cluster count (`g`: its graph)."""
    widths = _planned_widths(g or gray.graph(), steps)
    return gray.config.replace(widths=dict(gray.config.widths) | widths)


def _planned_widths(g: graph.ChannelGraph, steps: dict[int, int]) -> dict[str, int]:
    """{conv path: count} of each planned layer, its residual group's convs too."""
    widths: dict[str, int] = {}
    for layer, k in steps.items():
        widths |= dict.fromkeys(g.group(g.conv_order[layer - 1]), k)
    return widths


def _size_of_plan(gray, steps: dict[int, int], g: Any = None) -> dict[str, int]:
    """The exact size of `gray` with each planned layer at its cluster count, nothing
    merged: counted on its channel graph `g` (`_counted`), else on abstract shapes."""
    g = g or gray.graph()
    if (counted := _counted(g, steps)) is not None:
        return counted
    config = _config_of_plan(gray, steps, g)
    return _size(config, _abstract_variables(config))


def _counted(g: graph.ChannelGraph, steps: dict[int, int]) -> dict[str, int] | None:
    """{'params', 'flops'} of `g`'s model with each planned layer (its residual group
    too) at its count, without a trace (the planner counts hundreds of plans): a leaf
    axis holding a narrowed conv's channels loses the rest; a layer's FLOPs scale with
    its kernel. None where the graph does not say it exactly (groups, a slice)."""
    widths = _planned_widths(g, steps)
    shapes = {leaf: list(shape) for leaf, shape in g.leaf_shapes.items()}
    for use in g.uses:
        if sum(s.length for s in use.segments) != g.leaf_shapes[use.leaf][use.axis]:
            return None
        length = 0
        for s in use.segments:
            if s.source in widths and (s.start, s.length) != (0, g.widths[s.source]):
                return None
            length += widths[s.source] if s.source in widths else s.length
        shapes[use.leaf][use.axis] = length
    flops = 0
    for op in g.layers.values():
        if op.kernel is None or op.groups != 1 or op.kernel not in shapes:
            return None
        before = math.prod(g.leaf_shapes[op.kernel])
        if op.flops % before:
            return None
        flops += op.flops // before * math.prod(shapes[op.kernel])
    return {"params": sum(math.prod(s) for s in shapes.values()), "flops": flops}


def _abstract_variables(config: ModelConfig) -> Any:
    """The variables' shapes and dtypes of `config`'s model (jax.ShapeDtypeStruct)."""
    model = build_model(config)
    return jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros(config.input_shape))


def _size(model_config, variables) -> dict[str, int]:
    g = graph.trace(build_model(model_config), variables, model_config.input_shape)
    return {"params": count_params(variables), "flops": g.flops()["total"]}


def _mergeable(g: graph.ChannelGraph, path: str) -> bool:
    try:
        g.check_mergeable(path)
    except ValueError:
        return False
    return g.group(path)[0] == path  # a residual group is a candidate once, by its first conv


def _distances(config, gray, layer: int, path: str, train: data.Split) -> np.ndarray:
    objective = config.objective_of(layer)
    if objective == FISHER:
        return stages.merge_costs(
            build_model(gray.config), gray.variables, path, train, config.seed
        )
    if objective == ACTIVATION:
        compared = stages.filter_responses(
            build_model(gray.config), gray.variables, path, train, config.seed
        )
    else:
        compared = rf.gradient_ascent(
            build_model(gray.config), gray.variables, layer, objective=objective,
            steps=config.steps, seed=config.seed, image_shape=gray.config.input_shape[1:],
        ).fields[..., 0]  # fmt: skip
    return np.asarray(distance.pairwise(compared, config.metric_of(layer)))


def _cluster(config, distances: np.ndarray, k: int) -> np.ndarray:
    method = config.cluster
    try:
        return cluster.cluster(distances, method, num_clusters=k).labels
    except ValueError:  # DBSCAN cannot reach every count (ties): complete linkage can.
        return cluster.cluster(distances, "complete", num_clusters=k).labels


def _accuracy(model_config, train, selection, seed: int, variables) -> float:
    """Selection accuracy after a short BN recalibration on training images."""
    variables = search_proxy.recalibrated(model_config, variables, train, seed)
    return evaluation.evaluate(model_config, variables, selection, "gray")["accuracy"]
