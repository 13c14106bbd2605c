"""The settings of one compress run, each declared once (flags are made from them), and
the presets that set several at once."""

import dataclasses
import numbers
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from graycnn import cluster, distance, fold, merge
from graycnn import config as config_lib
from graycnn import receptive_field as rf
from graycnn.config import PerLayer, setting
from graycnn.models import check_name
from graycnn.training import bn_reestimate, train
from graycnn.training.data import DATASET_HELP

# Besides the receptive-field objectives: cluster each filter's responses to real images
# ('activation'), or pairs by how much merging them changes the output ('fisher').
ACTIVATION = "activation"
FISHER = "fisher"
OBJECTIVES = (*rf.OBJECTIVES, ACTIVATION, FISHER)
# The objectives computed on real images, which give the receptive-field figures 'center'.
ON_IMAGES = (ACTIVATION, FISHER)
FIELDS = ("gray", "color_luma")
CONTROLS = ("random", "prune_l1")
TARGETS = ("flops", "params", "latency")
ALLOCATIONS = ("checked", "additive", "measured", "floor")
# --allocation's default: above 'additive' against the bar on three color models at
# --target_flops=0.5, keeping its lead over L1 pruning (docs/results.md, the lever rows).
ALLOCATION = "checked"
# --round_to's default with a --target_*: on CPU, widths in multiples of 4 ran nearer the
# FLOPs cut at 0.5 of the FLOPs than free counts (docs/results.md, "Speed and shipping").
ROUND_TO = 4
COMPENSATIONS = ("auto", "none", "lstsq", "lstsq_color")


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """One compress run. Per-layer settings are `PerLayer` values (`VALUE,LAYER:VALUE`).

    The defaults are the command's defaults: `compress(CompressConfig(), workdir)` runs
    what `python -m experiments.compress` runs.
    """

    preset: str = setting(
        "",
        "Set several flags at once ('study': the study's exact method); flags given "
        "explicitly still win.",
        choices=("", "study"),
    )
    checkpoint: str | None = setting(
        None, "Color model; default: the shipped pretrained --model, or train one."
    )
    model: str = setting("densenet_tiny", "Model to train when no checkpoint is given or shipped.")
    dataset: str = setting("cifar10_sample", DATASET_HELP)
    eval_dataset: str = setting(
        "test",
        "Held-out data every row is also evaluated on, all of it: 'test' (the dataset's "
        "own test split, if it has one), 'none', or a dataset name (e.g. npz:PATH). No "
        "choice is ever made on it: one sharing images with --dataset's train or "
        "validation split is refused.",
    )
    train_epochs: int = setting(40, "Epochs when the color model is trained.")
    layers: tuple[int, ...] = setting((1, 2), "Conv layers to merge, in order.")
    fold: str = setting("sum", "RGB-to-gray fold of layer 1.", choices=fold.METHODS)
    objective: PerLayer = setting(
        PerLayer(ACTIVATION),
        "What is compared per layer: receptive fields ('mean', 'center'), the kernels "
        "('kernel', layer 1), the filters' responses to real images ('activation'), or "
        "each pair by the first-order change of the predictions merging it makes on "
        "them ('fisher', which sets the distances itself: --metric is not used).",
        choices=OBJECTIVES,
    )
    fields: str = setting(
        "gray",
        "Whose receptive fields are compared: the model being merged ('gray') or the "
        "color model's, converted to luma ('color_luma', the study).",
        choices=FIELDS,
    )
    steps: int = setting(100, "Gradient-ascent steps of the receptive fields.")
    metric: PerLayer = setting(
        PerLayer("correlation"),
        "Distance per layer; without a value for a layer, the study's: mse for layer 1, "
        "imed after.",
        choices=tuple(distance.METRICS),
    )
    cluster: str = setting("complete", "Clustering.", choices=cluster.METHODS)
    num_clusters: PerLayer = setting(
        PerLayer.of_dict({1: 20, 2: 12}),
        "Target clusters per layer (default: the study's counts); a layer without one "
        "(every layer, given an empty value) uses DBSCAN with --eps_std.",
        item=int,
    )
    eps_std: float = setting(0.2, "DBSCAN eps in std of the distances (the study).")
    bn_rule: str = setting(
        "moments", "How a cluster's BatchNorm vectors merge (the study: mean).",
        choices=merge.BN_RULES,
    )  # fmt: skip
    compensate: str = setting(
        "auto",
        "After each merge, refit every consumer of the merged channels on training "
        "images to its outputs before the merge ('lstsq'), or to the color model's on "
        "the same images in color ('lstsq_color'), or not ('none'). 'auto': "
        "lstsq_color, except none with a --target_* and no --finetune_epochs.",
        choices=COMPENSATIONS,
    )
    compensate_images: int = setting(
        512, "Training images (seeded, gray) each --compensate refit is fit on.",
    )  # fmt: skip
    bn: str = setting("train", "BN re-estimation of every gray row.", choices=bn_reestimate.METHODS)
    bn_epochs: int = setting(1, "Epochs of BN-only training for --bn=train.")
    bn_lr: float = setting(
        0.1, "SGD learning rate (momentum 0.7) of --bn=train (the study: 0.01; 0.1 chosen "
        "on validation, docs/results.md).",
    )  # fmt: skip
    bn_loss: str = setting(
        "ce", "Loss of --bn=train: 'ce' the labels (the study); 'kd' distills the color "
        "model's softened predictions on the matching color images (plus the labels).",
        choices=train.LOSSES,
    )  # fmt: skip
    finetune_epochs: int = setting(
        0, "Also a fine-tune budget: every model (baseline included) trained this many "
        "epochs on gray images after BN re-estimation; 0: none.",
    )  # fmt: skip
    finetune: str = setting(
        "kd", "Fine-tune loss: 'kd' distills the color model; 'ce' uses the labels only.",
        choices=train.LOSSES,
    )  # fmt: skip
    finetune_lr: float = setting(0.01, "Fine-tune SGD learning rate (momentum 0.9).")
    target_flops: tuple[float, ...] = setting(
        (), "Pick layers and cluster counts to reach this fraction of the color model's "
        "FLOPs (none: use --layers and --num_clusters); a list (0.7,0.5) is a sweep: one "
        "search, one plan and merged model (with its controls) per fraction.",
    )  # fmt: skip
    target_params: tuple[float, ...] = setting(
        (), "As --target_flops, for fractions of the color model's parameters.",
    )  # fmt: skip
    target_latency: tuple[float, ...] = setting(
        (), "As --target_flops, for this fraction of the gray model's latency at "
        "--speed_batch, measured on this device (each layer's option timed; candidate "
        "plans, every --target_flops plan near it among them, timed whole); one value.",
    )  # fmt: skip
    round_to: int = setting(
        0, "With --target_*: the cluster counts the search tries are multiples of this "
        "(widths the hardware's vector units divide); 1: any count; 0: 4 (faster per "
        "FLOP cut on CPU, docs/results.md).",
    )  # fmt: skip
    allocation: str = setting(
        ALLOCATION, "With --target_flops or --target_params: 'checked' makes the "
        "additive plan, measures it whole and each planned layer's share of its drop, and "
        "plans again on those shares (3 plans at most, the least loss kept); 'additive' "
        "plans on each option's drop, added across layers; 'measured' picks each greedy "
        "step among the 4 cheapest by the drop of the whole plan it makes, measured; "
        "'floor' plans additively on each drop taken as at least the selection split's "
        "noise (the RMS of the drops measured below 0), so few layers are cut deeper.",
        choices=ALLOCATIONS,
    )  # fmt: skip
    search_images: int = setting(
        0, "With --target_*: score each option of the search on this many selection "
        "images (training data) by the KL divergence of its predictions from the unmerged "
        "gray model's, after a BN recalibration on proportionally fewer batches (a "
        "cheaper search for large models); 0: the selection accuracy on 500 images.",
    )  # fmt: skip
    controls: bool = setting(
        True, "Add a random-partition and an L1-pruning row at the same widths for every "
        "merged row.",
    )  # fmt: skip
    scratch_epochs: int = setting(
        0, "Also train every merged model's exact widths from scratch on gray images for "
        "this many epochs (the 'scratch' control, Scratch-B of Liu et al. 2019: give the "
        "color model's, 40 for the shipped densenet_tiny, 15 for densenet_seed), compared "
        "with the merge in the last budget; 0: none.",
    )  # fmt: skip
    seeds: int = setting(
        1, "Repeat every stochastic stage (field noise, random control, BN data order) "
        "this many times; rows report the mean, and the CIs cover the seeds.",
    )  # fmt: skip
    seed: int = setting(0, "Seed of every random choice (the first of --seeds).")
    speed_rounds: int = setting(
        5, "Interleaved rounds timing every row's model on one device (their median is "
        "reported); 0: no speed table.",
    )  # fmt: skip
    speed_batch: int = setting(128, "Batch size of the timed throughput, besides batch 1.")
    export: bool = setting(
        False, "Also export the last merged row's model (StableHLO, TFLite, signature.json), "
        "each checked on 256 validation images, to WORKDIR/export/ (python -m "
        "experiments.export does any checkpoint).",
    )  # fmt: skip
    data_dir: str | None = setting(None, "TFDS data directory.")

    def __post_init__(self):
        for kind in TARGETS:  # what Python callers write: one fraction (0: none), or a list
            value = getattr(self, f"target_{kind}")
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
                value = tuple(_fraction(f"--target_{kind}", v) for v in value)
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                value = (value,) if value else ()
            object.__setattr__(self, f"target_{kind}", value)
        config_lib.coerce(self)

    def objective_of(self, layer: int) -> str:
        return self.objective.of(layer)

    def metric_of(self, layer: int) -> str:
        # The study: MSE for layer 1 (brightness), IMED for later (patterns).
        return self.metric.of(layer, "mse" if layer == 1 else "imed")

    @property
    def target(self) -> bool:
        """Whether a budget search picks the layers (a --target_* flag)."""
        return bool(self.target_flops or self.target_params or self.target_latency)

    @property
    def rounding(self) -> int:
        """The multiple the search's counts are rounded to: --round_to, or for 0 (the
        default) ROUND_TO with a --target_*, else 1 (any count)."""
        return self.round_to or (ROUND_TO if self.target else 1)

    @property
    def compensation(self) -> str:
        """The refit each merge gets: --compensate, or for 'auto' (the default)
        `compensation_of`'s."""
        return compensation_of(self.compensate, self.target, self.finetune_epochs)

    def targets_of(self) -> tuple[str, tuple[float, ...]]:
        """('flops', 'params' or 'latency', its fractions in the order given) of the
        run's --target_* flag; several fractions are a sweep (one plan each)."""
        for kind in TARGETS:
            if getattr(self, f"target_{kind}"):
                return kind, tuple(getattr(self, f"target_{kind}"))
        raise ValueError("no --target_flops, --target_params or --target_latency given")

    @property
    def budgets(self) -> tuple[str, ...]:
        """The recovery budgets every model gets: BN re-estimation, and fine-tuning."""
        return ("bn", "finetune") if self.finetune_epochs > 0 else ("bn",)


