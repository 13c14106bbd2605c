"""report.json, typed: the compress report's rows, each with its results per split and
its paired comparisons stated, as frozen dataclasses with `to_json` / `from_json`.

The JSON keeps the layout of the reports written before it had a version (which
`from_json` reads too): a row's validation results and its comparison with the bar sit
flat in the row, its held-out ones under 'eval', the bar is flagged 'baseline'. Version
1 adds `schema_version` and names the row each comparison is against ('against'); in a
report without them, that is the bar of the row's budget (or the refit of its budget).

Example:
    >>> report = Report.from_json(json.load(open("runs/compress/report.json")), "report.json")
    >>> row = report.row("merged_1+2")
    >>> row.validation.vs_bar.against, row.validation.vs_bar.ci95
    ('gray_bn', (-1.2, 0.4))
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from graycnn.study.speed import RowSpeed

SCHEMA_VERSION = 1
VERDICTS = ("above", "below", "tied")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Comparison:
    """One row against another on the same images and seeds (`stats.compare`).

    Attributes:
        against: Key of the row compared with: the bar of the row's budget, or the
            unmerged model given the same refit.
        delta: Mean accuracy difference, in points.
        ci95: (lo, hi) paired bootstrap 95% interval, in points.
        p_value: Exact McNemar.
        verdict: 'above' (lo > 0), 'below' (hi < 0) or 'tied'.
    """

    against: str
    delta: float
    ci95: tuple[float, float]
    p_value: float
    verdict: str

    @classmethod
    def of(cls, against: str, compared: Mapping[str, Any]) -> "Comparison":
        """From `stats.compare`'s dict."""
        lo, hi = compared["ci95"]
        return cls(against=against, delta=compared["delta"], ci95=(lo, hi),
                   p_value=compared["p_value"], verdict=compared["verdict"])  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"against": self.against, "delta": self.delta, "ci95": list(self.ci95),
                "p_value": self.p_value, "verdict": self.verdict}  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitResult:
    """A row's results on one split's images.

    Attributes:
        dataset: The held-out dataset's name; None for validation.
        examples: Images evaluated.
        accuracies: Per seed, in 0..1 (a deterministic row evaluated once repeats its
            one accuracy for every seed).
        accuracy: Their mean.
        accuracy_sd: Their standard deviation (ddof 1); None for one seed.
        vs_bar: Against the bar of the row's budget; None for the color rows.
        vs_refit: A merge given the color refit against the refit alone, else None.
        vs_controls: A merge against each control of its budget at its widths.
    """

    dataset: str | None = None
    examples: int
    accuracy: float
    accuracies: tuple[float, ...]
    accuracy_sd: float | None = None
    vs_bar: Comparison | None = None
    vs_refit: Comparison | None = None
    vs_controls: tuple[Comparison, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.dataset is None else {"dataset": self.dataset}
        out |= {"examples": self.examples, "accuracy": self.accuracy,
                "accuracies": list(self.accuracies)}  # fmt: skip
        if self.accuracy_sd is not None:
            out["accuracy_sd"] = self.accuracy_sd
        if self.vs_bar is not None:
            out |= self.vs_bar.to_json()
        if self.vs_refit is not None:
            out["vs_refit"] = self.vs_refit.to_json()
        if self.vs_controls:
            out["vs_controls"] = [c.to_json() for c in self.vs_controls]
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One model of the report.

    Attributes:
        key: Unique within the report (e.g. 'merged_1+2', 'gray_bn').
        name: What it is, in words (report.md's first column).
        image_type: The view it is evaluated on: 'color', 'gray3' or 'gray'.
        clusters: {layer: clusters} of its merged layers; empty for an unmerged model.
        bn: Its BN re-estimation ('none' without one, '-' for the color rows).
        control: None for a merge, 'random', 'prune_l1' or 'scratch' for a control,
            'refit' for the unmerged model given the merge's color refit.
        budget: Its recovery: None, 'bn' or 'finetune'.
        finetune_epochs: Of the 'finetune' budget; 0 otherwise.
        is_bar: Whether it is the bar of its budget (the unmerged gray model).
        params: Parameters, BatchNorm statistics included.
        flops: FLOPs of one image.
        checkpoints: Its models relative to the workdir, one per seed (one for a
            deterministic row).
        validation: Its results on the validation images.
        held_out: On the held-out images; None without --eval_dataset.
        speed: Its measured inference speed; None without --speed_rounds.
    """

    key: str
    name: str
    image_type: str
    clusters: Mapping[int, int]
    bn: str
    control: str | None
    budget: str | None
    finetune_epochs: int = 0
    is_bar: bool = False
    params: int
    flops: int
    checkpoints: tuple[str, ...]
    validation: SplitResult
    held_out: SplitResult | None = None
    speed: RowSpeed | None = None

    @property
    def checkpoint(self) -> str:
        """The first seed's model."""
        return self.checkpoints[0]

    @property
    def role(self) -> str | None:
        """'bar', 'merged' (a merge, recovered or not), its control ('random', 'prune_l1',
        'scratch', 'refit'), or None (the color and fold rows)."""
        if self.is_bar:
            return "bar"
        if self.control:
            return self.control
        return "merged" if self.clusters else None

    @property
    def merged(self) -> bool:
        """A merge, recovered by a budget: a row with a verdict."""
        return self.role == "merged" and self.budget is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "key": self.key,
            "image_type": self.image_type,
            "clusters": {str(k): v for k, v in self.clusters.items()},
            "bn": self.bn,
            "control": self.control,
            "budget": self.budget,
        }
        if self.budget == "finetune":
            out["finetune_epochs"] = self.finetune_epochs
        if self.is_bar:
            out["baseline"] = True
        out |= {"params": self.params, "flops": self.flops, "checkpoint": self.checkpoint,
                "checkpoints": list(self.checkpoints)}  # fmt: skip
        out |= self.validation.to_json()
        if self.held_out is not None:
            out["eval"] = self.held_out.to_json()
        if self.speed is not None:
            out["speed"] = self.speed.to_json()
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Compensation:
    """One consumer's reconstruction error (1 - R^2) before and after a refit."""

    layer: int
    chain: str  # 'merged', or the control refit alongside
    seed: int
    consumer: str
    images: int
    error_before: float
    error_after: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
    """What one compress run found.

    Attributes:
        rows: In the report's order; the first is the color model on color images.
        compensation: Every refit consumer's errors (empty without --compensate).
        config: The run's settings as JSON (CompressConfig's fields, plus
            'color_checkpoint', 'steps', 'budget_search' and 'workdir').
    """

    rows: tuple[Row, ...]
    compensation: tuple[Compensation, ...] = ()
    config: Mapping[str, Any]

    @property
    def color(self) -> Row:
        return self.rows[0]

    def row(self, key: str) -> Row:
        """The row of `key`.

        Raises:
            KeyError: no such row, listing the report's keys.
        """
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"no row {key!r}; its rows: {', '.join(sorted(r.key for r in self.rows))}")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "rows": [r.to_json() for r in self.rows],
            "compensation": [c.to_json() for c in self.compensation],
            "config": dict(self.config),
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "report.json") -> "Report":
        """Reads report.json's content, of this version or written before versions.

        Args:
            data: The parsed JSON.
            source: Named by every error (the file's path).

        Raises:
            ValueError: one line naming `source` and the field: not a compress report,
                a field missing or of the wrong kind, or a version newer than this one.
        """
        at = _At(source, "")
        if not isinstance(data, dict):
            raise ValueError(f"{source}: not a compress report (no config.dataset)")
        version = data.get("schema_version", 1)
        if not _is_int(version) or version < 1:
            raise at.error("schema_version", version, "a version number")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{source}: schema_version {version} is newer than this graycnn reads "
                f"({SCHEMA_VERSION}); read it with the graycnn that wrote it"
            )
        config = data.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("dataset"), str):
            raise ValueError(f"{source}: not a compress report (no config.dataset)")
        raw_rows = data.get("rows", [])
        if not isinstance(raw_rows, list):
            raise ValueError(f"{source}: not a compress report ('rows' is not a list)")
        rows = [_At(source, f"rows[{i}]").row(r) for i, r in enumerate(raw_rows)]
        rows = [_with_against(r, rows) for r in rows]
        entries = at.take(data, "compensation", list, "a list", [])
        compensation = [_At(source, f"compensation[{i}]").compensation(c)
                        for i, c in enumerate(entries)]  # fmt: skip
        return cls(rows=tuple(rows), compensation=tuple(compensation), config=config)


