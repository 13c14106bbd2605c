"""Tests for graycnn.graph.flops: FLOPs per layer against hand counts."""

import jax
import numpy as np
from test_merge_helpers import any_model

from graycnn import fold, graph, merge
from graycnn.layers import conv_layers


def test_vgg_flops_by_hand_before_and_after_a_merge():
    model, variables, shape = any_model("vgg")
    # 2 x multiply-accumulates: outputs x taps x input channels.
    conv1 = 2 * (8 * 8 * 6) * (3 * 3 * 3)
    conv2 = 2 * (4 * 4 * 5) * (3 * 3 * 6)
    fc1, fc2 = 2 * 7 * 80, 2 * 3 * 7
    flops = graph.count_flops(model, variables, shape)
    assert flops["per_layer"] == {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": fc2}
    assert flops["total"] == conv1 + conv2 + fc1 + fc2 == 30_538
    merged = merge.merge_layer(model, variables, "conv1", [0, 1, 1, 2, 3, 3], input_shape=shape)
    after = graph.count_flops(model, merged, shape)["per_layer"]
    assert after["conv1"] == conv1 * 4 // 6 and after["conv2"] == conv2 * 4 // 6
    assert after["fc1"] == fc1
    # The batch size of input_shape does not matter: one image is counted.
    assert graph.count_flops(model, variables, (16, 8, 8, 3)) == flops


def test_densenet_flops_per_layer_and_shapes_only():
    model, variables, shape = any_model("densenet_tiny")
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    flops = graph.count_flops(model, shapes, shape)
    assert list(flops["per_layer"]) == conv_layers(model, shape)
    assert flops["per_layer"]["stem"] == 2 * 32 * 32 * 36 * 27
    # Layer 3 of block 1 reads stem + 2 layers = 72 channels at 32x32.
    assert flops["per_layer"]["block1/layer3/conv"] == 2 * 32 * 32 * 18 * 9 * 72
    # The head: a 2x2 valid conv on 2x2 maps of transition 3 + 3 layers = 72 channels.
    assert flops["per_layer"]["head/conv"] == 2 * 10 * (2 * 2) * 72
    gray = fold.fold_to_gray(model, variables, "sum", input_shape=shape)
    merged = merge.merge_layer(model, gray, 1, np.arange(36) % 21, input_shape=(1, 32, 32, 1))
    after = graph.count_flops(model, merged, (1, 32, 32, 1))
    assert after["per_layer"]["stem"] == 2 * 32 * 32 * 21 * 9
    saved = 2 * 32 * 32 * 15 * (18 * 9 * 3 + 18)  # 3 dense layers and transition 1
    assert (
        flops["total"] - after["total"]
        == flops["per_layer"]["stem"] - after["per_layer"]["stem"] + saved
    )