def compensation_of(compensate: str, target: bool, finetune_epochs: int) -> str:
    """--compensate as a run uses it: 'auto' is lstsq_color, except 'none' with a
    --target_* and no fine-tuning. Chosen on validation (docs/results.md, the levers):
    the color refit lifts the merge at the default command's layers and after a target's
    fine-tune, while at a target's BN budget it lifts L1 pruning as much as the merge,
    whose lead over it (+1.3 points at 0.5 of the FLOPs) the goal asks for."""
    if compensate != "auto":
        return compensate
    return "none" if target and not finetune_epochs else "lstsq_color"


def study_preset(layers: Sequence[int]) -> dict[str, Any]:
    """The study's method: the color model's `mean` fields in luma, MSE for layer 1 and
    IMED after, DBSCAN (min_samples=1) searched to its counts (21 for layer 1 alone,
    20 + 12 for layers 1 and 2), BN vectors averaged, one BN-only epoch of SGD (lr 0.01,
    momentum 0.7)."""
    counts = {1: 21} if tuple(layers) == (1,) else {1: 20, 2: 12}
    return {
        "fields": "color_luma",
        "objective": PerLayer("mean"),
        "metric": PerLayer.of_dict({1: "mse"} if 1 in layers else {}, default="imed"),
        "cluster": "dbscan",
        "num_clusters": PerLayer.of_dict(counts).only(layers),
        "bn_rule": "mean",
        "compensate": "none",
        "bn": "train",
        "bn_epochs": 1,
        "bn_lr": 0.01,
    }