def _with_against(row: Row, rows: list[Row]) -> Row:
    """`row` with each comparison naming its row, where the report (written before
    versions) did not: the bar of its budget, the refit of its budget."""

    def named(c: Comparison | None, key: str | None) -> Comparison | None:
        return dataclasses.replace(c, against=key) if c and not c.against and key else c

    budget = row.budget or "bn"  # a row before any recovery: the 'bn' budget's bar
    bar = next((r.key for r in rows if r.is_bar and r.budget == budget), None)
    refit = next((r.key for r in rows if r.control == "refit" and r.budget == row.budget), None)
    splits = {}
    for name in ("validation", "held_out"):
        split = getattr(row, name)
        if split is not None:
            splits[name] = dataclasses.replace(
                split, vs_bar=named(split.vs_bar, bar), vs_refit=named(split.vs_refit, refit)
            )
    return dataclasses.replace(row, **splits)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _At:
    """Where in report.json a value is read, for errors naming the file and the field."""

    source: str
    where: str

    def error(self, field: str, value: Any, kind: str) -> ValueError:
        path = ".".join(p for p in (self.where, field) if p)
        shown = "missing" if value is _MISSING else f"{_short(value)}"
        return ValueError(f"{self.source}: {path} is {shown}, not {kind}")

    def take(self, data: dict, field: str, check: Any, kind: str, default: Any = _MISSING):
        """data[field], checked by `check` (a type, or a predicate on the value)."""
        value = data.get(field, _MISSING)
        if value is _MISSING and default is not _MISSING:
            return default
        ok = isinstance(value, check) if isinstance(check, type) else check(value)
        if value is _MISSING or not ok:
            raise self.error(field, value, kind)
        return value

    def row(self, raw: Any) -> Row:
        if not isinstance(raw, dict):
            raise self.error("", raw, "a row (an object)")
        at = _At(self.source, f"{self.where} ({raw['key']!r})") if isinstance(
            raw.get("key"), str) else self  # fmt: skip
        text = (str, "a string")
        optional = (lambda v: v is None or isinstance(v, str), "a string or null")
        clusters = at.take(raw, "clusters", dict, "an object")
        if not all(k.isdigit() and _is_int(v) for k, v in clusters.items()):
            raise at.error("clusters", clusters, "{layer: clusters} of integers")
        # Reports of one seed once lacked the per-seed lists.
        checkpoints = raw.get("checkpoints") or [raw.get("checkpoint")]
        if not isinstance(checkpoints, list) or not all(isinstance(p, str) and p
                                                        for p in checkpoints):  # fmt: skip
            raise at.error("checkpoints", checkpoints, "a list of paths")
        budget = at.take(raw, "budget", *optional)
        held = raw.get("eval")
        return Row(
            key=at.take(raw, "key", *text),
            name=at.take(raw, "name", *text),
            image_type=at.take(raw, "image_type", *text),
            clusters={int(k): v for k, v in clusters.items()},
            bn=at.take(raw, "bn", *text),
            control=at.take(raw, "control", *optional),
            budget=budget,
            finetune_epochs=at.take(raw, "finetune_epochs", _is_int, "an integer", 0),
            is_bar=at.take(raw, "baseline", bool, "true or false", False),
            params=at.take(raw, "params", _is_int, "an integer"),
            flops=at.take(raw, "flops", _is_int, "an integer"),
            checkpoints=tuple(checkpoints),
            validation=at.split(raw),
            held_out=None if held is None else _At(at.source, f"{at.where}.eval").split(held),
            speed=at.speed(raw["speed"]) if "speed" in raw else None,
        )

    def speed(self, raw: Any) -> RowSpeed:
        try:
            return RowSpeed.from_json(raw)
        except ValueError as e:
            raise self.error("speed", raw, str(e)) from None

    def split(self, raw: Any) -> SplitResult:
        if not isinstance(raw, dict):
            raise self.error("", raw, "an object")
        accuracy = self.take(raw, "accuracy", _is_fraction, "a number in 0..1")
        accuracies = raw.get("accuracies") or [accuracy]
        if not isinstance(accuracies, list) or not all(map(_is_fraction, accuracies)):
            raise self.error("accuracies", accuracies, "a list of numbers in 0..1")
        refit = raw.get("vs_refit")
        at_refit = _At(self.source, f"{self.where}.vs_refit")
        controls = self.take(raw, "vs_controls", list, "a list", [])
        return SplitResult(
            dataset=self.take(raw, "dataset", str, "a string", None),
            examples=self.take(raw, "examples", _is_int, "an integer"),
            accuracy=accuracy,
            accuracies=tuple(accuracies),
            accuracy_sd=self.take(raw, "accuracy_sd", _is_number, "a number", None),
            vs_bar=self.comparison(raw) if "delta" in raw else None,
            vs_refit=None if refit is None else at_refit.comparison(refit),
            vs_controls=tuple(
                _At(self.source, f"{self.where}.vs_controls[{i}]").comparison(c)
                for i, c in enumerate(controls)
            ),  # fmt: skip
        )

    def comparison(self, raw: Any) -> Comparison:
        if not isinstance(raw, dict):
            raise self.error("", raw, "a comparison (an object)")
        ci95 = raw.get("ci95", _MISSING)
        if not isinstance(ci95, list) or len(ci95) != 2 or not all(map(_is_number, ci95)):
            raise self.error("ci95", ci95, "[lo, hi] numbers")
        return Comparison(
            against=self.take(raw, "against", str, "a string", ""),
            delta=self.take(raw, "delta", _is_number, "a number"),
            ci95=(ci95[0], ci95[1]),
            p_value=self.take(raw, "p_value", _is_fraction, "a number in 0..1"),
            verdict=self.take(raw, "verdict", lambda v: v in VERDICTS, " or ".join(VERDICTS)),
        )

    def compensation(self, raw: Any) -> Compensation:
        if not isinstance(raw, dict):
            raise self.error("", raw, "an object")
        number = (_is_number, "a number")
        return Compensation(
            layer=self.take(raw, "layer", _is_int, "an integer"),
            chain=self.take(raw, "chain", str, "a string"),
            seed=self.take(raw, "seed", _is_int, "an integer"),
            consumer=self.take(raw, "consumer", str, "a string"),
            images=self.take(raw, "images", _is_int, "an integer"),
            error_before=self.take(raw, "error_before", *number),
            error_after=self.take(raw, "error_after", *number),
        )


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
