"""One source for every setting: config dataclasses whose fields carry their own help.

A setting is declared once, as a dataclass field made by `setting` (default, help,
choices). The experiment scripts make their absl flags from those fields
(`define_flags`: same names, defaults and choices) and build the config back from the
parsed flags (`from_flags`), and the library checks a config made in Python the same
way (`check`), so the command line and `compress(CompressConfig())` run the same thing.

Per-layer settings are `PerLayer` values, written on the command line as
`VALUE,LAYER:VALUE,...`: a value without a layer applies to every layer; a value that
names only some layers keeps the setting's default for the others.

Example:
    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     fold: str = setting("sum", "RGB-to-gray fold.", choices=("sum", "mean"))
    ...     metric: PerLayer = setting(PerLayer(), "Distance per layer.")
    >>> define_flags(Config)          # --fold, --metric
    >>> config = from_flags(Config)   # after absl parsed argv
    >>> PerLayer.parse("mse,2:imed").of(2)
    'imed'
"""

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags


def setting(
    default: Any,
    help: str,  # noqa: A002 - absl's name for it
    *,
    choices: Sequence[Any] | None = None,
    item: Callable[[str], Any] = str,
    flag: bool = True,
) -> Any:
    """A dataclass field with its flag help and, if given, its allowed values.

    Args:
        default: The one default, used by the library and the command line alike.
        help: The flag's help text.
        choices: Allowed values (for a PerLayer, allowed per-layer values).
        item: For a PerLayer, the type of its values (e.g. int).
        flag: False for settings the library takes but no command line exposes.
    """
    return dataclasses.field(
        default=default,
        metadata={"help": help, "choices": choices, "item": item, "flag": flag},
    )


@dataclasses.dataclass(frozen=True)
class PerLayer:
    """A setting with a value per conv layer: a default and per-layer overrides.

    Attributes:
        default: The value of every layer not listed (None: the config's own rule).
        layers: ((layer number, value), ...), sorted by layer.
    """

    default: Any = None
    layers: tuple[tuple[int, Any], ...] = ()

    @classmethod
    def of_dict(cls, values: Mapping[int, Any], default: Any = None) -> "PerLayer":
        return cls(default, tuple(sorted((int(k), v) for k, v in values.items())))

    @classmethod
    def parse(cls, spec: str, cast: Callable[[str], Any] = str, flag: str = "") -> "PerLayer":
        """'a' -> every layer a; '1:a,2:b' -> layer 1 a, layer 2 b; 'a,2:b' -> both.

        Raises:
            ValueError: naming `--flag` and the entry at fault.
        """
        default, values = parse_layer_values(spec, flag, cast, key=_layer_number)
        return cls.of_dict(values, default)

    def over(self, base: "PerLayer") -> "PerLayer":
        """This value given over the setting's default `base`: with a value for every
        layer it is the whole setting (so is an empty one: no value for any layer); one
        that names only some layers keeps `base`'s value for the others.

        Example:
            >>> PerLayer.parse("2:mean").over(PerLayer("activation")).of(1)
            'activation'
        """
        if self.default is not None or not self.layers or not isinstance(base, PerLayer):
            return self
        return PerLayer.of_dict(dict(base.layers) | dict(self.layers), base.default)

    def only(self, layers: Iterable[int]) -> "PerLayer":
        """The same setting with the values of layers outside `layers` dropped (the
        default stays)."""
        keep = set(layers)
        return PerLayer(self.default, tuple((k, v) for k, v in self.layers if k in keep))

    def of(self, layer: int, fallback: Any = None) -> Any:
        """The value for `layer`: its own, else the default, else `fallback`."""
        value = dict(self.layers).get(layer, self.default)
        return fallback if value is None else value

    def layer_numbers(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.layers)

    def values(self) -> list[Any]:
        """Every value given, the default first."""
        return ([] if self.default is None else [self.default]) + [v for _, v in self.layers]

    def __str__(self) -> str:
        items = [] if self.default is None else [str(self.default)]
        return ",".join(items + [f"{k}:{v}" for k, v in self.layers])


