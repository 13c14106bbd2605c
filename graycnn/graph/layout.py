"""Channel rules for ops that move, keep, cut or drop axes (internal).

Each rule maps the channel axis through the op, or marks the convs whose channels the op
mixes (pooling over channels, LayerNorm's reduction, strided channel slices) as
unmergeable. Variable-derived values keep, per axis, the leaf axis they index.
"""

from collections.abc import Callable

from graycnn.graph.values import Channels, Value, cut_segments, unknown


def _shift_axis(eqn, ins, shapes, rec, new_axis: Callable, keep_pristine=True, leaf_map=None):
    """Rule for single-operand ops that move, keep or drop axes."""
    x = ins[0]
    outs = []
    for shape in shapes:
        if x.channels is not None:
            axis, segments = new_axis(x.channels.axis, x.channels.segments, shape)
            if axis is None:
                rec.taint([x], f"{eqn.primitive.name} {segments}")
                outs.append(Value(shape, data=True))
                continue
            pristine = x.channels.pristine if keep_pristine else frozenset()
            if not keep_pristine and x.channels.pristine:
                rec.first_op(x.channels, eqn.primitive.name, 0)
            outs.append(Value(shape, channels=Channels(axis, segments, pristine), data=True))
        elif x.data:
            outs.append(Value(shape, data=True))
        else:
            leaves = {}
            exact = x.exact
            for leaf, amap in x.leaves.items():
                new_map, ok = leaf_map(amap, shape) if leaf_map else (None, False)
                if new_map is None:
                    new_map, ok = (None,) * len(shape), False
                leaves[leaf] = new_map
                exact = exact and ok
            outs.append(Value(shape, leaves=leaves, exact=exact, opaque=x.opaque))
    return outs


