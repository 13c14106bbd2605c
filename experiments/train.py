"""Trains a model on color or gray images, resuming from the workdir's last checkpoint.

    python -m experiments.train --workdir=/tmp/tiny

Defaults: densenet_tiny on the embedded cifar10_sample, color, 15 epochs. The shipped
color model is `--epochs=40 --seed=0` (docs/results.md, "The shipped color model", gives
its accuracy). The full-size study on a GPU:

    python -m experiments.train --model=densenet_seed --dataset=cifar10 --epochs=200 \
        --learning_rate=0.01 --momentum=0.7 --workdir=/tmp/seed

Every training flag is a field of graycnn.training.train.TrainConfig. The last stdout line is the
final epoch's metrics as JSON.
"""

import json

from absl import flags

from graycnn import config
from graycnn.cli import runtime
from graycnn.training import train

config.define_flags(train.TrainConfig)
flags.DEFINE_string("workdir", None, "Checkpoints and metrics.jsonl.", required=True)
runtime.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    settings = config.from_flags(train.TrainConfig)
    _, _, history = train.train_and_evaluate(settings, FLAGS.workdir)
    print(json.dumps(history[-1] if history else {"note": "already trained"}))


if __name__ == "__main__":
    runtime.run(main, resumes=True)
