"""Train and eval throughput (images/s) of the DenseNets after compile, and of the same
network in PyTorch eager when `torch` is importable, timed in interleaved rounds.

    python -m benchmarks.train --batch_size=128
    python -m benchmarks.train --models=densenet_tiny --rounds=3 --steps=2

Runs what the CLIs run: the library's jitted train step (SGD, augmentation, BN in train
mode) and eval step, on every device JAX sees, with graycnn's default XLA settings
(the benchmarks package opts in; no XLA_FLAGS needed). Random uint8 batches, random
weights. Each round times `--steps` JAX train steps, then the same number of PyTorch
steps (the same network, weights copied across, checked on one batch), then the eval
steps of both, so a busy machine slows both sides of a ratio alike. Expected result: one
row per model with compile seconds, img/s ranges over the rounds, the per-round
JAX/PyTorch ratio, the step's peak memory (XLA's buffer assignment: arguments +
outputs + temporaries; and the device's peak where the backend reports one), and each
side's system CPU seconds per train step.
"""

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import flags

from benchmarks import markdown_table
from graycnn.cli import runtime
from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.training import evaluation, parallel, train

MODELS = ("densenet_tiny", "densenet_seed")
# The train step as the library builds it, and without each of its CPU speed-ups:
# nn.BatchNorm's two-pass statistics instead of the one-pass module, YNNPACK's
# convolutions (jaxlib's default) instead of Eigen's, XLA's convolutions instead of the
# dot forwards and kernel gradients of graycnn.models.conv, or none of them.
VARIANTS = ("default", "flax_bn", "ynnpack_conv", "xla_conv", "neither")


def _compiled_bytes(compiled: Any) -> int | None:
    """Peak bytes of one call of a compiled program, from XLA's buffer assignment."""
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
    except Exception:  # Not every backend reports it.
        return None


