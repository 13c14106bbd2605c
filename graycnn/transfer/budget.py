"""--target_flops for transfer: which layers to merge, and to how many clusters, scored
without the color model's head.

compress's search (`graycnn.study.budget.search`) ranks each option (one layer merged
alone to k clusters) by the accuracy lost through the model's head; on the user's task
that head is new and untrained, so it says nothing. Here an option's drop is the
relative error of the features the head reads (its input: a DenseNet's pooled map)
against the unmerged folded model's, on seeded training images, each model's BatchNorm
first recalibrated on the same training batches:

    drop = 100 * ||F_option - F_gray|| / ||F_gray||      (Frobenius, over the images)

It reads no labels and nothing but the training split. The new head is linear in these
features and is trained from them: what a merge keeps of them is what the head can use.
The allocation (greedy, sizes counted on the channel graph) is compress's, with sizes
as fractions of the transfer model's (folded, with the new head).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from graycnn.graph import capture
from graycnn.models import build_model, head_path
from graycnn.study import budget, search_proxy, stages
from graycnn.study.config import CompressConfig
from graycnn.training import data
from graycnn.transfer.config import TransferConfig
from graycnn.transfer.head import find_head

FEATURE_IMAGES = 512


def plan_merges(config: TransferConfig, model: stages.Model, train: data.Split) -> budget.Plan:
    """The merges that bring `model` to `config.target_flops` of its FLOPs.

    Args:
        model: The transfer model (the folded gray model with the new head).
        train: The user's training split, the only data read.

    Raises:
        ValueError: a target the narrowest merges cannot reach (before any measurement).
    """
    targets = () if config.target_flops is None else (config.target_flops,)
    # Any count (round_to=1): what the digits runs in docs/results.md measured.
    # The additive allocation: the digits runs measured it ('checked' was chosen on
    # compress's accuracy score, not on transfer's feature score).
    search = CompressConfig(
        target_flops=targets, seed=config.seed, steps=1, round_to=1, allocation="additive"
    )
    score = feature_score(model, train, config.seed)
    [plan] = budget.search(search, model, model, train, score=score)
    return plan


def feature_score(
    model: stages.Model, train: data.Split, seed: int, count: int = FEATURE_IMAGES
) -> Callable[[Any], float]:
    """variables (in `model`'s shapes) -> 1 - the relative error of the head's input
    against `model`'s own, on `count` seeded training images (gray view), after an
    8-batch BatchNorm recalibration on training images (as compress's search).

    The features (N, ...) are the input of the classifier head (`head_path`, else the
    one `find_head` traces); the unmerged model scores 1.
    """
    head = head_path(model.config.name) or find_head(
        build_model(model.config), model.variables, model.config.input_shape
    )
    idx = np.random.default_rng(seed).permutation(len(train))[:count]
    images = data.apply_view(train.images[idx], "gray")
    features = _head_input(build_model(model.config), head)
    batch = min(stages.SEARCH_BN_BATCH, len(train))  # transfer trains on >= --batch_size

    def read(variables: Any) -> np.ndarray:
        variables = search_proxy.recalibrated(
            model.config, variables, train, seed, batch_size=batch
        )
        return np.asarray(features(variables, images), np.float64)

    reference = read(model.variables)
    norm = max(float(np.linalg.norm(reference)), 1e-12)  # all-zero features: a dead model

    def score(variables: Any) -> float:
        return 1.0 - float(np.linalg.norm(read(variables) - reference)) / norm

    return score


@functools.lru_cache(maxsize=8)
def _head_input(model: Any, path: str) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted f(variables, images) -> the first argument of the module at `path`,
    inference mode (cached: every option runs the program compiled for the first)."""

    def features(variables: Any, images: jax.Array) -> jax.Array:
        return capture.capture(model, variables, images, {path}, stop=path)[path].args[0]

    return jax.jit(features)
