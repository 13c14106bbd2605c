"""The study's Tables 1 and 2 in one command: color vs gray, from scratch vs from trained
color weights, gray3 input vs a 1-channel first conv, per model.

    python -m experiments.baselines --models=resnet20,densenet_tiny

Defaults: cifar10_sample, 4 epochs per row, 5 rows per model. Writes --workdir/report.md,
report.json and accuracy_<model>.png; each row's checkpoint (report.json "checkpoint")
loads with experiments.evaluate. A rerun resumes.
The full-size study on a GPU:

    python -m experiments.baselines --dataset=cifar10 --epochs=50 \
        --models=resnet18,densenet_seed --learning_rate=0.01 --momentum=0.7
"""

from absl import flags

from graycnn import config
from graycnn.cli import runtime
from graycnn.study import baselines
from graycnn.training import train

config.define_flags(baselines.BaselinesConfig)
config.define_flags(
    train.TrainConfig, only=baselines.TRAIN_FLAGS, defaults=baselines.TRAIN_DEFAULTS
)
flags.DEFINE_string("workdir", "runs/baselines", "Output directory.")
runtime.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    options = config.from_flags(baselines.BaselinesConfig)
    base = config.from_flags(train.TrainConfig, only=baselines.TRAIN_FLAGS)
    report = baselines.run_baselines(options.models, FLAGS.workdir, base, bn=options.bn)
    print(baselines.format_report(report))


if __name__ == "__main__":
    runtime.run(main, resumes=True)
