"""Benchmark: every filter of a layer in one batched program vs one filter at a time.

Command (on CPU graycnn's default 2 host devices, then 1; on a GPU machine, the GPU):
    python -m benchmarks.receptive_field
    XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m benchmarks.receptive_field

Each command runs densenet_seed's layers 1, 2 and 13, 100 steps, each configuration
compiled once and timed once more.
Expected result: a table with one row per layer, way and loop ('python': a jitted step
per step, 'fori': all steps in one lax.fori_loop; 'auto' picks python on CPU):
    chunk           filters per compiled batch,
    compile_s       tracing, lowering and XLA compilation during the first call,
    run_s           the best of --repeats calls after it: all filters, all steps,
    ms/filter-step  run_s per filter per step,
    rel_err         max |objective - the layer's first row| / max |the first row's|.
On CPU, batching pays most for layer 1 (dispatch-bound); for layer 13 (compute-bound) a
chunk's activations fall out of the cache, so the CPU default chunks are cache-sized.
`--steps=10 --loops=python,fori` compares the loops. Numbers: benchmarks/README.md.

The one-at-a-time rows run on the first device only (a batch of 1 cannot be sharded);
the batched rows shard the filters over every device. Random weights (the timing does
not depend on them); no compilation cache, so compile times are real.
"""

import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from graycnn.layers import conv_layers, resolve_layer
from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.receptive_field import gradient_ascent


def _time(fn, repeats: int) -> tuple[float, float, Any]:
    """(compile seconds, best run seconds, result): a first call, then `repeats` more.

    Compile time is what JAX reports for tracing, lowering and XLA compilation during the
    first call, so a busy machine slows it but does not leak run time into it.
    """
    events = []

    def listen(event, seconds, **_):
        events.append((event, seconds))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    compile_s = sum(s for e, s in events if e.startswith("/jax/core/compile/"))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    return compile_s, min(runs), result


def run_table(
    model_name: str,
    layers: list[str],
    steps: int,
    loops: list[str],
    ways: list[str],
    repeats: int,
) -> list[dict[str, Any]]:
    """Times every (layer, way, loop); prints a row each and returns them as dicts."""
    config = ModelConfig(model_name)
    model = build_model(config)
    variables = jax.device_get(init_variables(config, jax.random.key(0)))
    paths = conv_layers(model, config.input_shape)
    devices = jax.devices()
    print(
        f"{config.name}, {steps} steps, backend {jax.default_backend()}, "
        f"{len(devices)} device(s): {devices[0].device_kind}"
    )
    header = (
        f"{'layer':<24} {'F':>3} {'way':<13} {'loop':<6} {'chunk':>5} {'compile_s':>9} "
        f"{'run_s':>7} {'ms/filter-step':>14} {'rel_err':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for layer in layers:
        path = resolve_layer(layer, paths)
        label = f"{layer}:{path}" if str(layer).isdigit() else path
        reference = None
        for way in ways:
            for loop in loops:
                options = {"steps": steps, "loop": loop, "seed": 0}
                options |= {"image_shape": config.input_shape[1:]}
                if way == "one_at_a_time":
                    options |= {"chunk_size": 1, "devices": devices[:1]}
                elif way == "one_chunk":
                    options |= {"chunk_size": 10**6}
                elif way != "batched":
                    raise ValueError(f"--ways: unknown way {way!r}")
                compile_s, run_s, result = _time(
                    lambda o=options, p=path: gradient_ascent(model, variables, p, **o),
                    repeats,
                )
                values = result.objective
                # The first row of a layer is the reference of the others; the error is
                # relative to the layer's largest objective, as single filters pass zero.
                reference = values if reference is None else reference
                rel = np.max(np.abs(values - reference)) / np.max(np.abs(reference))
                per_step = 1e3 * run_s / (len(values) * max(1, steps))
                print(
                    f"{label:<24} {len(values):>3} {way:<13} {result.loop:<6} "
                    f"{result.chunk_size:>5} {compile_s:>9.2f} {run_s:>7.2f} {per_step:>14.3f} "
                    f"{rel:>8.1e}",
                    flush=True,
                )
                rows.append(
                    {
                        "layer": label,
                        "filters": len(values),
                        "way": way,
                        "loop": result.loop,
                        "chunk": result.chunk_size,
                        "compile_s": compile_s,
                        "run_s": run_s,
                        "ms_per_filter_step": per_step,
                        "rel_err": float(rel),
                    }
                )
    return rows


def _define_flags() -> None:
    # Defined only when run as a script, so that benchmarks.run can import run_table.
    flags.DEFINE_string("model", "densenet_seed", "A graycnn.models.MODELS name.")
    flags.DEFINE_list(
        "layers", ["1", "2", "13"], "Conv layers (numbers or paths); 13 = block1/layer12/conv."
    )
    flags.DEFINE_integer("steps", 100, "Gradient-ascent steps (the study: 100).")
    flags.DEFINE_list(
        "loops", ["auto"], "Loops to compare: python, fori, auto (python on CPU, fori elsewhere)."
    )
    flags.DEFINE_integer("repeats", 1, "Timed calls after the first; the best counts.")
    flags.DEFINE_list(
        "ways",
        ["one_at_a_time", "batched", "one_chunk"],
        "one_at_a_time: chunks of 1 on one device (the study's way); batched: the library's "
        "default chunks, sharded over all devices; one_chunk: every filter in one chunk.",
    )


def main(argv):
    del argv
    f = flags.FLAGS
    run_table(f.model, f.layers, f.steps, f.loops, f.ways, f.repeats)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
