"""What the channel interpreter knows about values, and what it records (internal).

See `_rules` for the interpretation itself.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Segment:
    """Positions along a channel axis holding channels start..start+length of `source`.

    `source` is the module path of the conv that produced them, or None for channels
    that no conv produced (e.g. the input image concatenated to features).
    """

    source: str | None
    start: int
    length: int


Segments = tuple[Segment, ...]


@dataclasses.dataclass(frozen=True)
class Channels:
    """The channel axis of a value and what it holds.

    `pristine` names the sources whose values are still exactly their conv's output
    (only concatenation, layout ops and dtype casts since): a constant added to such a
    conv's output can still be absorbed exactly by the first op that reads it.
    """

    axis: int
    segments: Segments
    pristine: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Value:
    """What the interpreter knows about one jaxpr variable.

    Attributes:
        shape: The variable's shape.
        channels: The conv channels it carries, if any (then `data` is True).
        leaves: For values computed from variable leaves and constants only: leaf path ->
            for each axis of the value, the leaf axis it indexes (None: broadcast).
        exact: The value is its single leaf up to layout ops (reshape, cast, broadcast).
        data: Depends on the input images.
        opaque: Computed from leaves by an op the interpreter does not follow.
    """

    shape: tuple[int, ...]
    channels: Channels | None = None
    leaves: Mapping[str, tuple[int | None, ...]] = dataclasses.field(default_factory=dict)
    exact: bool = False
    data: bool = False
    opaque: bool = False

    def kernel(self) -> tuple[str, tuple[int | None, ...]] | None:
        """(leaf, axis map) when this value is one leaf up to layout ops, else None."""
        if self.exact and not self.data and len(self.leaves) == 1:
            return next(iter(self.leaves.items()))
        return None


@dataclasses.dataclass(frozen=True)
class Use:
    """An axis of a variable leaf indexed by traced channels.

    Attributes:
        leaf: 'params/...' or 'batch_stats/...' path.
        axis: The leaf's axis.
        segments: What each position along that axis holds.
        kind: 'produce' (a conv kernel's output axis), 'contract' (a kernel's input
            axis: the leaf consumes the channels) or 'elementwise' (a per-channel vector,
            e.g. a BatchNorm mean or a conv bias).
        primitive: The op where the leaf met the channels.
    """

    leaf: str
    axis: int
    segments: Segments
    kind: str
    primitive: str


@dataclasses.dataclass(frozen=True)
class FirstOp:
    """The first non-layout op that reads a conv's output.

    `leaf`/`leaf_axis` name the other operand when it is a single variable leaf (the
    BatchNorm mean of `x - mean`, the bias of `x + bias`); `operand` is the position of
    the conv's channels among the op's operands.
    """

    source: str
    primitive: str
    operand: int
    leaf: str | None = None
    leaf_axis: int | None = None
    segments: Segments = ()


@dataclasses.dataclass
class LayerOp:
    """A conv or dense op whose kernel is a variable leaf.

    `groups` is a conv's feature_group_count: output channel k belongs to group
    k // (width / groups) and reads only that group's input channels.
    """

    path: str
    kind: str
    kernel: str | None
    in_axis: int | None
    out_axis: int | None
    flops: int
    groups: int = 1


class Recorder:
    """Collects what the interpretation finds; a union-find ties residual groups.

    `modules` (module path -> class name) and `where` (the name stack of the op being
    interpreted) let every problem name the module whose op it is, e.g. "(in GroupNorm
    'gn')": linen names its modules on the stack, `graycnn.nnx_adapter` NNX ones.
    """

    def __init__(self, modules: Mapping[str, str] | None = None):
        self.modules = dict(modules or {})
        self.where: tuple[str, ...] = ()
        self.sources: dict[str, int] = {}
        self.uses: list[Use] = []
        self.problems: dict[str, list[str]] = {}
        self.first_ops: list[FirstOp] = []
        self.layers: dict[str, LayerOp] = {}
        self.parent: dict[str, str] = {}
        self.unnamed = 0
        # (kernel leaf, input axis) -> the layouts it contracts: segments, or None for
        # values whose channels are not traced (the image); more than one is a weight
        # shared between different inputs (e.g. conv(conv(x)) with one module).
        self.reads: dict[tuple[str, int], dict[Segments | None, None]] = {}

    def find(self, source: str) -> str:
        while self.parent.get(source, source) != source:
            source = self.parent[source]
        return source

    def problem(self, sources: Sequence[str | None], reason: str) -> None:
        # The longest tail of the name stack that is a module path: linen stacks start
        # with the root's class name (and 'Rebuilt/module' for a wrapped module).
        for i in range(len(self.where)):
            module = "/".join(self.where[i:])
            if module in self.modules:
                reason = f"{reason} (in {self.modules[module]} {module!r})"
                break
        for s in sources:
            if s is not None and reason not in self.problems.setdefault(s, []):
                self.problems[s].append(reason)

    def taint(self, values: Sequence[Value], reason: str) -> None:
        for v in values:
            if v.channels is not None:
                self.problem([s.source for s in v.channels.segments], reason)

    def tie(self, a: Channels, b: Channels, primitive: str) -> None:
        """Records that channels at equal positions of `a` and `b` are combined."""
        if a.segments == b.segments:
            return
        if segments_length(a.segments) != segments_length(b.segments):
            sources = [s.source for s in a.segments + b.segments]
            self.problem(sources, f"{primitive} broadcasts channels against other channels")
            return
        for sa, sb in align_segments(a.segments, b.segments):
            if sa.source == sb.source and sa.start == sb.start:
                continue
            if sa.source is None or sb.source is None or sa.start != sb.start:
                self.problem(
                    [sa.source, sb.source],
                    f"{primitive} combines channels {sa.start}.. of {sa.source} with channels "
                    f"{sb.start}.. of {sb.source} (only whole convs of equal width, channel i "
                    "with channel i, can form a residual group)",
                )
            elif self.sources[sa.source] != self.sources[sb.source]:
                self.problem(
                    [sa.source, sb.source],
                    f"{primitive} adds convs of different widths {sa.source} and {sb.source}",
                )
            else:
                ra, rb = self.find(sa.source), self.find(sb.source)
                if ra != rb:
                    self.parent[rb] = ra

    def read(self, leaf: str, axis: int, segments: Segments | None, layer: str) -> None:
        """Records that `layer` contracts `leaf` axis `axis` with `segments` (None: values
        whose channels are not traced); a second, different layout refuses every conv
        read."""
        seen = self.reads.setdefault((leaf, axis), {})
        seen.setdefault(segments, None)
        if len(seen) < 2:
            return
        sources = sorted({s.source for segs in seen if segs for s in segs if s.source})
        inputs = "; ".join(_describe(segs) for segs in seen)
        self.problem(
            sources,
            f"module {layer!r} applies its kernel {leaf} to {len(seen)} different inputs "
            f"({inputs}): weights shared in sequence (e.g. conv(conv(x)) with one module) "
            "read channels of different layers on one input axis",
        )

    def first_op(self, channels: Channels, primitive: str, operand: int, other=None) -> None:
        kernel = other.kernel() if other is not None else None
        for source in sorted(channels.pristine):
            leaf, axis = (None, None)
            if kernel is not None and kernel[1][channels.axis] is not None:
                leaf, axis = kernel[0], kernel[1][channels.axis]
            self.first_ops.append(
                FirstOp(source, primitive, operand, leaf, axis, channels.segments)
            )

    def layer(
        self, path: str | None, kind: str, kernel, in_axis, out_axis, flops: int, groups: int = 1
    ) -> str:
        if path is None:
            self.unnamed += 1
            path = f"<{kind} #{self.unnamed}>"
        if path in self.layers:
            self.layers[path].flops += flops
        else:
            self.layers[path] = LayerOp(path, kind, kernel, in_axis, out_axis, flops, groups)
        return path


def _describe(segments: Segments | None) -> str:
    if segments is None:
        return "values whose channels are not traced, e.g. the image"
    names = list(dict.fromkeys(s.source or "no conv" for s in segments))
    return "channels of " + ", ".join(names)


def module_of(leaf: str) -> str:
    """'params/block1/layer1/conv/kernel' -> 'block1/layer1/conv'."""
    return "/".join(leaf.split("/")[1:-1])


def unknown(name: str, ins: list[Value], shapes, rec: Recorder) -> list[Value]:
    if name in ("scan", "while", "cond"):
        reason = f"control flow {name!r} (nn.scan, lax.scan, a loop or lax.cond) is not followed"
    else:
        reason = (
            f"primitive {name!r} reads its channels and is not supported (teach the tracer "
            "with graycnn.graph.register_rule)"
        )
    rec.taint(ins, reason)
    return [derived(shape, ins) for shape in shapes]


def derived(shape, ins: Sequence[Value]) -> Value:
    """A value computed from `ins` by an op that is not followed."""
    if any(v.data for v in ins):
        return Value(shape, data=True)
    return Value(shape, opaque=any(v.leaves or v.opaque for v in ins))


def segments_length(segments: Segments) -> int:
    return sum(s.length for s in segments)


def cut_segments(segments: Segments, start: int, stop: int) -> Segments:
    """The segments covering positions start..stop."""
    out, pos = [], 0
    for s in segments:
        lo, hi = max(start, pos), min(stop, pos + s.length)
        if lo < hi:
            out.append(Segment(s.source, s.start + lo - pos, hi - lo))
        pos += s.length
    return tuple(out)


def align_segments(a: Segments, b: Segments) -> list[tuple[Segment, Segment]]:
    """Pairs of equally long pieces of `a` and `b` at the same positions."""
    cuts = sorted(
        set(np.cumsum([0] + [s.length for s in a])) | set(np.cumsum([0] + [s.length for s in b]))
    )
    pairs = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        (pa,), (pb,) = cut_segments(a, lo, hi), cut_segments(b, lo, hi)
        pairs.append((pa, pb))
    return pairs


def like_leaf(original: Any, array: np.ndarray) -> Any:
    """`array` with the dtype, and the array type (numpy or jax), of `original`."""
    array = array.astype(
        np.asarray(original).dtype if not hasattr(original, "dtype") else original.dtype
    )
    return jax.numpy.asarray(array) if isinstance(original, jax.Array) else array
