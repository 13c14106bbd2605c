"""Evaluates any checkpoint this project writes; the model comes from the checkpoint.

    python -m experiments.evaluate --checkpoint=/tmp/graycnn_tiny_color --view=gray3

`--checkpoint` is a checkpoint directory or a training workdir. The last stdout line is
one JSON object: {"accuracy": 0..1, "examples": N, "params": N, "loss": ..., ...}.
Takes ~10 s for densenet_tiny on the 1,000 validation images of the embedded sample.
"""

import json

from absl import flags

from graycnn import checkpoint, data, runtime, train
from graycnn.models import count_params

flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.", required=True)
flags.DEFINE_string("dataset", "cifar10_sample", "cifar10, cifar10_sample, npz:PATH, folder:PATH.")
flags.DEFINE_enum("split", "validation", list(data.SPLITS), "Split to evaluate.")
flags.DEFINE_enum(
    "view",
    None,
    list(data.VIEWS),
    "Input view; default: color for 3-channel models, gray for 1-channel.",
)
flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    model_config, variables, _ = checkpoint.load_model(FLAGS.checkpoint)
    view = FLAGS.view or ("color" if model_config.in_channels == 3 else "gray")
    split = data.load_dataset(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    result = train.evaluate(model_config, variables, split, view, FLAGS.batch_size)
    result |= {
        "params": count_params(variables),
        "model": model_config.name,
        "view": view,
        "dataset": FLAGS.dataset,
        "split": FLAGS.split,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    runtime.run(main)
