"""Wall time of each stage of the default compress run, on its merged chain.

    python -m benchmarks.compress_stages                 # layers 1 and 2
    python -m benchmarks.compress_stages --layers=1
    python -m benchmarks.compress_stages --compare_speedups   # + speed-ups on vs off

Calls `graycnn.study.stages` in the order `graycnn.study.pipeline` does, on
`CompressConfig()` (the shipped densenet_tiny, cifar10_sample), and times each with its
outputs ready: load (color model and data splits), fold, then per layer: merge (fields
or filter responses -> distances -> clusters -> merge plan) and apply (the plan, with
`--compensate`'s refit); then bn (re-estimation) and evaluate (validation and held-out).
A full run repeats apply, bn and evaluate for its controls and baselines. Each stage
runs once, as in a compress run, so its time includes compilation (the persistent
compilation cache is on: a second run loads programs instead of compiling them).
"""

import collections
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import flags

from graycnn import xla_options
from graycnn.cli import runtime
from graycnn.study import stages
from graycnn.study.config import CompressConfig


def time_stages(
    config: CompressConfig | None = None, layers: tuple[int, ...] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs the merged chain of a compress run in a temporary workdir.

    Returns:
        ([{'stage', 'seconds'}, ...], {'accuracy', 'flops', 'clusters'} of the last model).
    """
    config = config or CompressConfig()
    layers = tuple(layers or config.layers)
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        seconds[name] += time.perf_counter() - start
        return out

    with tempfile.TemporaryDirectory() as workdir:
        color = timed("load", lambda: stages.color_model(config, os.path.join(workdir, "c")))
        splits = timed("load", lambda: stages.load_splits(config, color))
        model = timed("fold", lambda: stages.fold_color_model(config, color, splits.train))
        clusters = {}
        for layer in layers:
            count = config.num_clusters.of(layer)
            result = timed(
                f"merge {layer}",
                lambda m=model, layer=layer, count=count: stages.plan_layer_merge(
                    config, m, layer, count, splits.train, color, config.seed, figures=False
                ),
            )
            clusters[layer] = result.clustering.num_clusters
            model, _ = timed(
                f"apply {layer}",
                lambda m=model, r=result: stages.merge_and_compensate(
                    config, m, r.plan, splits.train, config.seed, color
                ),
            )
        bn_dir = os.path.join(workdir, "bn")
        model = timed("bn", lambda: stages.reestimate_bn(config, model, color, bn_dir, config.seed))
        result = timed("evaluate", lambda: stages.evaluate_model(model, "gray", splits))
    summary = {
        "accuracy": float(result.validation.mean()),
        "flops": stages.size(model)["flops"],
        "clusters": clusters,
    }
    return [{"stage": k, "seconds": v} for k, v in seconds.items()], summary


def compare_speedups(rounds: int = 2) -> dict[str, list[float]]:
    """Total seconds of `time_stages` with the train step's CPU speed-ups on and off
    (`xla_options.set_cpu_speedups`), alternating, `rounds` each; the first round of each warms
    the compilation cache.

    Returns:
        {'on': [s per round], 'off': [...]}.
    """
    totals: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for setting, enabled in (("off", False), ("on", True)):
            previous = xla_options.set_cpu_speedups(enabled)
            try:
                rows, _ = time_stages()
            finally:
                xla_options.set_cpu_speedups(previous)
            totals[setting].append(sum(r["seconds"] for r in rows))
    return totals


_LAYERS = flags.DEFINE_list("layers", None, "Layers to merge (default: the default run's).")
_COMPARE = flags.DEFINE_bool(
    "compare_speedups", False, "Also time the default stages with the CPU speed-ups off."
)


def main(argv):
    del argv
    layers = tuple(int(v) for v in _LAYERS.value) if _LAYERS.value else None
    print(f"compress stages, default config; load {os.getloadavg()}")
    rows, summary = time_stages(layers=layers)
    for r in rows:
        print(f"{r['stage']:<10} {r['seconds']:8.2f} s")
    print(f"{'total':<10} {sum(r['seconds'] for r in rows):8.2f} s; merged model: {summary}")
    if _COMPARE.value:
        totals = compare_speedups()
        print(f"CPU speed-ups on: {totals['on']} s; off: {totals['off']} s")


if __name__ == "__main__":
    runtime.setup()
    runtime.run(main)
