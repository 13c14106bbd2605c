"""Exports a checkpoint as files that run without graycnn: StableHLO and TFLite.

    python -m experiments.export --checkpoint=runs/compress/models/merged_1_2 --out=OUT

Writes OUT/model.stablehlo (jax.export), OUT/model.tflite and OUT/signature.json (input
shape, dtype, 0-255 range and view, class names, versions). Each artifact is run on
`--check_images` real images of `--dataset` first and refused unless its logits are
within 1e-4 of the Flax model's. The last stdout line is one JSON object: the files,
each artifact's largest logit difference and argmax agreement. How to run the files
without graycnn: README.md, "Ship the model".
"""

import dataclasses
import json

from absl import flags

from graycnn.cli import runtime, workdir
from graycnn.deploy import FORMATS, export_model, view_of
from graycnn.training import checkpoint, data, evaluation

flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.", required=True)
flags.DEFINE_string("out", None, "Output directory for the artifacts.", required=True)
flags.DEFINE_list("formats", list(FORMATS), f"Artifacts to write, of {', '.join(FORMATS)}.")
flags.DEFINE_string("dataset", "cifar10_sample", data.DATASET_HELP)
flags.DEFINE_enum(
    "split", None, list(data.SPLITS), "Split of the check images; default as experiments.evaluate."
)
flags.DEFINE_integer("check_images", 256, "Real images every artifact is checked on (>= 1).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.setup()
    if FLAGS.check_images < 1:
        raise ValueError(f"--check_images must be >= 1, got {FLAGS.check_images}")
    unknown = [f for f in FLAGS.formats if f not in FORMATS]
    if unknown or not FLAGS.formats:
        raise ValueError(f"--formats: unknown {unknown}; formats: {', '.join(FORMATS)}")
    workdir.prepare(FLAGS.out, "--out")  # a bad --out fails before the conversions
    model_config, variables, _ = checkpoint.load_model(FLAGS.checkpoint)
    view = view_of(model_config)
    split_name = FLAGS.split or data.default_eval_split(FLAGS.dataset)
    split = data.load_dataset(FLAGS.dataset, split_name, FLAGS.data_dir)
    split = evaluation.check_input(model_config, split, view)
    images = data.apply_view(split.images[: FLAGS.check_images], view)
    result = export_model(model_config, variables, FLAGS.out, images, FLAGS.formats)
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    runtime.run(main)
