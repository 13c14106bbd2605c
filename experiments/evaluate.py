"""Evaluates any checkpoint this project writes; the model comes from the checkpoint.

    python -m experiments.evaluate --checkpoint=/tmp/graycnn_tiny_color --view=gray3

`--checkpoint` is a checkpoint directory or a training workdir. An `npz:` or `folder:`
dataset is evaluated on every example (the train/validation split applies to training
only); cifar10 and cifar10_sample on their validation split. The last stdout line is one
JSON object: {"accuracy": 0..1, "examples": N, "params": N, "loss": ..., ...}.
"""

import json

from absl import flags

from graycnn.cli import runtime
from graycnn.models import count_params
from graycnn.training import checkpoint, data, evaluation

flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.", required=True)
flags.DEFINE_string("dataset", "cifar10_sample", data.DATASET_HELP)
flags.DEFINE_enum(
    "split", None, list(data.SPLITS), "Split; default: all of an npz: or folder: dataset, "
    "the validation split of cifar10 and cifar10_sample."
)  # fmt: skip
flags.DEFINE_enum(
    "view",
    None,
    list(data.VIEWS),
    "Input view; default: color for 3-channel models, gray for 1-channel.",
)
flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
runtime.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    model_config, variables, _ = checkpoint.load_model(FLAGS.checkpoint)
    view = FLAGS.view or ("color" if model_config.in_channels == 3 else "gray")
    split_name = FLAGS.split or data.default_eval_split(FLAGS.dataset)
    split = data.load_dataset(FLAGS.dataset, split_name, FLAGS.data_dir)
    result = evaluation.evaluate(
        model_config, variables, split, view, FLAGS.batch_size, f"checkpoint {FLAGS.checkpoint}"
    )
    result.pop("correct")
    result |= {
        "params": count_params(variables),
        "model": model_config.name,
        "view": view,
        "dataset": FLAGS.dataset,
        "split": split_name,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    runtime.run(main)