def device_peak_bytes() -> int | None:
    """The first device's peak bytes in use so far, where the backend reports it (GPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def jax_steps(
    name: str, batch_size: int, seed: int = 0, variant: str = "default"
) -> dict[str, Any]:
    """Compiled train and eval steps of model `name` on every device, ready to time.

    Args:
        variant: One of `VARIANTS`: the library's train step, or one without its CPU
            speed-ups (the eval step is the library's in every variant).

    Returns:
        {'train': f(steps), 'eval': f(steps)} (each runs `steps` steps and waits),
        'train_compiled' (the compiled train step), 'compile_s', 'train_bytes',
        'eval_bytes', 'variables' (host copy), 'images', 'labels' (host arrays).
    """
    batch_sharding, replicated = parallel.mesh_shardings()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, batch_size).astype(np.int32)
    x, y = parallel.shard_batch(batch_sharding, images, labels)
    mask = parallel.shard_batch(batch_sharding, np.ones(batch_size, np.float32))[0]
    config = ModelConfig(name)
    model = build_model(config)
    if variant in ("flax_bn", "neither"):
        model = model.clone(bn_one_pass=False)
    if variant in ("xla_conv", "neither"):
        model = model.clone(conv_dots="")
    variables = jax.device_get(init_variables(config, jax.random.key(seed)))
    tx = train.make_optimizer(train.TrainConfig(), 100, variables["params"])
    state = jax.device_put(
        train.TrainState(
            np.zeros((), np.int32),
            variables["params"],
            variables["batch_stats"],
            tx.init(variables["params"]),
        ),
        replicated,
    )
    key = jax.random.key(seed)
    start = time.perf_counter()
    train_step = train.make_train_step(model, tx, "color", augment=True)
    if variant in ("ynnpack_conv", "neither"):  # the same step, XLA's default options
        train_step = jax.jit(train_step.__wrapped__, donate_argnums=0)
    train_step = train_step.lower(state, x, y, key).compile()
    eval_variables = jax.device_put(variables, replicated)
    eval_step = evaluation.make_eval_step(build_model(config, eval_step=True), "color")
    eval_step = eval_step.lower(eval_variables, x, y, mask).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run_train(steps: int) -> None:
        for _ in range(steps):
            # The step donates its state: keep only the newest.
            holder["state"], metrics = train_step(holder["state"], x, y, key)
        jax.block_until_ready(metrics)

    def run_eval(steps: int) -> None:
        for _ in range(steps):
            out = eval_step(eval_variables, x, y, mask)
        jax.block_until_ready(out)

    return {
        "train": run_train,
        "eval": run_eval,
        "train_compiled": train_step,
        "compile_s": compile_s,
        "train_bytes": _compiled_bytes(train_step),
        "eval_bytes": _compiled_bytes(eval_step),
        "variables": variables,
        "images": images,
        "labels": labels,
    }


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_steps(
    name: str, variables: Any, images: np.ndarray, labels: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """The same network, steps and batch in PyTorch eager (benchmarks/torch_densenet.py).

    Returns:
        {'train': f(steps), 'eval': f(steps), 'max_logit_diff': max |PyTorch - JAX| of
        the eval logits on the batch, 'threads': PyTorch's intra-op threads}.
    """
    import torch

    from benchmarks.torch_densenet import TorchDenseNet, augment

    torch.manual_seed(seed)
    config = ModelConfig(name)
    net = TorchDenseNet.from_config(config)
    net.load_flax_variables(variables)
    x = torch.from_numpy(images.copy())
    y = torch.from_numpy(labels.astype(np.int64))
    net.eval()
    with torch.no_grad():
        logits = net(x).numpy()
    expected = np.asarray(build_model(config).apply(variables, images, train=False))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)

    def run_train(steps: int) -> None:
        net.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(augment(x, generator)), y)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def run_eval(steps: int) -> None:
        net.eval()
        for _ in range(steps):
            net(x)

    diff = float(np.max(np.abs(logits - expected)))
    # A ratio against a different network would mean nothing: stop instead of timing it.
    if diff > 1e-4 * max(1.0, float(np.max(np.abs(expected)))):
        raise ValueError(f"{name}: the PyTorch twin's logits differ from ours by {diff:.2e}")
    return {
        "train": run_train,
        "eval": run_eval,
        "max_logit_diff": diff,
        "threads": torch.get_num_threads(),
    }


def _rates(fn: Callable[[int], None], steps: int, batch_size: int) -> tuple[float, float]:
    """(img/s, system CPU seconds per step) of `steps` steps of `fn`. The process's
    system time is the kernel's share, mostly page faults on freshly mapped buffers; on
    a shared or virtual machine it varies between runs of the same code, and the
    ratios with it."""
    system_before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    start = time.perf_counter()
    fn(steps)
    seconds = time.perf_counter() - start
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - system_before
    return steps * batch_size / seconds, system / steps


def measure(
    name: str, batch_size: int = 128, steps: int = 3, rounds: int = 5, with_torch: bool = True
) -> dict[str, Any]:
    """Times model `name`: `rounds` interleaved rounds of `steps` steps per side.

    Returns:
        A JSON-able dict: 'model', 'batch_size', 'devices', 'compile_s', per-round img/s
        lists 'jax_train', 'jax_eval' (and 'torch_train', 'torch_eval',
        'train_ratio', 'eval_ratio' = JAX/PyTorch per round, 'torch_threads',
        'torch_max_logit_diff' with torch), per-round system CPU seconds per train step
        'jax_train_sys' (and 'torch_train_sys'), 'train_bytes', 'eval_bytes',
        'device_peak_bytes'.
    """
    jx = jax_steps(name, batch_size)
    pt = None
    if with_torch and torch_available():
        pt = torch_steps(name, jx["variables"], jx["images"], jx["labels"])
    sides = {"jax": jx} | ({"torch": pt} if pt else {})
    for side in sides.values():  # warm-up: first-call allocations, thread pools.
        side["train"](1)
        side["eval"](1)
    out: dict[str, Any] = {"model": name, "batch_size": batch_size, "steps": steps}
    out |= {f"{s}_{kind}": [] for s in sides for kind in ("train", "eval", "train_sys")}
    for _ in range(rounds):
        for kind in ("train", "eval"):
            for s, side in sides.items():
                rate, system = _rates(side[kind], steps, batch_size)
                out[f"{s}_{kind}"].append(rate)
                if kind == "train":
                    out[f"{s}_train_sys"].append(system)
    out |= {
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "compile_s": jx["compile_s"],
        "train_bytes": jx["train_bytes"],
        "eval_bytes": jx["eval_bytes"],
        "device_peak_bytes": device_peak_bytes(),
    }
    if pt:
        for kind in ("train", "eval"):
            out[f"{kind}_ratio"] = [
                a / b for a, b in zip(out[f"jax_{kind}"], out[f"torch_{kind}"], strict=True)
            ]
        out["torch_threads"] = pt["threads"]
        out["torch_max_logit_diff"] = pt["max_logit_diff"]
    return out


def measure_variants(
    name: str, batch_size: int = 128, steps: int = 3, rounds: int = 5, variants=VARIANTS
) -> dict[str, Any]:
    """Train img/s of each of `variants` of model `name`'s step, in interleaved rounds.

    Returns:
        {'model', 'batch_size', 'img_s': {variant: [per round]}, 'speedup': {variant:
        [default's img/s / the variant's, per round]}}.
    """
    steps_of = {v: jax_steps(name, batch_size, variant=v)["train"] for v in variants}
    for run_train in steps_of.values():
        run_train(1)
    img_s: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, run_train in steps_of.items():
            img_s[v].append(_rates(run_train, steps, batch_size)[0])
    speedup = {
        v: [a / b for a, b in zip(img_s["default"], img_s[v], strict=True)]
        for v in variants
        if "default" in img_s
    }
    return {"model": name, "batch_size": batch_size, "img_s": img_s, "speedup": speedup}


def format_variant_rows(results: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines: one row per model and variant."""
    header = ["model", "batch", "train step", "train img/s", "library default's speed-up over it"]
    return markdown_table(
        header,
        [
            [r["model"], r["batch_size"], v, span(rates), span(r["speedup"].get(v, []), 2)]
            for r in results
            for v, rates in r["img_s"].items()
        ],
    )


def span(values: list[float], digits: int = 0) -> str:
    """'median (min-max)' of a list, e.g. '120 (95-131)'."""
    if not values:
        return "-"
    f = f"{{:,.{digits}f}}"
    return (
        f"{f.format(statistics.median(values))} ({f.format(min(values))}-{f.format(max(values))})"
    )


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def format_rows(results: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines: one row per model."""
    header = [
        "model", "devices", "batch", "compile s", "train img/s", "PyTorch train img/s",
        "train ratio", "eval img/s", "PyTorch eval img/s", "eval ratio",
        "step peak MiB (train / eval)", "train system s/step (JAX / PyTorch)",
    ]  # fmt: skip
    return markdown_table(
        header,
        [
            [r["model"], r["devices"], r["batch_size"], f"{r['compile_s']:.1f}",
             span(r["jax_train"]), span(r.get("torch_train", [])),
             span(r.get("train_ratio", []), 2), span(r["jax_eval"]),
             span(r.get("torch_eval", [])), span(r.get("eval_ratio", []), 2),
             f"{mib(r['train_bytes'])} / {mib(r['eval_bytes'])}",
             f"{span(r['jax_train_sys'], 2)} / {span(r.get('torch_train_sys', []), 2)}"]
            for r in results
        ],
    )  # fmt: skip


def _define_flags() -> None:
    # Defined only when run as a script, so that benchmarks.run can import `measure`.
    flags.DEFINE_list("models", list(MODELS), "Models.")
    flags.DEFINE_integer("batch_size", 128, "Global batch size.")
    flags.DEFINE_integer("steps", 3, "Steps per side per round.")
    flags.DEFINE_integer("rounds", 5, "Interleaved rounds (JAX, PyTorch, JAX, ...).")
    flags.DEFINE_bool("torch", True, "Also time PyTorch eager when torch is importable.")
    flags.DEFINE_bool(
        "variants", False, f"Instead, time the train step's variants {', '.join(VARIANTS)}."
    )


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()}, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}"
    )
    if FLAGS.variants:
        results = [
            measure_variants(name, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds)
            for name in FLAGS.models
        ]
        print("\n".join(format_variant_rows(results)))
        return
    results = []
    for name in FLAGS.models:
        results.append(measure(name, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds, FLAGS.torch))
        if "torch_max_logit_diff" in results[-1]:
            print(
                f"{name}: PyTorch twin max |logit diff| {results[-1]['torch_max_logit_diff']:.1e}"
            )
    print("\n".join(format_rows(results)))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    _define_flags()
    runtime.setup()
    runtime.run(main)