def reshape(eqn, ins, shapes, rec):
    """Keeps the channel axis through size-1 changes; flattening it last repeats segments."""
    if eqn.params.get("dimensions") is not None:
        return unknown("reshape with dimensions", ins, shapes, rec)
    old = ins[0].shape
    (new,) = shapes
    groups = _reshape_groups(old, new)

    def new_axis(a, segments, shape):
        for olds, news in groups:
            if a not in olds:
                continue
            big_old = [d for d in olds if old[d] != 1]
            big_new = [d for d in news if new[d] != 1]
            if big_old == [a] and len(big_new) == 1:
                return big_new[0], segments
            if big_old and big_old[-1] == a and len(big_new) == 1:
                # Flattening (..., H, W, C) -> (..., H*W*C): channels vary fastest.
                return big_new[0], segments * (new[big_new[0]] // old[a])
        return None, "reshapes the channel axis other than by flattening it last"

    def leaf_map(amap, shape):
        out: list[int | None] = [None] * len(new)
        ok = True
        for olds, news in groups:
            big_old = [d for d in olds if old[d] != 1]
            big_new = [d for d in news if new[d] != 1]
            if len(big_old) == 1 and len(big_new) == 1:
                out[big_new[0]] = amap[big_old[0]]
            elif any(amap[d] is not None for d in big_old):
                ok = False
        return tuple(out), ok

    return _shift_axis(eqn, ins, shapes, rec, new_axis, leaf_map=leaf_map)


def _reshape_groups(old, new) -> list[tuple[list[int], list[int]]]:
    """Splits a reshape into groups of consecutive axes with equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i == len(old) or j == len(new):
            groups.append((list(range(i, len(old))), list(range(j, len(new)))))
            break
        olds, news, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                po *= old[i]
                olds.append(i)
                i += 1
            else:
                pn *= new[j]
                news.append(j)
                j += 1
        groups.append((olds, news))
    return groups


def broadcast_in_dim(eqn, ins, shapes, rec):
    """Moves the channel axis to its broadcast position."""
    dims = eqn.params["broadcast_dimensions"]
    old = ins[0].shape

    def new_axis(a, segments, shape):
        if old[a] != shape[dims[a]]:
            return None, "broadcasts the channel axis"
        return dims[a], segments

    def leaf_map(amap, shape):
        out: list[int | None] = [None] * len(shape)
        for i, d in enumerate(dims):
            if old[i] == shape[d]:
                out[d] = amap[i]
        return tuple(out), True

    return _shift_axis(eqn, ins[:1], shapes, rec, new_axis, leaf_map=leaf_map)


def transpose(eqn, ins, shapes, rec):
    """Moves the channel axis with the permutation."""
    perm = list(eqn.params["permutation"])
    return _shift_axis(
        eqn,
        ins,
        shapes,
        rec,
        lambda a, segments, shape: (perm.index(a), segments),
        leaf_map=lambda amap, shape: (tuple(amap[p] for p in perm), True),
    )


def squeeze(eqn, ins, shapes, rec):
    """Drops size-1 axes around the channel axis."""
    dims = [d % len(ins[0].shape) for d in eqn.params["dimensions"]]
    keep = [d for d in range(len(ins[0].shape)) if d not in dims]
    return _shift_axis(
        eqn,
        ins,
        shapes,
        rec,
        lambda a, segments, shape: (keep.index(a), segments) if a in keep else (None, "drops it"),
        leaf_map=lambda amap, shape: (tuple(amap[d] for d in keep), True),
    )


def reduce(eqn, ins, shapes, rec):
    """Reductions over other axes (a spatial mean) keep the channels."""
    axes = [d % len(ins[0].shape) for d in eqn.params["axes"]]

    def new_axis(a, segments, shape):
        if a in axes:
            return None, "reduces over the channel axis (e.g. LayerNorm, softmax)"
        return a - sum(d < a for d in axes), segments

    keep = [d for d in range(len(ins[0].shape)) if d not in axes]
    return _shift_axis(
        eqn,
        ins,
        shapes,
        rec,
        new_axis,
        keep_pristine=False,
        leaf_map=lambda amap, shape: (tuple(amap[d] for d in keep), False),
    )


def _per_axis_rule(check: Callable[[object, int], bool], what: str, operands: int = 1):
    """A rule for ops that act along axes other than the channel axis, given `check`."""

    def rule(eqn, ins, shapes, rec):
        def new_axis(a, segments, shape):
            return (a, segments) if check(eqn.params, a) else (None, what)

        outs = _shift_axis(eqn, ins[:1], shapes, rec, new_axis, keep_pristine=False)
        rec.taint(ins[1:operands], f"{eqn.primitive.name} reads channels as a parameter")
        return outs

    return rule


def reduce_window(eqn, ins, shapes, rec):
    """Pooling keeps the channels unless its window spans the channel axis."""
    n = len(ins) // 2 if eqn.primitive.name == "reduce_window" else 1

    def ok(p, a):
        pad = p["padding"][a]
        dilations = [p.get(k, (1,) * (a + 1))[a] for k in ("base_dilation", "window_dilation")]
        trivial = p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1
        return trivial and tuple(pad) == (0, 0) and dilations == [1, 1]

    if n != 1:
        return unknown(eqn.primitive.name, ins, shapes, rec)
    return _per_axis_rule(ok, "pools over the channel axis")(eqn, ins, shapes, rec)


def pad(eqn, ins, shapes, rec):
    """Spatial padding keeps the channels; padding the channel axis is refused."""

    def ok(p, a):
        return tuple(p["padding_config"][a]) == (0, 0, 0)

    return _per_axis_rule(ok, "pads the channel axis", operands=2)(eqn, ins, shapes, rec)


def cumulative(eqn, ins, shapes, rec):
    """cumsum and friends along other axes keep the channels."""
    return _per_axis_rule(lambda p, a: p["axis"] != a, "accumulates along the channel axis")(
        eqn, ins, shapes, rec
    )


def rev(eqn, ins, shapes, rec):
    """Reversing other axes keeps the channels."""
    return _per_axis_rule(lambda p, a: a not in p["dimensions"], "reverses the channel axis")(
        eqn, ins, shapes, rec
    )


def slice_(eqn, ins, shapes, rec):
    """Slicing the channel axis cuts the segments (strided slices are refused)."""
    p = eqn.params

    def new_axis(a, segments, shape):
        if p["strides"] is not None and p["strides"][a] != 1:
            return None, "takes strided channels"
        return a, cut_segments(segments, p["start_indices"][a], p["limit_indices"][a])

    return _shift_axis(eqn, ins, shapes, rec, new_axis)


def split(eqn, ins, shapes, rec):
    """Splitting the channel axis cuts the segments; other axes keep them."""
    axis, sizes = eqn.params["axis"], [int(s) for s in eqn.params["sizes"]]
    x = ins[0]
    if x.channels is None or x.channels.axis != axis:
        return [_shift_axis(eqn, ins, [s], rec, lambda a, seg, sh: (a, seg))[0] for s in shapes]
    outs, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        segments = cut_segments(x.channels.segments, start, start + size)
        outs.append(Value(shape, channels=Channels(axis, segments, x.channels.pristine), data=True))
        start += size
    return outs


def channelwise(eqn, ins, shapes, rec):
    """A registered op whose output channel c depends on input channel c only (of its
    first operand): a custom pooling, resize or per-channel filter. The channel axis
    keeps its position and size; the other operands must not be variables or channels."""

    def new_axis(a, segments, shape):
        if len(shape) != len(ins[0].shape) or shape[a] != ins[0].shape[a]:
            return None, "changes the size or position of the channel axis"
        return a, segments

    outs = _shift_axis(eqn, ins[:1], shapes, rec, new_axis, keep_pristine=False)
    rec.taint(ins[1:], f"{eqn.primitive.name} reads channels as a parameter")
    if any(v.leaves or v.opaque for v in ins[1:]):
        rec.taint(
            ins[:1],
            f"{eqn.primitive.name} (registered 'channelwise') takes a variable operand, which "
            "a merge would not follow; register it as 'elementwise' or with your own rule",
        )
    return outs
