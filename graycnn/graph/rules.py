"""Abstract interpretation of a jaxpr that follows conv output channels (internal).

Every jaxpr variable gets a `Value`: its shape, and either the channels it carries (a
list of `Segment`s along one axis: "positions p..p+n hold channels s..s+n of conv X"),
or, for a value computed from variables only, which variable leaves it was computed
from and which leaf axis each of its axes indexes. When a variable-derived value meets
a channel-carrying value in an elementwise op, the leaf axis aligned with the channel
axis is indexed by those channels (a BatchNorm mean, a conv bias); when a conv or
dot_general contracts the channels against a kernel leaf, the kernel's input axis is.
An op this module does not understand marks the convs whose channels it touched as
unmergeable, with the primitive's name, rather than guessing; `register_rule` teaches
it one. A rule is `rule(eqn, ins, shapes, rec) -> [Value, ...]`: the jaxpr equation,
the Values of its operands, its output shapes and the `Recorder`.
"""

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from graycnn.graph.layout import (
    broadcast_in_dim,
    channelwise,
    cumulative,
    pad,
    reduce,
    reduce_window,
    reshape,
    rev,
    slice_,
    split,
    squeeze,
    transpose,
)
from graycnn.graph.values import (
    Channels,
    Recorder,
    Segment,
    Use,
    Value,
    derived,
    module_of,
    unknown,
)


def interpret(
    closed: jcore.ClosedJaxpr, inputs: Sequence[Value], rec: Recorder, scope: tuple[str, ...] = ()
) -> list[Value]:
    """Runs the abstract interpretation over `closed`; returns the output Values.

    `scope` is the name stack of the op whose body `closed` is (sub-jaxprs name their
    ops relative to it).
    """
    jaxpr = closed.jaxpr
    env: dict[jcore.Var, Value] = {}
    for var in jaxpr.constvars:
        env[var] = Value(tuple(var.aval.shape))
    for var, value in zip(jaxpr.invars, inputs, strict=True):
        env[var] = value

    def read(var) -> Value:
        if isinstance(var, jcore.Literal):
            return Value(tuple(np.shape(var.val)))
        return env[var]

    outer = rec.where
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        rec.where = scope + tuple(n for n in str(eqn.source_info.name_stack).split("/") if n)
        outs = _apply(eqn, ins, rec)
        for var, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jcore.DropVar):
                env[var] = value
    rec.where = outer
    return [read(v) for v in jaxpr.outvars]


def _apply(eqn, ins: list[Value], rec: Recorder) -> list[Value]:
    name = eqn.primitive.name
    shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.outvars]
    sub = None if name in _REGISTERED else _sub_jaxpr(eqn)
    if sub is not None:
        return interpret(sub, ins, rec, rec.where)
    rule = _RULES.get(name)
    if rule is None and name.startswith("reduce_window"):
        rule = reduce_window
    if rule is None:
        return unknown(name, ins, shapes, rec)
    return rule(eqn, ins, shapes, rec)


def _sub_jaxpr(eqn) -> jcore.ClosedJaxpr | None:
    # jit, custom_jvp_call, custom_vjp_call, remat, closed_call: the body runs once
    # with the eqn's operands; control flow (scan, while, cond) is not followed.
    if eqn.primitive.name in ("scan", "while", "cond"):
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.Jaxpr):
            sub = jcore.ClosedJaxpr(sub, [])
        if isinstance(sub, jcore.ClosedJaxpr) and len(sub.jaxpr.invars) == len(eqn.invars):
            return sub
    return None


_LAYOUT = {"convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient"}
_ELEMENTWISE = _LAYOUT | set(
    "neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan "
    "asin acos atan sinh cosh asinh acosh atanh abs sqrt rsqrt cbrt integer_pow square erf "
    "erfc erf_inv lgamma digamma not imag real conj add sub mul div rem pow max min atan2 "
    "nextafter and or xor eq ne lt le gt ge add_any select_n clamp".split()
)


