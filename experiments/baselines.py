"""The study's Tables 1 and 2 in one command: color vs gray, from scratch vs from trained
color weights, gray3 input vs a 1-channel first conv, per model.

    python -m experiments.baselines --models=resnet20,densenet_tiny

Defaults: cifar10_sample, 4 epochs per row, 5 rows per model: about 8 minutes on a
2-core CPU. Writes --workdir/report.md, report.json and accuracy_<model>.png; each row's
checkpoint (report.json "checkpoint") loads with experiments.evaluate. A rerun resumes.
The full-size study on a GPU:

    python -m experiments.baselines --dataset=cifar10 --epochs=50 \
        --models=resnet18,densenet_seed --learning_rate=0.01 --momentum=0.7
"""

import dataclasses

from absl import flags

from graycnn import baselines, runtime, train

flags.DEFINE_list("models", ["resnet20", "densenet_tiny"], "Models.")
flags.DEFINE_string("dataset", "cifar10_sample", "cifar10, cifar10_sample, npz:PATH, folder:PATH.")
flags.DEFINE_integer("epochs", 4, "Epochs of every trained row.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_float("learning_rate", train.TrainConfig.learning_rate, "SGD learning rate.")
flags.DEFINE_float("momentum", train.TrainConfig.momentum, "SGD momentum.")
flags.DEFINE_enum("bn", "train", ["train", "recalibrate"], "Row 5's BN re-estimation.")
flags.DEFINE_integer("seed", 0, "Seed shared by every row.")
flags.DEFINE_string("workdir", "runs/baselines", "Output directory.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    base = dataclasses.replace(
        train.TrainConfig(),
        dataset=FLAGS.dataset,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        momentum=FLAGS.momentum,
        seed=FLAGS.seed,
        data_dir=FLAGS.data_dir,
    )
    report = baselines.run_baselines(FLAGS.models, FLAGS.workdir, base, bn=FLAGS.bn)
    print(baselines.format_report(report))


if __name__ == "__main__":
    runtime.run(main)