PRESETS = {"study": study_preset}


def with_preset(config: CompressConfig, given: Sequence[str] = ()) -> CompressConfig:
    """`config` with its preset's settings, except the fields named in `given` (set
    explicitly by the user), which win."""
    if not config.preset:
        return config
    values = PRESETS[config.preset](config.layers)
    return dataclasses.replace(config, **{k: v for k, v in values.items() if k not in given})


_FIELDS = {f.name: f for f in dataclasses.fields(CompressConfig)}


# The numeric settings, each with its lowest allowed value. Every int and float field of
# CompressConfig is here (tests check it): an int is at most 2**31 - 1, as the seeds,
# step counters and sizes it becomes are 32-bit; a float must be finite.
INT32_MAX = 2**31 - 1
INT_LOWS = {
    "train_epochs": 1, "steps": 1, "compensate_images": 1, "bn_epochs": 1,
    "finetune_epochs": 0, "scratch_epochs": 0, "seeds": 1, "seed": 0, "speed_rounds": 0,
    "speed_batch": 1, "round_to": 0, "search_images": 0,
}  # fmt: skip
# `config.check_number`'s rule of each float setting (target_*: `_check_targets`).
FLOAT_RULES: dict[str, dict[str, Any]] = {
    "eps_std": {"positive": True}, "finetune_lr": {"low": 0}, "bn_lr": {"positive": True},
}  # fmt: skip