def _elementwise(eqn, ins, shapes, rec) -> list[Value]:
    name = eqn.primitive.name
    (shape,) = shapes
    carrying = [(i, v) for i, v in enumerate(ins) if v.channels is not None]
    if not carrying:
        if any(v.data for v in ins):
            return [Value(shape, data=True)]
        leaves: dict[str, tuple[int | None, ...]] = {}
        for v in ins:
            if len(v.shape) != len(shape):
                continue
            for leaf, amap in v.leaves.items():
                leaves.setdefault(
                    leaf,
                    tuple(
                        a if n == m else None for a, n, m in zip(amap, v.shape, shape, strict=True)
                    ),
                )
        exact = name in _LAYOUT and len(ins) == 1 and ins[0].exact
        return [Value(shape, leaves=leaves, exact=exact, opaque=any(v.opaque for v in ins))]
    first = carrying[0][1]
    axis = first.channels.axis
    if any(v.channels.axis != axis for _, v in carrying):
        rec.taint(ins, f"{name} combines channels on different axes")
        return [Value(shape, data=True)]
    for _, v in carrying[1:]:
        rec.tie(first.channels, v.channels, name)
    width = shape[axis]
    for v in ins:
        if v.channels is not None or len(v.shape) != len(shape) or v.shape[axis] != width:
            continue
        if v.data and width > 1:
            rec.taint(
                [first],
                f"{name} combines the channels with a per-channel tensor computed from the "
                "input (e.g. attention or squeeze-excite gating)",
            )
        elif (v.opaque or not v.leaves) and width > 1:
            rec.taint(
                [first],
                f"{name} combines the channels with a per-channel constant or a per-channel "
                "tensor computed by an op that is not followed",
            )
        else:
            for leaf, amap in v.leaves.items():
                if amap[axis] is not None:
                    rec.uses.append(
                        Use(leaf, amap[axis], first.channels.segments, "elementwise", name)
                    )
    pristine = first.channels.pristine
    if name not in _LAYOUT:
        others = [v for v in ins if v.channels is None and v.shape]
        other = others[0] if len(carrying) == 1 and len(others) == 1 else None
        for i, v in carrying:
            rec.first_op(v.channels, name, i, other)
        pristine = frozenset()
    return [
        Value(shape, channels=dataclasses.replace(first.channels, pristine=pristine), data=True)
    ]


def _conv(eqn, ins, shapes, rec) -> list[Value]:
    lhs, rhs = ins
    (shape,) = shapes
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    kernel = rhs.kernel()
    in_size = rhs.shape[rhs_spec[1]] * math.prod(rhs.shape[d] for d in rhs_spec[2:])
    flops = 2 * math.prod(shape) * in_size
    # amap: leaf axis -> kernel axis; used only where kernel is not None.
    leaf: Any
    amap: Any
    leaf, amap = kernel if kernel is not None else (None, None)
    groups = eqn.params["feature_group_count"]
    path = rec.layer(
        module_of(leaf) if leaf else None,
        "conv",
        leaf,
        amap[rhs_spec[1]] if amap else None,
        amap[rhs_spec[0]] if amap else None,
        flops,
        groups,
    )
    rec.taint([rhs], "the channels are used as a conv kernel")
    if kernel is not None and lhs.data and amap[rhs_spec[1]] is not None:
        on_axis = lhs.channels is not None and lhs.channels.axis == lhs_spec[1]
        rec.read(leaf, amap[rhs_spec[1]], lhs.channels.segments if on_axis else None, path)
    if lhs.channels is not None:
        grouped = eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1
        if lhs.channels.axis != lhs_spec[1]:
            rec.taint([lhs], "a conv slides over the channel axis")
        elif grouped:
            rec.taint([lhs], "a grouped or depthwise conv reads the channels")
        elif kernel is None:
            rec.taint([lhs], f"the kernel of conv {path} is not a plain variable leaf")
        else:
            rec.uses.append(Use(leaf, amap[rhs_spec[1]], lhs.channels.segments, "contract", "conv"))
        if lhs.channels.pristine:
            rec.first_op(lhs.channels, eqn.primitive.name, 0)
    if kernel is None or not lhs.data:
        return [derived(shape, ins)]
    width = shape[out_spec[1]]
    if rec.sources.setdefault(path, width) != width:
        rec.problem([path], f"conv {path} is applied with different widths")
    if eqn.params["batch_group_count"] != 1:
        rec.problem([path], f"conv {path} has batch_group_count > 1")
    segments = (Segment(path, 0, width),)
    rec.uses.append(Use(leaf, amap[rhs_spec[0]], segments, "produce", "conv"))
    channels = Channels(out_spec[1], segments, frozenset({path}))
    return [Value(shape, channels=channels, data=True)]


