"""Per-layer parameter table of a model, like Keras's model.summary().

    python -m experiments.summary --model=densenet_seed
    # ... last line: total parameters: 995230   (994582 with --in_channels=1)
    python -m experiments.summary --model=densenet_seed --in_channels=1 --widths=1:20,2:12
    # ... last line: total parameters: 950046   (the study's layers 1+2 merged model)

The "layer" column is the conv number used by every other command (--layers, --widths).
Runs in a few seconds: only shapes are traced.
"""

import jax
from absl import flags

from graycnn import summary
from graycnn.cli import runtime
from graycnn.layers import conv_layers
from graycnn.models import MODELS, ModelConfig, build_model, count_params, head_path

flags.DEFINE_enum("model", "densenet_seed", sorted(MODELS), "Model.")
flags.DEFINE_enum("in_channels", "3", ["1", "3"], "Input channels.")
flags.DEFINE_string("widths", "", "Output widths, LAYER:WIDTH,... (number or conv path).")
flags.DEFINE_integer("num_classes", 10, "Classes.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = ModelConfig(
        FLAGS.model, in_channels=int(FLAGS.in_channels), num_classes=FLAGS.num_classes
    )
    paths = conv_layers(build_model(config), config.input_shape)
    widths = summary.parse_widths(FLAGS.widths, paths, head_path(config.name), config.num_classes)
    config = config.replace(widths=widths)
    rows = summary.summarize(config)
    model = build_model(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros(config.input_shape))
    print(summary.format_table(rows, count_params(variables)))


if __name__ == "__main__":
    runtime.run(main)
