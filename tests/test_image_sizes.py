"""No image size is assumed: 28x28 and 64x64 models go through fold, fields, merge and
compress."""

import os

import numpy as np
import pytest
from PIL import Image
from test_merge_helpers import tie_clusters

from graycnn import fold, graph, merge, study
from graycnn import receptive_field as rf
from graycnn.models import build_model
from graycnn.training import data, evaluation, train

pytestmark = pytest.mark.slow  # fold, fields, merge and compress end to end per size


def _resized_npz(tmp_path, sample_npz, size: int) -> str:
    split = data.load_dataset(f"npz:{sample_npz}", "all")
    images = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
            for im in split.images
        ]
    )
    path = str(tmp_path / f"sample{size}.npz")
    np.savez(path, images=images, labels=split.labels)
    return path


@pytest.mark.parametrize("name, size", [("resnet_test", 28), ("densenet_test", 64)])
def test_fold_fields_merge_and_compress_at_any_size(tmp_path, sample_npz, name, size):
    dataset = f"npz:{_resized_npz(tmp_path, sample_npz, size)}"
    config, variables, _ = train.train_and_evaluate(
        train.TrainConfig(model=name, dataset=dataset, epochs=1), str(tmp_path / "color")
    )
    assert config.image_size == size and config.input_shape == (1, size, size, 3)
    model = build_model(config)

    # Fold: the gray model on gray images equals the color model on gray3 images.
    gray = fold.fold_to_gray(model, variables, "sum", input_shape=config.input_shape)
    val = data.load_dataset(dataset, "validation")
    gray_config = config.replace(in_channels=1)
    on_gray = evaluation.evaluate(gray_config, gray, val, "gray")
    on_gray3 = evaluation.evaluate(config, variables, val, "gray3")
    np.testing.assert_array_equal(on_gray["correct"], on_gray3["correct"])

    # Fields have the model's image size.
    fields = rf.gradient_ascent(model, variables, 2, image_shape=(size, size, 3), steps=2)
    assert fields.fields.shape[1:] == (size, size, 3)

    # Merging identical filters keeps the logits.
    g = graph.trace(build_model(gray_config), gray, gray_config.input_shape)
    path = g.conv_order[0]
    width = g.widths[path]
    labels = np.arange(width) % (width - 1)  # the last filter joins filter 0's cluster
    tied = tie_clusters(g, gray, path, labels)
    merged = merge.merge_layer(model, tied, 1, labels, input_shape=gray_config.input_shape)
    images = data.apply_view(val.images[:8], "gray")
    before = build_model(gray_config).apply(tied, images)
    after = graph.rebuild(model, merged, gray_config.input_shape).apply(merged, images)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-4)

    # The whole compress pipeline.
    report = study.compress(
        study.CompressConfig(
            checkpoint=str(tmp_path / "color"),
            dataset=dataset,
            layers=(1,),
            steps=2,
            num_clusters={1: width - 2},
            bn="recalibrate",
            compensate_images=32,  # the default color refit, on fewer images
            controls=False,  # the same code as the merged row's, at the same size
            speed_rounds=1,
            speed_batch=8,
        ),
        str(tmp_path / "compress"),
    )
    assert report["rows"][-1]["clusters"] == {"1": width - 2}
    assert os.path.exists(tmp_path / "compress" / "figures" / "fields_gray_layer1.png")
