"""Data-aware compensation on the shipped densenet_tiny: validation accuracy and errors.

Command:
    python -m benchmarks.compensate
    python -m benchmarks.compensate --fit_images=256 --clusters=20

What it does: the shipped color densenet_tiny (graycnn/assets/densenet_tiny_color) is
folded to gray ('sum'); layer 1's 36 kernels are clustered into --clusters by complete
linkage on their MSE distances and merged ('moments' BN rule); then

    merged                       the merge alone,
    merged+recal                 BN recalibrated (`bn_reestimate.recalibrate`, the default:
                                 50 augmented batches of 128, here every batch of train),
    merged+comp[bn]              `compensate_merge` on --fit_images shuffled training
                                 images (gray, no augmentation), BN mode bn,
    merged+comp[bn]+recal        the same, then recalibrated,

are evaluated on the validation split (accuracy, and the paired comparison with
merged+recal). Per consumer, the relative errors sum (out - y)^2 / sum (y - mean y)^2
before and after the fit on the fit images and on --fit_images other training images,
and the time of each compensation (compiles included). Nothing is chosen here: the
validation numbers are reported only.

Expected result (the previously shipped model, trained on 4,085 images):
    consumer (bn=relative)  D    cond   fit before  fit after  held before  held after
    block1/layer1/conv     180  2.2e4      0.0763     0.0039       0.0725      0.0039
    block1/layer2/conv     342  3.4e4      0.0737     0.0039       0.0708      0.0039
    block1/layer3/conv     504  5.2e4      0.0468     0.0021       0.0450      0.0022
    transition1/conv        74  1.6e3      0.0356     0.0044       0.0349      0.0045
    validation accuracy (n=1000): gray unmerged 57.9, merged 51.0, merged+recal 56.7,
    merged+comp[relative] 57.2, merged+comp[relative]+recal 58.7 (+2.0 [+0.2, +3.8]
    vs merged+recal, p=0.033), merged+comp[exact]+recal 59.0 (+2.3, p=0.027).
"""

import importlib.resources
import time

import numpy as np
from absl import app, flags

from graycnn import cluster, distance, fold, graph
from graycnn import compensate as comp
from graycnn import merge as merge_lib
from graycnn.cli import runtime
from graycnn.models import build_model
from graycnn.study import stats
from graycnn.training import bn_reestimate, checkpoint, data, evaluation

_FIT = flags.DEFINE_integer("fit_images", 512, "Training images the consumers are fit on.")
_CLUSTERS = flags.DEFINE_integer("clusters", 20, "Clusters of layer 1's 36 filters.")
_MODES = flags.DEFINE_list("bn", ["relative", "exact"], "BN modes of the compensation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fit images' draw.")


def main(argv: list[str]) -> None:
    del argv
    path = str(importlib.resources.files("graycnn") / "assets" / "densenet_tiny_color")
    color_config, color_variables, _ = checkpoint.load_model(path)
    model = build_model(color_config)
    gray = fold.fold_to_gray(model, color_variables, "sum", input_shape=color_config.input_shape)
    config = color_config.replace(in_channels=1)
    shape = config.input_shape
    train = data.load_dataset("cifar10_sample", "train")
    validation = data.load_dataset("cifar10_sample", "validation")

    g = graph.trace(model, gray, shape)
    stem = g.conv_order[0]
    kernels = np.moveaxis(np.asarray(gray["params"][stem]["kernel"]), -1, 0)  # (36, 3, 3, 1)
    distances = np.asarray(distance.pairwise(kernels, "mse"))
    labels = cluster.cluster(distances, "complete", num_clusters=_CLUSTERS.value).labels
    plan = merge_lib.plan_merge(g, 1, labels)
    merged = plan.apply(gray)
    merged_config = config.replace(widths=graph.widths_of(model, merged, shape))
    print(plan.describe().splitlines()[0])

    order = np.random.default_rng(_SEED.value).permutation(len(train))
    pick = order[: 2 * _FIT.value]
    images = np.asarray(data.apply_view(train.images[pick], "gray"))
    fit, holdout = images[: _FIT.value], images[_FIT.value :]

    def recal(variables):
        return bn_reestimate.recalibrate(merged_config, variables, train, "gray")

    rows = {"gray (unmerged)": (config, gray), "merged": (merged_config, merged)}
    rows["merged+recal"] = (merged_config, recal(merged))
    for mode in _MODES.value:
        start, cpu = time.perf_counter(), time.process_time()
        new, report = comp.compensate_merge(
            model, gray, plan, fit, input_shape=shape, holdout=holdout, bn=mode
        )
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"\ncompensate bn={mode}: {seconds:.0f} s wall, {cpu:.0f} s CPU, {len(fit)} images")
        print(f"{'consumer':22} {'D':>5} {'cond':>8} {'fit before':>10} {'fit after':>10} "
              f"{'held before':>11} {'held after':>10}")  # fmt: skip
        for r in report:
            print(
                f"{r['consumer']:22} {r['features']:5d} {r['condition']:8.2g} "
                f"{r['error_before']:10.4f} {r['error_after']:10.4f} "
                f"{r['holdout_before']:11.4f} {r['holdout_after']:10.4f}"
            )
        rows[f"merged+comp[{mode}]"] = (merged_config, new)
        rows[f"merged+comp[{mode}]+recal"] = (merged_config, recal(new))

    results = {k: evaluation.evaluate(c, v, validation, "gray") for k, (c, v) in rows.items()}
    reference = results["merged+recal"]["correct"][None]
    title = f"validation (n={len(validation)})"
    print(f"\n{title:34} {'accuracy':>8}  vs merged+recal: points [95% CI] McNemar p")
    for name, result in results.items():
        versus = stats.compare(result["correct"][None], reference)
        lo, hi = versus["ci95"]
        print(
            f"{name:34} {100 * result['accuracy']:8.2f}  {versus['delta']:+.1f} "
            f"[{lo:+.1f}, {hi:+.1f}] p={versus['p_value']:.3g}"
        )


if __name__ == "__main__":
    runtime.setup()
    app.run(main)
