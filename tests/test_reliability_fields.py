"""Hostile input to receptive fields, distances and visualize (issue 33).

Each case names the argument or flag at fault in one line, before any long work, instead
of NaN fields, a ZeroDivisionError, an out-of-memory blur kernel or a silently rounded
number.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_receptive_field import _random_variables

from graycnn import checkpoint
from graycnn.models import ModelConfig, build_model
from graycnn.receptive_field import gradient_ascent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "graycnn", "assets", "densenet_tiny_color")
HWC = (32, 32, 3)


@pytest.fixture(scope="module")
def densenet():
    config = ModelConfig("densenet_test")
    return build_model(config), _random_variables(config, 0)


# (argument, value, the message's rule): every one is refused before any compile.
NUMBERS = [
    ("step_size", float("inf"), "step_size must be a finite number > 0, got inf"),
    ("step_size", float("nan"), "step_size must be a finite number > 0, got nan"),
    ("step_size", 0.0, "step_size must be a finite number > 0, got 0.0"),
    ("blur_sigma", float("nan"), r"blur_sigma must be a finite number in \[0, 32\]"),
    ("blur_sigma", 1e9, r"blur_sigma must be a finite number in \[0, 32\].*got 1000000000.0"),
    ("blur_sigma", -1.0, r"blur_sigma must be a finite number in \[0, 32\]"),
    ("tv_weight", float("inf"), "tv_weight must be a finite number >= 0, got inf"),
    ("tv_weight", -0.5, "tv_weight must be a finite number >= 0, got -0.5"),
    ("noise_scale", float("nan"), "noise_scale must be a finite number >= 0, got nan"),
    ("noise_offset", float("-inf"), "noise_offset must be a finite number, got -inf"),
    ("steps", float("nan"), r"steps must be an integer in 0..2147483647, got nan"),
    ("steps", 2**31, r"steps must be an integer in 0..2147483647, got 2147483648"),
    ("steps", 2.5, r"steps must be an integer in 0..2147483647, got 2.5"),
    ("seed", -1, r"seed must be an integer in 0..2147483647, got -1"),
    ("jitter", 10**9, r"jitter must be an integer in 0..32 .*got 1000000000"),
    ("jitter", True, r"jitter must be an integer in 0..32 .*got True"),
    ("chunk_size", 0, "chunk_size must be an integer >= 1, got 0"),
    ("chunk_size", -3, "chunk_size must be an integer >= 1, got -3"),
    ("memory_bytes", 0, "memory_bytes must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize(
    "name, value, match", NUMBERS, ids=[f"{name}_{value!r}" for name, value, _ in NUMBERS]
)
def test_bad_numbers_are_refused_naming_the_argument(densenet, name, value, match):
    model, variables = densenet
    with pytest.raises(ValueError, match=match):
        gradient_ascent(model, variables, 2, input_shape=HWC, **{"steps": 2, name: value})


def test_empty_filters_and_devices_are_refused(densenet):
    model, variables = densenet
    with pytest.raises(
        ValueError, match=r"filters must be a non-empty list of indices in \[0, 4\)"
    ):
        gradient_ascent(model, variables, 2, input_shape=HWC, filters=[])
    with pytest.raises(ValueError, match="filters must be integer indices of block1/layer1/conv"):
        gradient_ascent(model, variables, 2, input_shape=HWC, filters=[1.7])  # was filter 1
    with pytest.raises(ValueError, match="devices: give at least one device"):
        gradient_ascent(model, variables, 2, input_shape=HWC, devices=[])


def test_nan_weights_are_refused_naming_the_leaf(densenet):
    model, variables = densenet
    bad = jax.tree.map(np.array, variables)
    bad["params"]["block1"]["layer1"]["conv"]["kernel"][0, 0, 0, 2] = np.nan
    with pytest.raises(ValueError, match="variables: params/block1/layer1/conv/kernel holds NaN"):
        gradient_ascent(model, bad, 2, input_shape=HWC, steps=1)
    bad = jax.tree.map(jnp.asarray, variables)  # jax.Arrays too
    bn = bad["batch_stats"]["block1"]["layer1"]["bn"]
    bn["var"] = bn["var"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match="variables: batch_stats/block1/layer1/bn/var holds NaN"):
        gradient_ascent(model, bad, 2, input_shape=HWC, steps=1)


def test_a_diverging_ascent_names_the_layer_and_filters(densenet):
    model, variables = densenet
    # Finite, but the first step throws the images to ~1e38, past float32 in the next.
    with pytest.raises(
        ValueError,
        match=r"ascent at layer block1/layer1/conv diverged to NaN or inf for filters 3, 1; "
        r"use a smaller step_size \(now 1e\+38\) or fewer steps",
    ):
        gradient_ascent(
            model, variables, 2, input_shape=HWC, steps=3, step_size=1e38, filters=[3, 1]
        )
    # The same start climbs with the default step: finite, so no error.
    result = gradient_ascent(model, variables, 2, input_shape=HWC, steps=3, filters=[3, 1])
    assert np.all(np.isfinite(result.images)) and np.all(np.isfinite(result.objective))


def test_input_shapes_the_model_cannot_take_name_input_shape(densenet):
    model, variables = densenet
    # densenet_test halves the image in 3 transitions: 4x4 -> 2 -> 1 -> 0 (was a TypeError
    # from lax.reduce_window).
    with pytest.raises(
        ValueError,
        match=r"input_shape \(4, 4, 3\) is too small .* reduce the 4x4 image to 0x0 \(at "
        r"transition3\), and head fails",
    ):
        gradient_ascent(model, variables, 2, input_shape=(4, 4, 3), steps=1)
    # 1 channel for 3-channel kernels (was flax's ScopeParamShapeError).
    with pytest.raises(
        ValueError,
        match=r"input_shape \(32, 32, 1\) does not fit the model's variables: .* "
        r"params/stem/kernel is \(3, 3, 3, 8\), the model makes \(3, 3, 1, 8\)",
    ):
        gradient_ascent(model, variables, 2, input_shape=(32, 32, 1), steps=1)
    for shape in [(0, 32, 3), (32, 32), (32.5, 32, 3)]:
        with pytest.raises(ValueError, match=r"input_shape must be \(H, W, C\)"):
            gradient_ascent(model, variables, 2, input_shape=shape, steps=1)
    # The smallest size the head takes (16 -> 2x2) still works.
    small = gradient_ascent(model, variables, 2, input_shape=(16, 16, 3), steps=1, filters=[0])
    assert small.fields.shape == (1, 16, 16, 3) and np.isfinite(small.objective).all()


def _visualize(tmp_path, *flags: str, checkpoint: str = CHECKPOINT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.visualize", f"--checkpoint={checkpoint}",
         "--layers=2", f"--outdir={tmp_path / 'out'}", "--steps=2", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "flag, message",
    [
        # ZeroDivisionError traceback.
        ("--chunk_size=0", "error: --chunk_size must be an integer >= 1, got 0"),
        # A Gaussian kernel of 4e9 taps: out of memory.
        (
            "--blur_sigma=1e9",
            "error: --blur_sigma must be a finite number in [0, 32] (pixels: a wider blur "
            "flattens every 32x32 field), got 1000000000.0",
        ),
        # The error was printed inside the progress bar, which was redrawn after it.
        ("--step_size=-1", "error: --step_size must be a finite number > 0, got -1.0"),
    ],
    ids=["chunk_size_0", "blur_sigma_1e9", "step_size_-1"],
)
def test_visualize_refuses_bad_flags_before_any_work(tmp_path, flag, message):
    result = _visualize(tmp_path, flag)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == message
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out")  # checked before --outdir is made


def test_visualize_error_mid_run_is_the_last_line(densenet, tmp_path):
    # A diverging ascent fails while the bars are drawn; they close before the error.
    # (densenet_test: 4 filters at layer 2 compile faster than densenet_tiny's 18.)
    ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), ModelConfig("densenet_test"), densenet[1])
    result = _visualize(tmp_path, "--step_size=1e38", checkpoint=ckpt)
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: the gradient ascent at layer block1/layer1/conv diverged")
    assert "use a smaller step_size (now 1e+38) or fewer steps" in last
    assert not os.path.exists(tmp_path / "out")  # the empty --outdir is removed
