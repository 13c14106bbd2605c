"""Measured speed of a report's rows: every row's model timed in the same interleaved
rounds (`graycnn.deploy.measure_speed`), with its speed-up over the bar of its budget.

Example:
    >>> speeds = measure_rows({"gray_bn": gray, "merged_1+2": merged},
    ...                       {"merged_1+2": "gray_bn"}, batch_sizes=(1, 128), rounds=5)
    >>> speeds["merged_1+2"].speedup[128]
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from graycnn.deploy import measure_speed


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowSpeed:
    """A row's measured inference speed, on one device of the run's machine.

    Attributes:
        images_per_second: batch size -> median over interleaved rounds.
        against: The row its speed-up is over (the bar of its budget), or None.
        speedup: batch size -> median over rounds of the bar's time / this row's; None
            without `against`.
    """

    images_per_second: Mapping[int, float]
    against: str | None = None
    speedup: Mapping[int, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images_per_second": {str(b): v for b, v in self.images_per_second.items()}
        }
        if self.against is not None and self.speedup is not None:
            out |= {
                "against": self.against,
                "speedup": {str(b): v for b, v in self.speedup.items()},
            }
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "RowSpeed":
        """Raises ValueError (its message: what was expected) on a malformed entry."""

        def per_batch(value: Any) -> dict[int, float]:
            if not isinstance(value, dict) or not all(
                k.isdigit() and isinstance(v, int | float) and v > 0 for k, v in value.items()
            ):
                raise ValueError("{batch size: positive number}")
            return {int(k): float(v) for k, v in value.items()}

        if not isinstance(raw, dict) or not isinstance(raw.get("against", ""), str):
            raise ValueError("an object with images_per_second and an optional against")
        speedup = raw.get("speedup")
        return cls(
            images_per_second=per_batch(raw.get("images_per_second")),
            against=raw.get("against"),
            speedup=None if speedup is None else per_batch(speedup),
        )


def bars_of(rows: Sequence[Any]) -> dict[str, str | None]:
    """row key -> the key of the row its speed-up is over (its comparison's), or None."""
    return {r.key: r.validation.vs_bar.against if r.validation.vs_bar else None for r in rows}


def measure_rows(
    models: Mapping[str, Any],
    bars: Mapping[str, str | None],
    batch_sizes: Sequence[int],
    rounds: int,
) -> dict[str, RowSpeed]:
    """Times every row's model in the same rounds; rows sharing a model are timed once.

    Args:
        models: row key -> its model (the first seed's `stages.Model`: `.config`,
            `.variables`).
        bars: row key -> the key its speed-up is over, or None.
        batch_sizes, rounds: As `measure_speed`.
    """
    first: dict[int, str] = {}  # one timing per distinct model
    for key, model in models.items():
        first.setdefault(id(model), key)
    distinct = {key: (models[key].config, models[key].variables) for key in first.values()}
    total = len(distinct) * len(batch_sizes)
    with tqdm(total=total, desc="speed: timing each row", leave=False) as progress:
        timed = measure_speed(
            distinct,
            batch_sizes,
            rounds,
            progress=lambda done, _: progress.update(done - progress.n),
        )
    out = {}
    for key, model in models.items():
        mine = timed[first[id(model)]]
        against = bars.get(key)
        bar_key = first[id(models[against])] if against is not None and against in models else None
        speedup = None
        if bar_key is not None:
            speedup = (
                dict.fromkeys(batch_sizes, 1.0)
                if bar_key == first[id(model)]
                else {b: mine.speedup_over(bar_key, b) for b in batch_sizes}
            )
        out[key] = RowSpeed(
            images_per_second=dict(mine.images_per_second),
            against=against if speedup is not None else None,
            speedup=speedup,
        )
    return out


def device_name() -> str:
    """The device the rows are timed on, as a report states it."""
    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"
