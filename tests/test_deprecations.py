"""Public names that moved keep working for a release, with a warning naming their home."""

import importlib

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
