"""A cheaper score for the budget search (--search_images): fewer images, a smoother
measure.

The default search scores an option by its selection accuracy (500 images) after an
8-batch BatchNorm recalibration. `divergence_score` reads `images` selection images and
recalibrates on proportionally fewer batches, and scores the merged model by how far its
predictions move from the unmerged gray model's on those images (the mean KL divergence,
no labels): a continuous measure, so a few images still rank options where accuracy
would move by whole images. The images still come from the selection split carved from
the training data; validation is never read.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graycnn.models import ModelConfig, build_model
from graycnn.study.inputs import SEARCH_BN_BATCH
from graycnn.training import bn_reestimate, data, transforms

SELECTION_PER_CLASS = 50  # the default score's selection images a class
FULL_IMAGES = 500  # the default score's selection images (50 a class on CIFAR-10)
FULL_BATCHES = 8  # and its BatchNorm recalibration batches


def per_class(images: int, train: data.Split) -> int:
    """Selection images per class for --search_images=`images` (0: the default 50)."""
    return -(-images // train.num_classes) if images else SELECTION_PER_CLASS


def search_score(
    config: Any, gray: Any, train: data.Split, selection: data.Split, accuracy: Callable
) -> Callable[[Any], float]:
    """The search's default score: `accuracy(gray.config, train, selection, seed,
    variables)` (budget._accuracy), or with --search_images the `divergence_score` from
    `gray`'s own predictions on `selection`."""
    if not config.search_images:
        return functools.partial(accuracy, gray.config, train, selection, config.seed)
    return divergence_score(gray.config, gray.variables, train, selection, config.seed)


def recalibrated(
    model_config: ModelConfig, variables: Any, train: data.Split, seed: int,
    batches: int = FULL_BATCHES, batch_size: int = SEARCH_BN_BATCH,
) -> Any:  # fmt: skip
    """`variables` with BatchNorm statistics recalibrated on `batches` seeded gray training
    batches: every search score's first step (the same batches for every option)."""
    return bn_reestimate.recalibrate(
        model_config, variables, train, "gray", num_batches=batches, batch_size=batch_size,
        seed=seed,
    )  # fmt: skip


def bn_batches(images: int) -> int:
    """Recalibration batches for a score on `images` images: the default's 8 batches per
    500 images, at least 1."""
    return max(1, round(FULL_BATCHES * images / FULL_IMAGES))


def divergence_score(
    model_config: ModelConfig,
    reference: Any,
    train: data.Split,
    selection: data.Split,
    seed: int,
) -> Callable[[Any], float]:
    """variables (in `model_config`'s shapes) -> -(mean KL divergence of their softmax
    from `reference`'s) on `selection`, each after the same `bn_batches(len(selection))`
    -batch BatchNorm recalibration on `train`.

    Args:
        reference: The unmerged gray model's variables (recalibrated alike).
        selection: (N, H, W, C) images, N >= 1, carved from the training split.

    Returns:
        The score; an option's drop is then 100 x the KL it adds (nats).
    """
    logits_of = _logits_fn(model_config)
    images = selection.images

    batches = bn_batches(len(images))
    # The reference recalibrated alike: the few batches' noise is then common to both
    # sides, and the unmerged model's own divergence is 0.
    target = jax.nn.log_softmax(
        logits_of(recalibrated(model_config, reference, train, seed, batches), images), -1
    )

    def score(variables: Any) -> float:
        variables = recalibrated(model_config, variables, train, seed, batches)
        return -float(kl_divergence(target, logits_of(variables, images)))

    return score


def kl_divergence(target_log_probs: jax.Array, logits: jax.Array) -> jax.Array:
    """Mean over rows of KL(target || softmax(logits)); (N, classes) each, in nats."""
    log_probs = jax.nn.log_softmax(logits, -1)
    return jnp.mean(jnp.sum(jnp.exp(target_log_probs) * (target_log_probs - log_probs), -1))


def _logits_fn(model_config: ModelConfig) -> Callable[[Any, np.ndarray], jax.Array]:
    """(variables, (N, H, W, C) images) -> (N, classes) logits of the gray view."""
    model = build_model(model_config, eval_step=True)

    @jax.jit
    def logits_of(variables, images):
        return model.apply(variables, transforms.apply_view(images, "gray"), train=False)

    return lambda variables, images: logits_of(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}, images
    )
