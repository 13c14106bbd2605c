"""Imports a Keras model of the study's DenseNet family as a graycnn checkpoint.

    python -m experiments.import_keras --model_file=densenet.h5 --workdir=/tmp/seed_keras
    python -m experiments.evaluate --checkpoint=/tmp/seed_keras
    python -m experiments.compress --checkpoint=/tmp/seed_keras --layers=1,2

Reads Keras 2 (tf.keras) `.h5` and Keras 3 `.h5` / `.keras` files written by
`model.save`, without TensorFlow. A model with 12 layers per block becomes
`densenet_seed` (995,230 parameters for the study's widths); other depths keep their
`layers_per_block` in the checkpoint's config. Expected result: the last stdout line is
JSON {"checkpoint", "model", "layers_per_block", "params", ...}; a model that is not of
the family stops with one line `error: cannot map Keras layer 'NAME' ...` naming the
first layer that does not fit, exit status 2.
"""

import json

from absl import flags

from graycnn.cli import runtime
from graycnn.importers.keras import check_input_scaling, import_keras

_MODEL_FILE = flags.DEFINE_string(
    "model_file", None, "Keras model file (.h5 or .keras) written by model.save.", required=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "New checkpoint directory (must not exist).", required=True
)
_INPUT_SCALE = flags.DEFINE_float(
    "input_scale",
    1.0,
    "The Keras model was fed (pixels - input_offset) * input_scale for 0-255 pixels, "
    "outside the model (the study: raw pixels, 1). A Rescaling layer in the file is "
    "read from the file and composed with it. Must be finite and > 0.",
)
_INPUT_OFFSET = flags.DEFINE_float("input_offset", 0.0, "See --input_scale. Must be finite.")


def main(argv):
    del argv
    check_input_scaling(_INPUT_SCALE.value, _INPUT_OFFSET.value, prefix="--")
    runtime.setup()
    summary = import_keras(
        _MODEL_FILE.value, _WORKDIR.value, _INPUT_SCALE.value, _INPUT_OFFSET.value
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    runtime.run(main)
