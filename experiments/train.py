"""Trains a model on color or gray images, resuming from the workdir's last checkpoint.

    python -m experiments.train --workdir=/tmp/tiny

Defaults: densenet_tiny on the embedded cifar10_sample, color, 15 epochs: ~4 minutes on
a 2-core CPU, ~56% validation accuracy (BUILD_NOTES.md; 40 epochs give 63%). The
full-size study on a GPU:

    python -m experiments.train --model=densenet_seed --dataset=cifar10 --epochs=200 \
        --learning_rate=0.01 --momentum=0.7 --workdir=/tmp/seed

The last stdout line is the final epoch's metrics as JSON.
"""

import json

from absl import flags

from graycnn import runtime, train

_D = train.TrainConfig()
flags.DEFINE_string("model", _D.model, "A model of graycnn.models.MODELS.")
flags.DEFINE_string("dataset", _D.dataset, "cifar10, cifar10_sample, npz:PATH or folder:PATH.")
flags.DEFINE_enum("view", _D.view, ["color", "gray", "gray3"], "Input view.")
flags.DEFINE_integer("epochs", _D.epochs, "Epochs.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Initial SGD learning rate.")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum.")
flags.DEFINE_bool("augment", _D.augment, "Random crop (4-pixel pad) and horizontal flip.")
flags.DEFINE_integer("seed", _D.seed, "Seed of init, data order and augmentation.")
flags.DEFINE_string("workdir", None, "Checkpoints and metrics.jsonl.", required=True)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup(distributed=FLAGS.distributed)
    config = train.TrainConfig(
        model=FLAGS.model,
        dataset=FLAGS.dataset,
        view=FLAGS.view,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        momentum=FLAGS.momentum,
        augment=FLAGS.augment,
        seed=FLAGS.seed,
        data_dir=FLAGS.data_dir,
    )
    _, _, history = train.train_and_evaluate(config, FLAGS.workdir)
    print(json.dumps(history[-1] if history else {"note": "already trained"}))


if __name__ == "__main__":
    runtime.run(main)