def _dot_general(eqn, ins, shapes, rec) -> list[Value]:
    lhs, rhs = ins
    (shape,) = shapes
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    flops = 2 * math.prod(shape) * math.prod(lhs.shape[d] for d in lc)
    kernel_side = [v.kernel() for v in (lhs, rhs)]
    kernel = kernel_side[1] or kernel_side[0]
    if kernel is not None and (lhs.data or rhs.data):
        layer = rec.layer(module_of(kernel[0]), "dense", kernel[0], None, None, flops)
        for x, other, xc, oc in ((lhs, kernel_side[1], lc, rc), (rhs, kernel_side[0], rc, lc)):
            if not x.data or other is None:
                continue
            leaf, amap = other
            for dx, do in zip(xc, oc, strict=True):
                if amap[do] is not None:
                    on_axis = x.channels is not None and x.channels.axis == dx
                    rec.read(leaf, amap[do], x.channels.segments if on_axis else None, layer)
    out_channels = None
    lhs_free = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
    rhs_free = [d for d in range(len(rhs.shape)) if d not in rc and d not in rb]
    sides = ((lhs, rhs, lc, rc, lb, 0, lhs_free), (rhs, lhs, rc, lc, rb, 1, rhs_free))
    for x, other, xc, oc, xb, side, free in sides:
        if x.channels is None:
            continue
        a = x.channels.axis
        if x.channels.pristine:
            rec.first_op(x.channels, "dot_general", side)
        if a in xc:
            other_kernel = other.kernel()
            if other_kernel is None:
                rec.taint([x], "dot_general contracts the channels with a non-variable tensor")
            else:
                leaf, amap = other_kernel
                axis = amap[oc[list(xc).index(a)]]
                rec.uses.append(Use(leaf, axis, x.channels.segments, "contract", "dot_general"))
        elif a in xb:
            rec.taint([x], "dot_general uses the channel axis as a batch axis")
        else:
            offset = len(lb) + (len(lhs_free) if side == 1 else 0)
            out_channels = Channels(offset + free.index(a), x.channels.segments)
    if out_channels is not None:
        return [Value(shape, channels=out_channels, data=True)]
    return [derived(shape, ins)]


def _concatenate(eqn, ins, shapes, rec):
    dim = eqn.params["dimension"]
    (shape,) = shapes
    carrying = [v for v in ins if v.channels is not None]
    if not carrying:
        return [derived(shape, ins)]
    if all(v.channels.axis == dim for v in carrying):
        segments: list[Segment] = []
        for v in ins:
            segments += v.channels.segments if v.channels else [Segment(None, 0, v.shape[dim])]
        pristine = frozenset().union(*(v.channels.pristine for v in carrying))
        return [Value(shape, channels=Channels(dim, tuple(segments), pristine), data=True)]
    if len(carrying) == len(ins) and all(v.channels.axis != dim for v in carrying):
        for v in carrying[1:]:
            rec.tie(carrying[0].channels, v.channels, "concatenate")
        return [Value(shape, channels=carrying[0].channels, data=True)]
    rec.taint(ins, "concatenate mixes channels with other values along a non-channel axis")
    return [Value(shape, data=True)]


_RULES: dict[str, Callable] = {name: _elementwise for name in _ELEMENTWISE}
_RULES.update(
    conv_general_dilated=_conv,
    dot_general=_dot_general,
    reshape=reshape,
    broadcast_in_dim=broadcast_in_dim,
    transpose=transpose,
    squeeze=squeeze,
    concatenate=_concatenate,
    slice=slice_,
    split=split,
    pad=pad,
    rev=rev,
    **{k: reduce for k in "reduce_sum reduce_max reduce_min reduce_prod argmax argmin".split()},
    **{k: cumulative for k in "cumsum cumprod cummax cummin cumlogsumexp".split()},
)
_BUILTIN = dict(_RULES)
_REGISTERED: set[str] = set()
# Called after the table changes (trace.py clears its cache of traced graphs).
ON_CHANGE: list[Callable[[], None]] = []

RULE_KINDS: dict[str, Callable] = {"elementwise": _elementwise, "channelwise": channelwise}

