"""The budget search's allocation: which options (a layer merged alone to a count,
with its measured drop and size) make a plan that meets a target.

Pure functions on the options; sizes come from the caller's `size_of(steps)` (counted
on the channel graph, or measured latency fractions) and timings from `time_plans`.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression

FRACTIONS = (0.75, 0.5, 0.25)  # of each layer's width: the counts the search tries
# The FLOPs fractions a latency target also plans to (their plans are timed whole): every
# --target_flops of 0.2-0.95 in steps of 0.025, so a FLOPs row of the same speed is one.
FLOPS_LADDER = tuple(round(0.95 - 0.025 * i, 3) for i in range(31))
# The latency path's budgets, as multiples of the target (savings do not add exactly).
LATENCY_LADDER = (1.3, 1.2, 1.1, 1.05, 1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
# At most this many plans are timed, the nearest to the target as predicted (only to
# bound the time: on densenet_tiny a prediction was off by up to 0.1 and ranked plans
# of measured 0.45 and 0.54 the other way round, so none is left out by it otherwise).
MOST_TIMED = 32
TOP = 4  # --allocation=measured: the next steps measured on the whole plan, per step
CHECKS = 3  # --allocation=checked: the plans allocated and measured whole, at most


def allocate(
    options: Sequence[Any], kind: str, budget: float, full, size_of, floor: float | None = None
) -> dict[int, int]:
    """Greedy: cheapest accuracy per unit of size saved, until the plan fits `budget`;
    then planned layers are widened again into what the budget has left (`_fill`).

    Args:
        options: Each with `layer`, `clusters`, `drop` and the size `kind` of the model
            with that option alone.
        kind: 'flops', 'params' or 'latency'.
        full: The unmerged size (latency: 1.0); size_of(steps): a plan's size.
        floor: --allocation=floor: each option's drop is read non-increasing in the
            count and at least `floor` points (`noise_floor`), and equal costs go to the
            larger saving. None: the drops as measured, a merge that scored above the
            unmerged model free ('additive', and each plan 'checked' makes).

    Returns:
        {layer: clusters}.

    Raises:
        ValueError: no plan of the options fits `budget`.
    """
    if floor is not None:
        options = _floored(options, floor)
    by_layer = _by_layer(options)
    chosen: dict[int, Any] = {}
    while size_of({k: o.clusters for k, o in chosen.items()}) > budget:
        best, best_cost = None, (np.inf, 0.0)
        for layer, opts in by_layer.items():
            current = chosen.get(layer)
            drop0 = current.drop if current else 0.0
            saved0 = full - getattr(current, kind) if current else 0.0
            for o in opts:
                if current is not None and o.clusters >= current.clusters:
                    continue
                saved = (full - getattr(o, kind)) - saved0
                if saved <= 0:
                    continue
                cost = max(o.drop - drop0, 0.0) / saved
                # Of equal costs the default takes the first (the widest option of the
                # earliest layer); the floored drops take the larger saving, so steps
                # that cost nothing more go deep in one layer, not thin over many.
                key = (cost, -saved) if floor is not None else (cost, 0.0)
                if key < best_cost:
                    best, best_cost = o, key
        if best is None:
            raise ValueError(unreachable(kind, budget))
        chosen[best.layer] = best
    if floor is not None:  # every merge costs at least the floor: widening is the fill's
        return _fill(by_layer, {k: o.clusters for k, o in chosen.items()}, budget, size_of)
    return _fill(by_layer, _relax(by_layer, chosen, budget, size_of), budget, size_of)


def allocate_measured(
    options: Sequence[Any], kind: str, budget: float, size_of, drop_of, top: int = TOP
) -> dict[int, int]:
    """As `allocate`, for layers that interact: each greedy step is picked among the `top`
    cheapest by their options' drops, by the drop measured on the whole plan it makes
    (`drop_of(steps)`) per unit of size the plan saves.

    Args:
        kind: 'flops' or 'params'; size_of(steps): the plan's size, counted.
        drop_of: {layer: clusters} -> the accuracy the plan loses, points (measured).

    Returns:
        {layer: clusters}.
    """
    by_layer = _by_layer(options)
    chosen: dict[int, Any] = {}
    lost = 0.0
    while (size := size_of(steps := {k: o.clusters for k, o in chosen.items()})) > budget:
        ranked = []
        for layer, opts in by_layer.items():
            current = chosen.get(layer)
            for o in opts:
                if current is not None and o.clusters >= current.clusters:
                    continue
                saved = size - size_of(steps | {layer: o.clusters})
                if saved > 0:
                    added = max(o.drop - (current.drop if current else 0.0), 0.0)
                    ranked.append((added / saved, saved, o))
        if not ranked:
            raise ValueError(unreachable(kind, budget))
        best = None
        for _, saved, o in sorted(ranked, key=lambda r: (r[0], -r[1]))[:top]:
            measured = drop_of(steps | {o.layer: o.clusters})
            cost = (max(measured - lost, 0.0) / saved, -saved)
            if best is None or cost < best[0]:
                best = (cost, measured, o)
        assert best is not None
        _, lost, o = best
        chosen[o.layer] = o
    # The last step can overshoot: widen a layer again (or unmerge it) where the plan
    # still fits and loses less as measured.
    steps = {k: o.clusters for k, o in chosen.items()}
    for layer in sorted(steps):
        wider = sorted(o.clusters for o in by_layer[layer] if o.clusters > steps[layer])
        for k in [None, *reversed(wider)]:  # unmerged first, then the widest
            trial = {m: c for m, c in steps.items() if m != layer} | ({layer: k} if k else {})
            if size_of(trial) <= budget and (measured := drop_of(trial)) < lost:
                steps, lost = trial, measured
                break
    return steps


def allocate_checked(
    options: Sequence[Any], kind: str, budget: float, full, size_of, drop_of
) -> dict[int, int]:
    """The additive plan (`allocate`) checked whole: the plan's drop is measured
    (`drop_of`), and so is each planned layer's share of it, the plan's drop less the
    drop of the plan without that layer. Each planned option, and the narrower options of
    its layer, is then read as losing at least its share, and the plan is allocated again
    on those drops, up to CHECKS plans; of the plans measured, the least measured drop
    is kept. The cuts stay many and mild where they do not interact (the additive plan's
    lead over L1 pruning) and move away from layers that lose more together than alone.

    Args:
        options, kind, full, size_of: As `allocate`.
        drop_of: {layer: clusters} -> the points the whole plan loses, measured.

    Returns:
        {layer: clusters}.

    Raises:
        ValueError: no plan of the options fits `budget`.
    """
    drops = {(o.layer, o.clusters): o.drop for o in options}
    by_layer = _by_layer(options)
    measured: dict[tuple[tuple[int, int], ...], float] = {}
    steps = allocate(options, kind, budget, full, size_of)
    for _ in range(CHECKS):
        key = tuple(sorted(steps.items()))
        if key in measured:  # the drops read no differently: the plans repeat from here
            break
        lost = measured[key] = drop_of(steps)
        for layer, k in steps.items():
            rest = {m: c for m, c in steps.items() if m != layer}
            share = lost - (drop_of(rest) if rest else 0.0)
            for o in by_layer[layer]:
                if o.clusters <= k:
                    drops[layer, o.clusters] = max(drops[layer, o.clusters], share)
        reread = [dataclasses.replace(o, drop=drops[o.layer, o.clusters]) for o in options]
        steps = allocate(reread, kind, budget, full, size_of)
    best = min(measured, key=measured.__getitem__)
    return {layer: k for layer, k in best}


def _by_layer(options: Sequence[Any]) -> dict[int, list[Any]]:
    """{layer: its options, widest first}, layers in the options' order (greedy ties
    go to the first)."""
    by_layer: dict[int, list[Any]] = {}
    for o in options:
        by_layer.setdefault(o.layer, []).append(o)
    return {layer: sorted(opts, key=lambda o: -o.clusters) for layer, opts in by_layer.items()}


def _relax(by_layer, chosen: dict, budget: float, size_of: Callable) -> dict[int, int]:
    """Greedy steps are coarse and can overshoot the target: widen the costliest
    choices again (or drop them) while the plan still fits."""
    improved = True
    while improved:
        improved = False
        for layer in sorted(chosen, key=lambda k: -chosen[k].drop):
            current = chosen[layer]
            wider = [o for o in by_layer[layer] if o.clusters > current.clusters]
            for o in [None, *wider]:  # dropping the merge first, then the widest option
                trial = {k: v.clusters for k, v in chosen.items() if k != layer}
                if o is None and current.drop <= 0:
                    continue  # a merge that costs nothing stays
                if o is not None:
                    if o.drop >= current.drop:
                        continue
                    trial[layer] = o.clusters
                if size_of(trial) <= budget:
                    if o is None:
                        del chosen[layer]
                    else:
                        chosen[layer] = o
                    improved = True
                    break
            if improved:
                break
    return {layer: o.clusters for layer, o in chosen.items()}


def _fill(by_layer, steps: dict[int, int], budget: float, size_of) -> dict[int, int]:
    """Widens planned layers while the plan still fits: a greedy step is a quarter of a
    layer's width, so the last one can leave much of the budget unspent (the shipped
    model's 0.35 plan reached 0.302 of the FLOPs). Each step takes the widening that fits
    (a wider option of a planned layer, or no merge) of the largest drop removed per unit
    of size added, of equal ones the largest. Drops are read as `_monotone_drops`: a
    wider option of the same layer never predicts a larger loss.

    Returns:
        {layer: clusters}: no single planned layer can be widened within `budget`.
    """
    drops = {layer: _monotone_drops(opts) for layer, opts in by_layer.items()}
    while True:
        size, best = size_of(steps), None
        for layer, k in steps.items():
            for wider in [o.clusters for o in by_layer[layer] if o.clusters > k] + [None]:
                trial = {m: c for m, c in steps.items() if m != layer}
                if wider is not None:
                    trial[layer] = wider
                added = size_of(trial) - size
                if added <= 0 or size + added > budget:
                    continue
                removed = drops[layer][k] - (drops[layer][wider] if wider else 0.0)
                if best is None or (removed / added, added) > best[0]:
                    best = ((removed / added, added), trial)
        if best is None:
            return steps
        steps = best[1]


def noise_floor(options: Sequence[Any]) -> float:
    """--allocation=floor: the selection split's noise in one option's drop, points.

    A merge alone loses accuracy in expectation, so a drop measured below 0 is noise:
    with noise of spread s about a true drop near 0 the negative ones are half-normal,
    and their root mean square estimates s. 0 where no drop is negative.
    """
    negative = np.array([o.drop for o in options if o.drop < 0], float)
    return float(np.sqrt(np.mean(negative**2))) if len(negative) else 0.0


def _floored(options: Sequence[Any], floor: float) -> list[Any]:
    """The options with each layer's drops read as `_monotone_drops`, then at least
    `floor`: a merge the selection split cannot tell from free is not free, and the
    additive plan would otherwise spread a budget over many such layers (the goals'
    second draw: 11 convs each "free", together 4.7 points under the bar)."""
    floored = []
    for opts in _by_layer(options).values():
        drops = _monotone_drops(opts)
        floored += [dataclasses.replace(o, drop=max(drops[o.clusters], floor)) for o in opts]
    return floored


def _monotone_drops(options: Sequence[Any]) -> dict[int, float]:
    """{clusters: drop} of one layer's options, each at least 0 (a score above the
    unmerged model's is noise, as `drop_of_plan` reads it) and fitted non-increasing in
    the count (isotonic regression): the measured drops of neighbouring counts are noisy
    (500 selection images), a narrower layer does not lose less in expectation."""
    counts = np.array([o.clusters for o in options], float)
    drops = np.array([max(o.drop, 0.0) for o in options])
    if len(counts) > 1:
        drops = IsotonicRegression(increasing=False).fit_transform(counts, drops)
    return {int(k): float(d) for k, d in zip(counts, drops, strict=True)}


def unreachable(kind: str, budget: float) -> str:
    amount = f"{budget:.2f} of the gray model's latency" if kind == "latency" else (
        f"{budget:,.0f} {kind}")  # fmt: skip
    return (
        f"--target_{kind}: cannot reach {amount} by merging the mergeable "
        f"layers to {min(FRACTIONS):g} of their widths; ask for a larger fraction"
    )


def latency_of_plan(timed: dict[str, float], steps: dict[int, int]) -> float:
    """Predicted: each layer's measured saving (`timed['layer:k']`), added."""
    return 1.0 - sum(1.0 - timed[f"{layer}:{k}"] for layer, k in steps.items())


