"""Train and eval throughput (images/s) of the DenseNets, after compile.

    python -m benchmarks.train                       # every local device (1 CPU device)
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.train

Prints one row per model: compile seconds, train images/s, eval images/s. Timed steps
run on random uint8 batches; the first step (compile) is timed apart.
"""

import time

import jax
import numpy as np
from absl import app, flags

from graycnn import runtime, train
from graycnn.models import ModelConfig, build_model, init_variables

flags.DEFINE_list("models", ["densenet_tiny", "densenet_seed"], "Models.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
FLAGS = flags.FLAGS


def _time(fn, steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / steps


def main(argv):
    del argv
    batch_sharding, replicated = train.mesh_shardings()
    rng = np.random.default_rng(0)
    b = FLAGS.batch_size
    images, labels = train.shard_batch(
        batch_sharding,
        rng.integers(0, 256, (b, 32, 32, 3), np.uint8),
        rng.integers(0, 10, b).astype(np.int32),
    )
    mask = train.shard_batch(batch_sharding, np.ones(b, np.float32))[0]
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, batch {b}")
    print(f"{'model':<15} {'compile s':>9} {'train img/s':>12} {'eval img/s':>11}")
    for name in FLAGS.models:
        config = ModelConfig(name)
        model = build_model(config)
        variables = init_variables(config, jax.random.key(0))
        # The train step donates its state, so eval gets its own copy of the weights.
        eval_variables = jax.device_put(jax.device_get(variables), replicated)
        tx = train.make_optimizer(train.TrainConfig(), 100, variables["params"])
        state = jax.device_put(
            train.TrainState(
                jax.numpy.zeros((), "int32"),
                variables["params"],
                variables["batch_stats"],
                tx.init(variables["params"]),
            ),
            replicated,
        )
        step = train.make_train_step(model, tx, "color", augment=True)
        holder = {"state": state}

        def train_once(step=step, holder=holder):
            holder["state"], metrics = step(holder["state"], images, labels, jax.random.key(0))
            return metrics

        compile_s, train_s = _time(train_once, FLAGS.steps)
        eval_step = train.make_eval_step(model, "color")
        _, eval_s = _time(
            lambda e=eval_step, v=eval_variables: e(v, images, labels, mask), FLAGS.steps
        )
        print(f"{name:<15} {compile_s:>9.1f} {b / train_s:>12.0f} {b / eval_s:>11.0f}")


if __name__ == "__main__":
    runtime.setup()
    app.run(main)
