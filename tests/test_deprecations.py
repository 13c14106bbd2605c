"""Public names that moved keep working for a release, with a warning naming their home."""

import importlib

import jax
import numpy as np
import pytest

from graycnn import fold, graph, merge

# Every name graycnn.merge exported before the channel graph (graycnn.graph) and the fold
# (graycnn.fold) left it, and where each lives now: written out here, not read from the
# module under test.
MOVED = [
    ("count_flops", graph.count_flops),
    ("rebuild", graph.rebuild),
    ("Rebuilt", graph.Rebuilt),
    ("widths_of", graph.widths_of),
    ("ChannelGraph", graph.ChannelGraph),
    ("Segment", graph.Segment),
    ("Use", graph.Use),
    ("check_variables", graph.check_variables),
    ("trace_channels", graph.trace),
    ("fold_to_gray", fold.fold_to_gray),
    ("fit_gray_coefficients", fold.fit_gray_coefficients),
    ("input_transform", fold.input_transform),
    ("FOLD_METHODS", fold.METHODS),
    ("LUMA_WEIGHTS", fold.LUMA_WEIGHTS),
]


@pytest.mark.parametrize("name, now", MOVED)
def test_a_moved_name_still_works_and_says_where_it_went(name, now):
    with pytest.warns(DeprecationWarning, match=rf"graycnn\.merge\.{name} moved to graycnn\."):
        got = getattr(importlib.import_module("graycnn.merge"), name)
    assert got is now


def test_the_old_import_form_works():
    with pytest.warns(DeprecationWarning, match="moved to graycnn.fold.fold_to_gray"):
        from graycnn.merge import fold_to_gray  # noqa: F401


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fold_to_grey'"):
        merge.fold_to_grey  # noqa: B018
    assert "fold_to_gray" not in merge.__all__  # not advertised as current API


# Every module that left the top of graycnn for training/, study/ or cli/, and its home,
# written out here.
MOVED_MODULES = [
    ("data", "graycnn.training.data"),
    ("train", "graycnn.training.train"),
    ("evaluation", "graycnn.training.evaluation"),
    ("checkpoint", "graycnn.training.checkpoint"),
    ("parallel", "graycnn.training.parallel"),
    ("batchnorm", "graycnn.training.bn_reestimate"),
    ("compress", "graycnn.study"),
    ("baselines", "graycnn.study.baselines"),
    ("controls", "graycnn.study.controls"),
    ("stats", "graycnn.study.stats"),
    ("figures", "graycnn.study.figures"),
    ("runtime", "graycnn.cli.runtime"),
    ("workdir", "graycnn.cli.workdir"),
]


@pytest.mark.parametrize("name, home", MOVED_MODULES)
def test_moved_modules_import_from_graycnn_with_a_warning(name, home):
    graycnn = importlib.import_module("graycnn")
    with pytest.warns(DeprecationWarning, match=f"graycnn.{name} moved to {home}"):
        module = getattr(graycnn, name)
    assert module is importlib.import_module(home)
    with pytest.warns(DeprecationWarning):
        exec(f"from graycnn import {name} as _m", {})


def test_public_api_is_the_library_and_unknown_names_fail():
    graycnn = importlib.import_module("graycnn")
    assert graycnn.fold_to_gray is fold.fold_to_gray
    assert graycnn.merge_layer is merge.merge_layer
    assert graycnn.trace is graph.trace
    assert graycnn.cluster is importlib.import_module("graycnn.cluster")
    for name in graycnn.__all__:
        assert getattr(graycnn, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        graycnn.nope  # noqa: B018


def test_gradient_ascents_old_input_shape_still_works_with_a_warning():
    from graycnn.models import ModelConfig, build_model, init_variables
    from graycnn.receptive_field import gradient_ascent

    config = ModelConfig("densenet_test")
    model, variables = build_model(config), init_variables(config, jax.random.key(0))
    new = gradient_ascent(model, variables, 2, image_shape=(32, 32, 3), steps=1, filters=[0])
    with pytest.warns(DeprecationWarning, match="input_shape=\\(H, W, C\\)\\) is now image_shape"):
        old = gradient_ascent(model, variables, 2, input_shape=(32, 32, 3), steps=1, filters=[0])
    np.testing.assert_array_equal(old.fields, new.fields)
    with pytest.raises(ValueError, match="image_shape \\(H, W, C\\) .* is required"):
        gradient_ascent(model, variables, 2, steps=1)


def test_the_public_api_loads_on_first_use_and_lists_every_name():
    graycnn = importlib.import_module("graycnn")
    assert sorted(graycnn.__all__) == sorted([*graycnn._API, *graycnn._PACKAGES])
    assert graycnn.deploy is importlib.import_module("graycnn.deploy")
    assert (
        graycnn.compensate_merge is importlib.import_module("graycnn.compensate").compensate_merge
    )