def drop_of_plan(options: Sequence[Any], steps: dict[int, int]) -> float:
    """Predicted accuracy lost: the options' drops, each at least 0 (as the greedy takes
    them: an option scored above the unmerged model is noise, not a gain), added."""
    drops = {(o.layer, o.clusters): max(o.drop, 0.0) for o in options}
    return sum(drops[layer, k] for layer, k in steps.items())


def latency_candidates(
    options: Sequence[Any], target: float, size_of: Callable, at_flops: Callable
) -> list[dict[int, int]]:
    """The distinct plans worth timing for a latency `target`: allocated on the measured
    per-layer savings (`size_of`, predicted by adding them) to budgets around the target,
    and to every FLOPs fraction of FLOPS_LADDER (`at_flops(fraction)`); at most
    MOST_TIMED, the nearest to the target as predicted first."""
    plans: dict[tuple, dict[int, int]] = {}
    budgets = [("latency", target * s) for s in LATENCY_LADDER]
    for kind, value in budgets + [("flops", f) for f in FLOPS_LADDER]:
        try:
            steps = allocate(options, "latency", value, 1.0, size_of) if kind == "latency" else (
                at_flops(value))  # fmt: skip
        except ValueError:  # that budget cannot be planned: the others can
            continue
        if steps:
            plans.setdefault(tuple(sorted(steps.items())), steps)
    return sorted(plans.values(), key=lambda s: abs(size_of(s) - target))[:MOST_TIMED]


