"""One process of the two-process run in tests/test_multihost.py, and the stages it runs.

    PYTHONPATH=. JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 \
        JAX_PROCESS_ID=0 python tests/multihost_worker.py --distributed \
        --dataset=npz:tiny.npz --init=init.npz --workdir=DIR   # and JAX_PROCESS_ID=1

Every process runs `run_stages` (training with a checkpoint, receptive fields, BN
recalibration, an evaluation) and writes DIR/process<i>.npz with the results and the
rows of every batch it placed on its devices. The test runs `run_stages` once more in
its own process, on 2 host devices, and compares.

The run starts from given weights (`--init`): a process other than 0 never hits the
compilation cache (its cache keys name its process index, and only process 0 writes),
and compiling densenet_test's init alone takes ~9 s of CPU.
"""

import os
from typing import Any

import jax
import numpy as np
from absl import flags

from graycnn import receptive_field, tree
from graycnn.cli import runtime
from graycnn.models import ModelConfig, build_model
from graycnn.training import bn_reestimate, checkpoint, data, evaluation, parallel, train

flags.DEFINE_string("dataset", None, "npz:PATH of the training images.")
flags.DEFINE_string("init", None, "npz of the initial variables, keys 'a/b/c'.")
flags.DEFINE_string("workdir", None, "Shared by all processes: checkpoints and results.")
runtime.define_distributed_flags()
FLAGS = flags.FLAGS


MODEL = ModelConfig("densenet_test")


def run_stages(dataset: str, workdir: str, init: dict[str, Any]) -> dict[str, np.ndarray]:
    """Trains densenet_test from `init` for one epoch (2 steps of 64; one checkpoint),
    reloads the checkpoint, climbs layer 2's receptive fields (4 filters in 2 chunks, a
    filter per device), recalibrates BatchNorm and evaluates every image.

    Returns:
        {'<stage>/<param path>' or '<result>': array}.
    """
    config = train.TrainConfig(model=MODEL.name, dataset=dataset, epochs=1)
    _, trained, history = train.train_and_evaluate(config, f"{workdir}/train", init=(MODEL, init))
    model_config, loaded, _ = checkpoint.load_model(f"{workdir}/train")
    fields = receptive_field.gradient_ascent(
        build_model(model_config), loaded, 2, steps=3, image_shape=(32, 32, 3), chunk_size=2
    )
    recalibrated = bn_reestimate.recalibrate(
        model_config, loaded, data.load_dataset(dataset, "train"), "color", num_batches=2,
        batch_size=64,
    )  # fmt: skip
    evaluated = evaluation.evaluate(
        model_config, recalibrated, data.load_dataset(dataset, "all"), "color", batch_size=64
    )
    out = {
        "fields": fields.fields,
        "images": fields.images,
        "objective": fields.objective,
        "filters": fields.filters,
        "train_loss": np.asarray(history[-1]["train_loss"]),
        "val_accuracy": np.asarray(history[-1]["val_accuracy"]),
        # evaluation gathers every process's per-example results (process_allgather).
        "correct": evaluated["correct"],
        "loss": np.asarray(evaluated["loss"]),
    }
    stages = {"trained": trained, "loaded": loaded, "recalibrated": recalibrated}
    for stage, variables in stages.items():
        out |= {f"{stage}/{k}": np.asarray(v) for k, v in tree.flatten(variables).items()}
    return out


class ShardRecorder:
    """Wraps `parallel.shard_batch` to record, for every batch, which global rows this
    process's devices hold and whether they hold exactly those rows of the batch."""

    def __init__(self):
        self.shard_batch = parallel.shard_batch
        self.records: list[dict[str, Any]] = []

    def __call__(self, sharding, *arrays):
        placed = self.shard_batch(sharding, *arrays)
        for a, x in zip(arrays, placed, strict=True):
            rows, exact = [], True
            for shard in x.addressable_shards:
                index = shard.index[0]
                rows.extend(range(*index.indices(len(a))))
                exact &= np.array_equal(np.asarray(shard.data), a[shard.index])
            self.records.append(
                {"length": len(a), "rows": np.asarray(rows), "exact": exact, "sum": a.sum()}
            )
        return placed


def main(argv):
    del argv
    runtime.setup()
    recorder = ShardRecorder()
    parallel.shard_batch = recorder
    init = tree.unflatten(dict(np.load(FLAGS.init)))
    results = run_stages(FLAGS.dataset, FLAGS.workdir, init)
    records = recorder.records
    np.savez(
        os.path.join(FLAGS.workdir, f"process{jax.process_index()}.npz"),
        **results,
        **{f"batch{i}/{k}": v for i, r in enumerate(records) for k, v in r.items()},
        batches=len(records),
        devices=jax.local_device_count(),
    )


if __name__ == "__main__":
    runtime.run(main)
