"""The budget search's cheap score (--search_images) against its full measure.

    python -m benchmarks.search_proxy RUN_DIR [--every=3] [--images=128] [--model=NAME]

RUN_DIR holds a compress run's budget_search.json (its settings and full sensitivity
table). Rebuilds that run's gray model, then for every stored option (every `--every`-th
candidate layer) merges it by the search's own code path (`_distances`, `_cluster`,
`plan_merge`) and scores it with `search_proxy.divergence_score` on `--images` selection
images, plus the accuracy of the same recalibrated model on those images. Prints the
Spearman correlation of each with the stored drops, the seconds per option (the full
measure timed on a few options here too), and the greedy plans each table gives.
"""

import functools
import json
import sys
import time

import jax
import numpy as np
from absl import app, flags
from scipy import stats

from graycnn import merge
from graycnn.study import allocation, budget, search_proxy, stages
from graycnn.study.config import CompressConfig
from graycnn.training import bn_reestimate

FLAGS = flags.DEFINE_integer("every", 1, "Every n-th candidate layer.")
IMAGES = flags.DEFINE_integer("images", 128, "Selection images of the cheap score.")
MODEL = flags.DEFINE_string("model", None, "Override the stored --model.")


def _config(run_dir: str) -> tuple[CompressConfig, dict]:
    with open(f"{run_dir}/budget_search.json") as f:
        stored = json.load(f)
    s = dict(stored["settings"])
    for k in ("layers", "target_flops", "target_params", "target_latency"):
        v = s[k]
        s[k] = tuple(v) if isinstance(v, list) else ((v,) if v else ())
    if MODEL.value:
        s["model"] = MODEL.value
    return CompressConfig(**s), stored["result"]


BATCHES = flags.DEFINE_list("batches", ["2", "8"], "Recalibration batches (8: the full's).")
MEASURES = ("acc", "ce", "kl", "klr")  # kl: from gray as is; klr: from gray recalibrated alike


def main(argv):
    config, result = _config(argv[1])
    plans = result.get("plans", [result])
    full = {(o["layer"], o["clusters"]): o for o in plans[0]["options"]}
    splits = stages.read_splits(config)
    color = stages.color_model(config, "/nonexistent")
    splits = stages.load_splits(config, color, splits)
    gray = stages.fold_color_model(config, color, splits.train)
    train, g = splits.train, gray.graph()
    sel = budget.selection_split(train)  # the full measure's 500 images
    small = budget.selection_split(train, search_proxy.per_class(IMAGES.value, train))
    # `small` is the last images of each class: a subset of `sel`, found by content.
    keys = {img.tobytes(): i for i, img in enumerate(sel.images)}
    sub = np.array([keys[img.tobytes()] for img in small.images])
    logits_of = search_proxy._logits_fn(gray.config)
    reference = np.asarray(logits_of(gray.variables, sel.images))
    measure = functools.partial(_measures, gray.config, train, sel, sub, config.seed, logits_of)
    base, _ = measure(gray.variables, reference, {})
    layers = sorted({layer for layer, _ in full})[:: FLAGS.value]
    rows, times = [], {}
    for layer in layers:
        path = g.conv_order[layer - 1]
        distances = budget._distances(config, gray, layer, path, train)
        for k in sorted((k for (lay, k) in full if lay == layer), reverse=True):
            plan = merge.plan_merge(g, layer, budget._cluster(config, distances, k), config.bn_rule)
            merged = plan.apply(gray.variables, keep_widths=True)
            values, t = measure(merged, reference, base["refs"])
            for name, sec in t.items():
                times.setdefault(name, []).append(sec)
            drops = {n: 100 * (base[n] - values[n]) for n in values if n != "refs"}
            rows.append((layer, k, full[(layer, k)]["drop"], drops))
            print(f"L{layer}:{k} full {rows[-1][2]:.2f} " + " ".join(
                f"{n} {d:.2f}" for n, d in drops.items()), flush=True)  # fmt: skip
    _summary(config, gray, color, plans, full, rows, times, layers)


def _measures(model_config, train, sel, sub, seed, logits_of, variables, reference, refs):
    """Every (batches, images, measure) score of `variables`, higher better; and the
    seconds of each (batches, images) (recalibration + forward). `refs`: the unmerged
    model's logits recalibrated alike (empty: computing them, returned under 'refs')."""
    out, times, new_refs = {}, {}, {}
    for b in map(int, BATCHES.value):
        t0 = time.perf_counter()
        v = bn_reestimate.recalibrate(
            model_config, variables, train, "gray", num_batches=b,
            batch_size=stages.SEARCH_BN_BATCH, seed=seed,
        )  # fmt: skip
        jax.block_until_ready(v)
        t_recal = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.asarray(logits_of(v, sel.images[sub]))
        times[(b, len(sub))] = t_recal + time.perf_counter() - t0
        t0 = time.perf_counter()
        logits = np.asarray(logits_of(v, sel.images))
        times[(b, len(sel))] = t_recal + time.perf_counter() - t0
        new_refs[b] = refs.get(b, logits)
        for n, idx in ((len(sel), slice(None)), (len(sub), sub)):
            lg, y = logits[idx], sel.labels[idx]
            logp = _log_softmax(lg)
            out[f"acc b{b} n{n}"] = float(np.mean(np.argmax(lg, -1) == y))
            out[f"ce b{b} n{n}"] = float(np.mean(logp[np.arange(len(y)), y]))
            out[f"kl b{b} n{n}"] = -_kl(reference[idx], lg)
            out[f"klr b{b} n{n}"] = -_kl(new_refs[b][idx], lg)
    out["refs"] = new_refs
    return out, times


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(ref_logits, logits) -> float:
    p = _log_softmax(ref_logits)
    return float(np.mean(np.sum(np.exp(p) * (p - _log_softmax(logits)), -1)))


def _summary(config, gray, color, plans, full, rows, times, layers) -> None:
    names = list(rows[0][3])
    print(f"\n{len(rows)} options on layers {layers}")
    for (b, n), sec in times.items():
        print(f"s/option b{b} n{n}: {np.median(sec):.2f} (median)")
    g = gray.graph()
    size_of = lambda steps: budget._size_of_plan(gray, steps, g)["flops"]  # noqa: E731
    total = budget._size(color.config, color.variables)["flops"]
    fulls = np.array([r[2] for r in rows])
    for name in ["stored", *names]:
        drops = fulls if name == "stored" else np.array([r[3][name] for r in rows])
        rho = stats.spearmanr(fulls, drops).statistic
        line = f"{name:14s} spearman {rho:.3f}"
        for p in plans:
            options = [budget.Option(**{**full[(r[0], r[1])], "drop": d})
                       for r, d in zip(rows, drops, strict=True)]  # fmt: skip
            target = p["target"]["flops"]
            try:
                steps = allocation.allocate(options, "flops", target * total, total, size_of)
            except ValueError:
                line += f" | {target}: unreachable"
                continue
            stored = {s["layer"]: s["clusters"] for s in p["steps"]}
            same = sum(stored.get(layer) == k for layer, k in steps.items())
            plan = " ".join(f"{layer}:{k}" for layer, k in sorted(steps.items()))
            line += f" | {target}: {same}/{len(steps)} of {len(stored)} [{plan}]"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
