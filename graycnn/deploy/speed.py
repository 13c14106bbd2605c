"""Measured inference speed: several models timed in interleaved rounds on one device.

A shared machine's speed drifts by 2-4x with the load, so models are never timed one
after another: each round times every model once, in a rotated order, and a model's
figure is its median over rounds. A speed-up is taken round by round (the ratio of two
models' times in the same round), then its median, so a drift between rounds cancels.

Example:
    >>> timed = measure_speed({"gray": (config, gray), "merged": (merged_config, merged)})
    >>> timed["merged"].images_per_second[128], timed["merged"].speedup_over("gray", 128)
"""

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graycnn.deploy.export import inference_function
from graycnn.models import ModelConfig

# Each timed call is repeated until one measurement takes about this long, so the
# clock's resolution and Python's overhead stay small against it.
MIN_MEASURE_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class Timed:
    """One model's measured speed.

    Attributes:
        seconds: batch size -> the seconds per call of each round, in round order.
        images_per_second: batch size -> median over rounds of batch / seconds per call.
        rounds_against: other model -> batch size -> per-round ratio (other's seconds /
            this model's seconds): above 1 means this model is faster.
    """

    seconds: Mapping[int, tuple[float, ...]]
    images_per_second: Mapping[int, float]
    rounds_against: Mapping[str, Mapping[int, tuple[float, ...]]]

    def speedup_over(self, other: str, batch_size: int) -> float:
        """Median over rounds of the other model's time / this one's, at `batch_size`."""
        return float(statistics.median(self.rounds_against[other][batch_size]))


def _forward(config: ModelConfig, variables: Mapping[str, Any], batch_size: int) -> Callable:
    fn = jax.jit(inference_function(config, variables))
    size, channels = config.image_size, config.in_channels
    images = jax.device_put(
        jnp.asarray(
            np.random.default_rng(0).uniform(0, 255, (batch_size, size, size, channels)),
            jnp.float32,
        )
    )
    return lambda: fn(images).block_until_ready()


def measure_speed(
    models: Mapping[str, tuple[ModelConfig, Mapping[str, Any]]],
    batch_sizes: Sequence[int] = (1, 128),
    rounds: int = 5,
    clock: Callable[[], float] = time.perf_counter,
    forward: Callable[[ModelConfig, Mapping[str, Any], int], Callable[[], Any]] = _forward,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Timed]:
    """Times each model's eval-mode forward (`inference_function`) at each batch size.

    Args:
        models: name -> (config, variables).
        batch_sizes: Batch sizes, each timed separately (on random 0-255 images).
        rounds: Interleaved rounds (>= 1); each times every model once.
        clock, forward: The timer and the callable made for a model and batch size;
            tests replace them.
        progress: Called as progress(models compiled, models in all) over every batch
            size (compiling is most of the time).

    Returns:
        name -> Timed, with `rounds_against` for every other name.
    """
    if rounds < 1 or not models or any(b < 1 for b in batch_sizes):
        raise ValueError(
            f"measure_speed needs models, rounds >= 1 and batch sizes >= 1; got "
            f"{len(models)} models, rounds={rounds}, batch_sizes={list(batch_sizes)}"
        )
    names = list(models)
    seconds: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batch_sizes} for n in names}
    total = len(batch_sizes) * len(names)
    for b, batch in enumerate(batch_sizes):
        calls = {n: forward(*models[n], batch) for n in names}
        repeats = {}
        for i, n in enumerate(names):  # compiles: most of the time
            repeats[n] = _calibrate(calls[n], clock)
            if progress:
                progress(b * len(names) + i + 1, total)
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                start = clock()
                for _ in range(repeats[n]):
                    calls[n]()
                seconds[n][batch].append((clock() - start) / repeats[n])
    return {n: _timed(n, seconds) for n in names}


def _timed(name: str, seconds: Mapping[str, Mapping[int, Sequence[float]]]) -> Timed:
    """`name`'s Timed from every model's seconds per call, batch size, round."""
    mine = seconds[name]
    return Timed(
        seconds={b: tuple(s) for b, s in mine.items()},
        images_per_second={b: float(statistics.median(b / t for t in s)) for b, s in mine.items()},
        rounds_against={
            other: {b: _ratios(theirs[b], mine[b]) for b in mine}
            for other, theirs in seconds.items()
            if other != name
        },
    )


def _ratios(slower: Sequence[float], faster: Sequence[float]) -> tuple[float, ...]:
    return tuple(s / f for s, f in zip(slower, faster, strict=True))


def _calibrate(call: Callable[[], Any], clock: Callable[[], float]) -> int:
    """Calls after which one measurement takes about MIN_MEASURE_SECONDS (compiles first)."""
    call()  # compile and warm up
    start = clock()
    call()
    once = max(clock() - start, 1e-9)
    return max(1, int(np.ceil(MIN_MEASURE_SECONDS / once)))