def parse_layer_values(
    spec: str,
    flag: str,
    cast: Callable[[str], Any] = str,
    key: Callable[[str], Any] = int,
) -> tuple[Any, dict[Any, Any]]:
    """The one parser of `VALUE,LAYER:VALUE,...` strings.

    Args:
        spec: e.g. 'mse,2:imed' or 'stem:20,2:12'.
        flag: The flag's name, for errors.
        cast: Parses a value.
        key: Parses a layer (a number, or a path resolved by the caller's function).

    Returns:
        (the value without a layer or None, {key(layer): cast(value)}).

    Raises:
        ValueError: naming `--flag` and the entry at fault.
    """
    default, values = None, {}
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        layer, sep, value = item.rpartition(":")
        try:
            if not sep:
                if default is not None:
                    raise ValueError("gives two values without a layer")
                default = cast(value.strip())
                continue
            k = key(layer.strip())
            if k in values:
                raise ValueError(f"names layer {layer} twice")
            values[k] = cast(value.strip())
        except ValueError as e:
            raise ValueError(f"--{flag}: bad entry {item!r} ({e})") from None
    return default, values


def _layer_number(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError("layers are numbered from 1")
    return number


def define_flags(
    cls: type,
    *,
    only: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
    """Defines one absl flag per flag-enabled field of dataclass `cls`.

    Args:
        only: Define just these fields (e.g. the training settings a script uses).
        defaults: Script-level defaults that differ from the dataclass's (they are shown
            by --helpfull, and `from_flags` sees them as flag values).
    """
    defaults = dict(defaults or {})
    for field, kind in _fields(cls, only):
        default = defaults.get(field.name, field.default)
        help_ = field.metadata["help"]
        choices = field.metadata["choices"]
        if kind is bool:
            flags.DEFINE_bool(field.name, default, help_, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(field.name, default, help_, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(field.name, default, help_, flag_values=flag_values)
        elif kind is str and choices:
            flags.DEFINE_enum(field.name, default, list(choices), help_, flag_values=flag_values)
        elif kind in (tuple, list):
            flags.DEFINE_list(field.name, [str(x) for x in default], help_, flag_values=flag_values)
        else:  # str, str | None, PerLayer
            value = None if default is None else str(default)
            if choices and kind is PerLayer:
                help_ += f" Values: {', '.join(map(str, choices))}."
            flags.DEFINE_string(field.name, value, help_, flag_values=flag_values)


def from_flags(
    cls: type,
    *,
    only: Iterable[str] | None = None,
    flag_values: flags.FlagValues = flags.FLAGS,
    **values: Any,
) -> Any:
    """Builds `cls` from the flags `define_flags(cls, only=...)` made, plus `values`.

    Raises:
        ValueError: naming the flag at fault.
    """
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field, kind in _fields(cls, only):
        if field.name in values:
            continue
        raw = flag_values[field.name].value
        kwargs[field.name] = _parse(field, raw, kind, hints[field.name])
    return check(cls(**kwargs, **values))


def check(config: Any) -> Any:
    """Returns `config` after checking every field with choices; raises ValueError
    naming the flag, the value and the choices."""
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        if not choices:
            continue
        value = getattr(config, field.name)
        given = value.values() if isinstance(value, PerLayer) else [value]
        for v in given:
            if v not in choices:
                raise ValueError(
                    f"--{field.name}: unknown value {v!r}; choose from "
                    f"{', '.join(map(str, choices))}"
                )
    return config


def check_merged_layers(config: Any, names: Iterable[str], layers: Sequence[int]) -> None:
    """Raises ValueError naming the flag where PerLayer field `name` of `config` gives a
    layer not in `layers` a value of its own (not its default's): the user named a
    setting for a layer that is not merged."""
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(config)}
    for name in names:
        value = getattr(config, name)
        for layer in value.layer_numbers():
            if value.of(layer) != defaults[name].of(layer) and layer not in layers:
                raise ValueError(
                    f"--{name}: layer {layer} is not in --layers={','.join(map(str, layers))}"
                )


def coerce(config: Any) -> None:
    """Converts, in place (call from __post_init__), what Python callers write for a
    PerLayer field: {layer: value} or 'VALUE,LAYER:VALUE' (the layers not named keep the
    field's default) or one value for every layer; and a list for a tuple field."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kind = _kind(hints[field.name])
        if kind is PerLayer and not isinstance(value, PerLayer):
            if isinstance(value, Mapping):
                value = PerLayer.of_dict(value).over(typing.cast(PerLayer, field.default))
            elif isinstance(value, str):
                value = PerLayer.parse(value, field.metadata["item"], flag=field.name)
                value = value.over(typing.cast(PerLayer, field.default))
            else:
                value = PerLayer(value)
        elif kind is tuple and isinstance(value, list):
            value = tuple(value)
        object.__setattr__(config, field.name, value)


def to_json(config: Any) -> dict[str, Any]:
    """The config as JSON-ready values (PerLayer as its flag string)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, PerLayer):
            value = str(value)
        elif dataclasses.is_dataclass(value):
            value = to_json(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def field_names(cls: type) -> list[str]:
    """The names of the fields that are flags."""
    return [field.name for field, _ in _fields(cls, None)]


def _fields(cls: type, only: Iterable[str] | None) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    names = {f.name for f in dataclasses.fields(cls)}
    if wanted is not None and wanted - names:
        raise KeyError(f"{cls.__name__} has no fields {sorted(wanted - names)}")
    out = []
    for field in dataclasses.fields(cls):
        if not field.metadata.get("flag", False):
            continue
        if wanted is not None and field.name not in wanted:
            continue
        out.append((field, _kind(hints[field.name])))
    return out


def _kind(hint: Any) -> type:
    """The flag kind of a type hint: bool, int, float, str, tuple or PerLayer."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _kind(args[0])
    if origin in (tuple, list):
        return tuple
    return hint


def _parse(field: dataclasses.Field, raw: Any, kind: type, hint: Any) -> Any:
    name = field.name
    if raw is None or kind in (bool, int, float):
        return raw
    if kind is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis} or {str}
        try:
            return tuple(item(x.strip()) for x in raw if x.strip())
        except ValueError:
            raise ValueError(f"--{name}: expected {item.__name__} values, got {raw}") from None
    if kind is PerLayer:  # the layers the flag does not name keep their defaults
        default = typing.cast(PerLayer, field.default)
        return PerLayer.parse(raw, field.metadata["item"], flag=name).over(default)
    return raw


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
    why: str = "",
) -> Any:
    """The one check of every numeric option: `value` as an int (`integer`) or float.

    Args:
        name: What the message names: the argument, or the flag ('--steps').
        value: A real number; an integer-valued float passes as an integer.
        integer, low, high, positive: It must be an integer, >= low, <= high, > 0.
        why: Appended to the rule in the message, e.g. why `high` is where it is.

    Raises:
        ValueError: `name must be <rule>, got <value>`: a bool, a non-number, NaN, inf,
            a fraction for an integer, or a value out of range.
    """
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        bound = f" in {low}..{high}" if integer else f" in [{low:g}, {high:g}]"
    elif low is not None:
        bound = f" >= {low}"
    else:
        bound = " > 0" if positive else ""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    try:
        ok = ok and math.isfinite(value) and (not integer or int(value) == value)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        ok = ok and (not positive or value > 0)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        shown = value.item() if isinstance(value, np.generic) else value
        raise ValueError(f"{name} must be {kind}{bound}{why}, got {shown!r}")
    return int(value) if integer else float(value)