# Registered module classes -> rule. While tracing, a call of such a module is framed by
# ENTER (its first argument, channels hidden from the ops inside) and EXIT (its output
# and that argument, given the module's rule), so the module acts as one op.
MODULES: dict[type, Callable] = {}
ENTER = jcore.Primitive("graycnn_module_enter")
ENTER.def_abstract_eval(lambda x: x)
EXIT = jcore.Primitive("graycnn_module_exit")
EXIT.def_abstract_eval(lambda out, x, **params: out)


def module_rule(module: object) -> Callable | None:
    """The rule registered for `module`'s class (or a base class), else None."""
    for cls in type(module).__mro__:
        if cls in MODULES:
            return MODULES[cls]
    return None


def _enter(eqn, ins, shapes, rec):
    (shape,) = shapes
    return [Value(shape, data=True) if ins[0].data else derived(shape, ins)]


def _exit(eqn, ins, shapes, rec):
    return eqn.params["rule"](eqn, ins[1:], shapes, rec)


_RULES.update(graycnn_module_enter=_enter, graycnn_module_exit=_exit)
_BUILTIN.update(graycnn_module_enter=_enter, graycnn_module_exit=_exit)


def register_rule(primitive: str | jcore.Primitive | type, rule: str | Callable | None) -> None:
    """Teaches the tracer an op or a module it does not follow (as Torch-Pruning's
    `register_customized_layer`), by adding it to the per-primitive rule table.

    Args:
        primitive: A JAX primitive (e.g. a custom `jax.extend.core.Primitive`, or one
            JAX has but the tracer refuses: 'pure_callback', 'pallas_call') or its name,
            as the refusal names it ("primitive 'my_op' reads its channels ..."). Or a
            Flax module class (linen or NNX, subclasses included): each call is one op
            from its first argument to its output (a single array), and nothing inside
            it is followed, so a per-channel variable of its own is refused by name.
        rule: 'elementwise': the op acts on each element independently, its operands
            broadcast as in `x * y` (an activation, a custom scaled add); per-channel
            variable operands are merged like a conv bias. 'channelwise': output channel
            c depends on channel c of its first operand only (a custom pooling, resize or
            per-channel filter; shapes may change on the other axes). Or a function
            `rule(eqn, ins, shapes, rec) -> [Value, ...]` over the interpreter's values
            (see this module's rules); None removes a registration, restoring the
            built-in rule if there was one.

    Raises:
        TypeError: `primitive` is not a primitive, a name or a module class, or `rule`
            not a function.
        ValueError: an unknown rule name.

    Example:
        >>> graph.register_rule(my_swish_p, "elementwise")  # my_swish_p.name == 'my_swish'
        >>> graph.register_rule(MyPooling, "channelwise")  # a module class
        >>> merge.merge_layer(model, variables, "conv1", labels, input_shape=shape)
    """
    module = isinstance(primitive, type) and issubclass(primitive, (nn.Module, nnx.Module))
    name: Any = primitive if isinstance(primitive, str) else getattr(primitive, "name", None)
    if not module and (not isinstance(name, str) or not name):
        raise TypeError(
            "primitive must be a JAX primitive, its name or a Flax module class, got "
            f"{type(primitive).__name__}"
        )
    rule = _rule_function(rule)
    if module:
        cls = typing.cast(type, primitive)
        if rule is None:
            MODULES.pop(cls, None)
        else:
            MODULES[cls] = rule
    elif rule is None:
        _REGISTERED.discard(name)
        if name in _BUILTIN:
            _RULES[name] = _BUILTIN[name]
        else:
            _RULES.pop(name, None)
    else:
        _REGISTERED.add(name)
        _RULES[name] = rule
    for hook in ON_CHANGE:
        hook()


def _rule_function(rule: str | Callable | None) -> Callable | None:
    """A rule name's function (RULE_KINDS), or the function or None as given."""
    if isinstance(rule, str):
        if rule not in RULE_KINDS:
            raise ValueError(
                f"rule must be one of {sorted(RULE_KINDS)}, a function (eqn, ins, shapes, rec) "
                f"-> outputs or None; got {rule!r}"
            )
        return RULE_KINDS[rule]
    if rule is not None and not callable(rule):
        raise TypeError(f"rule must be a rule name, a function or None, got {type(rule).__name__}")
    return rule