def meet_latency(
    gray, options, target: float, size_of: Callable, at_flops: Callable, time_plans: Callable
) -> tuple[dict[int, int], float]:
    """Times every plan of `latency_candidates` whole, interleaved in one measurement
    (savings do not add exactly), and keeps the one of least predicted drop measured at
    `target` or under, of equal drops the slowest (it merges least). If none is, plans
    again on the latency path to the fastest one's prediction cut by its miss, up to
    three times; still none: the fastest measured.

    Args:
        gray: Passed to `time_plans(gray, {name: steps}) -> {name: measured fraction}`.
        at_flops: fraction -> the plan --target_flops=fraction would make.

    Returns:
        The plan and its measured latency fraction.
    """
    timed = []
    candidates = latency_candidates(options, target, size_of, at_flops)
    budget = target
    for _ in range(3):
        if not candidates:
            try:
                candidates = [allocate(options, "latency", budget, 1.0, size_of)]
            except ValueError:  # nothing is predicted that fast: the fastest measured
                break
        measured = time_plans(gray, {f"plan{i}": s for i, s in enumerate(candidates)})
        timed += [(s, measured[f"plan{i}"]) for i, s in enumerate(candidates)]
        met = [(s, m) for s, m in timed if m <= target]
        if met:
            return min(met, key=lambda sm: (drop_of_plan(options, sm[0]), -sm[1]))
        steps, fastest = min(timed, key=lambda sm: sm[1])
        budget = min(budget, size_of(steps)) * target / fastest
        candidates = []
    if not timed:
        raise ValueError(unreachable("latency", target))
    return min(timed, key=lambda sm: sm[1])