def _check_int(flag: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{flag} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")
    if value > INT32_MAX:
        raise ValueError(f"{flag} must be <= {INT32_MAX} (a 32-bit integer), got {value}")


def _check_numbers(config: CompressConfig) -> None:
    """Every numeric setting in its range (`INT_LOWS`, `FLOAT_RULES`); raises ValueError
    naming the flag. (--layers and --num_clusters are checked against the model's
    widths, `validate(config, widths)`, which names the valid range.)"""
    for name, low in INT_LOWS.items():
        _check_int(f"--{name}", getattr(config, name), low)
    for name, rule in FLOAT_RULES.items():
        config_lib.check_number(f"--{name}", getattr(config, name), **rule)
    last = config.seed + config.seeds - 1
    if last > INT32_MAX:
        raise ValueError(
            f"--seed={config.seed} with --seeds={config.seeds} runs seeds up to {last}; the "
            f"last must be <= {INT32_MAX}: lower --seed or --seeds"
        )


def _fraction(flag: str, value: Any) -> float:
    """`value` (a number, or its text) as a fraction in (0, 1); ValueError naming `flag`."""
    try:
        value = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"{flag} must be a fraction in (0, 1), got {value!r}") from None
    fraction = config_lib.check_number(flag, value)
    if not 0 < fraction < 1:
        raise ValueError(f"{flag} must be a fraction in (0, 1), got {value}")
    return fraction


