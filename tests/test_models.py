import jax
import jax.numpy as jnp
import pytest

from graycnn.layers import conv_layers, layer_output_fn, resolve_layer
from graycnn.models import MODELS, TEST_MODELS, ModelConfig, build_model, count_params


def _shapes(config):
    model = build_model(config)
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(config.input_shape))


@pytest.mark.parametrize("name", sorted(MODELS) + sorted(TEST_MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_model_maps_images_to_logits(name, in_channels):
    config = ModelConfig(name, in_channels=in_channels)
    model, variables = _shapes(config)
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, in_channels)))
    assert logits.shape == (2, 10)
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize(
    "in_channels, widths, expected",
    [
        (3, {}, 995_230),  # the study's model.summary(), BN statistics included
        (1, {}, 994_582),
        (1, {"stem": 21}, 964_237),  # the study's layer-1 merged model
        (1, {"stem": 20, "block1/layer1/conv": 12}, 950_046),  # layers 1+2 merged
    ],
)
def test_densenet_seed_parameter_counts(in_channels, widths, expected):
    _, variables = _shapes(ModelConfig("densenet_seed", in_channels=in_channels, widths=widths))
    assert count_params(variables) == expected


def test_conv_layers_are_numbered_in_forward_order():
    config = ModelConfig("densenet_seed")
    paths = conv_layers(build_model(config), config.input_shape)
    assert len(paths) == 1 + 48 + 3 + 1
    assert paths[0] == "stem" and paths[1] == "block1/layer1/conv"
    assert paths[12] == "block1/layer12/conv" and paths[13] == "transition1/conv"
    assert paths[-1] == "head/conv"
    assert resolve_layer(2, paths) == resolve_layer("params/block1/layer1/conv/kernel", paths)
    with pytest.raises(ValueError, match="layer 54 does not exist.*1..53"):
        resolve_layer(54, paths)
    with pytest.raises(ValueError, match="'block9' is not a conv layer"):
        resolve_layer("block9", paths)


def test_width_override_changes_only_that_conv():
    config = ModelConfig("densenet_test", widths={"stem": 5})
    model, variables = _shapes(config)
    assert variables["params"]["stem"]["kernel"].shape == (3, 3, 3, 5)
    assert variables["params"]["block1"]["layer1"]["conv"]["kernel"].shape == (3, 3, 5, 4)
    out = jax.eval_shape(layer_output_fn(model, "stem"), variables, jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 32, 32, 5)


def test_unknown_model_and_bad_channels():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*densenet_seed"):
        ModelConfig("vgg")
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        ModelConfig("resnet20", in_channels=2)
