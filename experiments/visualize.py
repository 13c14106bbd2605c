"""Receptive fields of conv layers by gradient ascent: figures and raw fields.

Command (the trained densenet_tiny color model):
    python -m experiments.visualize --checkpoint=/tmp/graycnn_tiny_color \
        --layers=1,2,14 --outdir=/tmp/rf_figures

Expected result: for each layer N, in --outdir,
    layerN_color.png        the color fields, one tile per filter (the study's Figure 4),
    layerN_gray.png         their BT.601 gray versions in blue-yellow (Figure 5),
    layerN_color_gray.png   the two side by side (Figures 6-7),
    layerN.npz              fields (F, H, W, C) in [0, 1], gray (F, H, W, 1), images
                            (raw, 0-255 pixel space), objective (F,), filters, path;
and one line per layer with its path, shape and mean objective. Layer 1's `mean` fields
are flat colors with border effects (its gradient does not depend on the input); use
--objective=center or --objective=kernel to see its kernels. A gray model (1 input
channel) gets only the gray figure.
"""

import os
import time

from absl import flags
from tqdm.auto import tqdm

from graycnn import receptive_field
from graycnn.cli import runtime, workdir
from graycnn.layers import conv_layers, layer_number, resolve_layer
from graycnn.models import build_model
from graycnn.study.figures.receptive_fields import write_layer
from graycnn.training import checkpoint

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint dir or training workdir.")
_LAYERS = flags.DEFINE_list("layers", ["1", "2"], "Conv layers: 1-based numbers or paths.")
_OUTDIR = flags.DEFINE_string("outdir", None, "Where the PNGs and .npz files go.")
_OBJECTIVE = flags.DEFINE_enum(
    "objective", "mean", list(receptive_field.OBJECTIVES), "What each field maximizes."
)
_STEPS = flags.DEFINE_integer("steps", 100, "Gradient-ascent steps (the study: 100).")
_STEP_SIZE = flags.DEFINE_float("step_size", 0.5, "Step on the RMS-normalized gradient.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the starting noise and of jitter.")
_JITTER = flags.DEFINE_integer("jitter", 0, "Regularizer: random shift of up to N pixels.")
_BLUR = flags.DEFINE_float("blur_sigma", 0.0, "Regularizer: Gaussian blur after each step.")
_TV = flags.DEFINE_float("tv_weight", 0.0, "Regularizer: total-variation weight.")
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Filters per compiled batch (default auto).")
_LOOP = flags.DEFINE_enum("loop", "auto", list(receptive_field.LOOPS), "Step loop.")
runtime.define_distributed_flags()


def main(argv):
    del argv
    runtime.setup()
    model_config, variables, _ = checkpoint.load_model(_CHECKPOINT.value)
    model = build_model(model_config)
    # Every flag and layer is checked before --outdir is made and the first,
    # minutes-long ascent starts.
    options = dict(
        objective=_OBJECTIVE.value,
        steps=_STEPS.value,
        step_size=_STEP_SIZE.value,
        seed=_SEED.value,
        jitter=_JITTER.value,
        blur_sigma=_BLUR.value,
        tv_weight=_TV.value,
        chunk_size=_CHUNK.value,
        loop=_LOOP.value,
    )
    image_shape = model_config.input_shape[1:]
    receptive_field.check_options(image_shape=image_shape, prefix="--", **options)
    paths = conv_layers(model, model_config.input_shape)
    if not _LAYERS.value:
        raise ValueError(f"--layers: give at least one conv layer 1..{len(paths)}")
    for layer in _LAYERS.value:
        try:
            resolve_layer(layer, paths)
        except ValueError as e:
            raise ValueError(f"--layers: {e}") from None
    made = not os.path.exists(_OUTDIR.value)
    workdir.prepare(_OUTDIR.value, flag="--outdir")
    try:
        _visualize(model, variables, paths, image_shape, options)
    except BaseException:
        # An ascent that diverged leaves no empty --outdir behind.
        if made and os.path.isdir(_OUTDIR.value) and not os.listdir(_OUTDIR.value):
            os.rmdir(_OUTDIR.value)
        raise


def _visualize(model, variables, paths, image_shape, options) -> None:
    # The bars close before an error leaves main, so the error line is printed last.
    with tqdm(_LAYERS.value, desc="layers", position=0) as layers:
        for layer in layers:
            start = time.perf_counter()
            with tqdm(desc=f"layer {layer} steps", position=1, leave=False, mininterval=0.5) as bar:

                def progress(done, total, bar=bar):
                    bar.total = total
                    bar.update(done - bar.n)

                result = receptive_field.gradient_ascent(
                    model, variables, layer, image_shape=image_shape, progress=progress, **options
                )
            number = layer_number(result.path, paths)
            written = write_layer(
                result, number, _OUTDIR.value, _OBJECTIVE.value, steps=_STEPS.value,
                seed=_SEED.value,
            )  # fmt: skip
            value = (
                ""
                if _OBJECTIVE.value == "kernel"
                else f"mean objective {result.objective.mean():.4g}, "
            )
            tqdm.write(
                f"layer {number} {result.path}: fields {result.fields.shape}, {value}"
                f"{time.perf_counter() - start:.1f} s -> "
                f"{', '.join(map(os.path.basename, written))}"
            )


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "outdir"])
    runtime.run(main)