def _check_targets(config: CompressConfig) -> None:
    """At most one --target_*, each a list of distinct fractions (--target_latency one);
    --round_to and --search_images only with one."""
    given = [f"--target_{k}" for k in TARGETS if getattr(config, f"target_{k}")]
    if len(given) > 1:
        raise ValueError(
            "give one of --target_flops, --target_params, --target_latency, not "
            + " and ".join(given)
        )
    if config.round_to > 1 and not config.target:
        raise ValueError(
            "--round_to rounds the counts a --target_flops, --target_params or "
            "--target_latency search tries; give one, or --num_clusters in multiples yourself"
        )
    if config.allocation != ALLOCATION and not (config.target_flops or config.target_params):
        raise ValueError(
            f"--allocation={config.allocation} plans a --target_flops or --target_params "
            f"search; give one, or leave it '{ALLOCATION}'"
        )
    if config.search_images and not config.target:
        raise ValueError(
            "--search_images sets the data of a --target_flops, --target_params or "
            "--target_latency search; give one, or leave it 0"
        )
    for kind in TARGETS:
        flag, values = f"--target_{kind}", getattr(config, f"target_{kind}")
        if not isinstance(values, tuple):
            raise ValueError(f"{flag} must be a list of fractions in (0, 1), got {values!r}")
        fractions = [_fraction(flag, v) for v in values]
        twice = sorted({v for v in fractions if fractions.count(v) > 1})
        if twice:
            raise ValueError(f"{flag} lists {twice[0]:g} twice: give each fraction once")
    if len(config.target_latency) > 1:
        listed = ",".join(f"{v:g}" for v in config.target_latency)
        raise ValueError(
            f"--target_latency takes one fraction, got {listed}: each latency plan is "
            "timed on this device; sweep --target_flops or --target_params instead"
        )


def _check_objectives(config: CompressConfig, layers: Sequence[int]) -> None:
    """'kernel' compares kernels as images: only the stem's kernels see the image.
    'fisher' sets the distances itself: a --metric of its own for such a layer is an
    error, not a setting silently unused."""
    why = " (a --target_* may merge any conv)" if config.target else ""
    default_metric = typing.cast(PerLayer, _FIELDS["metric"].default)
    for layer in layers:
        metric = config.metric.of(layer)
        if config.objective_of(layer) == FISHER and metric != default_metric.of(layer):
            raise ValueError(
                f"--metric: layer {layer} uses --objective=fisher, which sets its distances "
                f"itself, so its --metric ({metric}) would go unused: drop it"
            )
        if layer != 1 and config.objective_of(layer) == "kernel":
            raise ValueError(
                f"--objective: 'kernel' compares kernels as images, so only layer 1 (the "
                f"stem, whose kernels see the image) can use it, and layer {layer} would"
                f"{why}: give it to layer 1 alone, e.g. --objective=activation,1:kernel"
            )


def validate(config: CompressConfig, widths: Mapping[int, int] | None = None) -> None:
    """Raises ValueError naming the flag at fault, before any work.

    Args:
        widths: {layer number: filters} of the model to compress, once known (one
            abstract trace): checks layer ranges and cluster counts before any work.
    """
    config_lib.check(config)
    _check_numbers(config)
    check_name(config.model)
    if not config.layers and not config.target:
        raise ValueError("--layers is empty: name at least one conv layer to merge")
    if len(set(config.layers)) != len(config.layers):
        raise ValueError(f"--layers lists a layer twice: {list(config.layers)}")
    _check_targets(config)
    if not config.target:  # a target's plan picks the layers
        config_lib.check_merged_layers(
            config, ("objective", "metric", "num_clusters"), config.layers
        )
    for layer in config.layers:
        if config.objective_of(layer) is None:
            raise ValueError(f"--objective: no value for layer {layer}; give one, e.g. 'mean'")
    if not config.target:
        _check_objectives(config, config.layers)
    if widths is None:
        return
    if config.target:  # the plan picks the layers and counts, among every conv
        _check_objectives(config, sorted(widths))
        return
    for layer in config.layers:
        if layer not in widths:
            raise ValueError(
                f"--layers: layer {layer} does not exist: the model has conv layers "
                f"1..{len(widths)}"
            )
        count = config.num_clusters.of(layer)
        if count is not None and not 1 <= count < widths[layer]:
            raise ValueError(
                f"--num_clusters: layer {layer} has {widths[layer]} filters, so its "
                f"cluster count must be 1..{widths[layer] - 1}, got {count}"
            )
