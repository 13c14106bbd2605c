"""What MSE clusters in the gray layer-1 `mean` fields of the shipped densenet_tiny.

    python -m docs.layer1_mean_fields

For seeds 0..4, as compress makes and clusters layer 1 by default: the `sum`-folded
gray model's layer-1 `mean` receptive fields (100 steps), their pairwise MSE, DBSCAN to
20 clusters. Prints, per seed, the share of the summed pairwise squared distance on the
1-pixel border ring and how the interior's share splits (per-filter level, per-filter
noise amplitude, and the size of what the noise draws themselves add), and the range
of the filters' interior noise std; then, across every two seeds, the correlation of
the MSE matrices and the adjusted Rand index of the clusters, also when only the ring
or only the interior is compared. About 20 s on 2 CPU cores.
Results: docs/results.md.
"""

import importlib.resources
import itertools

import numpy as np
from sklearn.metrics import adjusted_rand_score

from graycnn import cluster, distance, fold
from graycnn import receptive_field as rf
from graycnn.models import build_model
from graycnn.training import checkpoint


def pair_sums(x: np.ndarray) -> np.ndarray:
    """(F, P) -> (P,): sum over all ordered pairs (i, j) of (x_i - x_j)^2, per pixel."""
    return 2 * len(x) * (x**2).sum(0) - 2 * x.sum(0) ** 2


def main() -> None:
    path = importlib.resources.files("graycnn") / "assets" / "densenet_tiny_color"
    config, variables, _ = checkpoint.load_model(str(path))
    model = build_model(config)
    gray = fold.fold_to_gray(model, variables, "sum", input_shape=config.input_shape)
    ring = np.ones((32, 32), bool)
    ring[1:-1, 1:-1] = False
    labels = {"whole": [], "ring": [], "interior": []}
    matrices = []
    for seed in range(5):
        fields = rf.gradient_ascent(
            model, gray, 1, objective="mean", steps=100, seed=seed, image_shape=(32, 32, 1)
        )
        x = np.asarray(fields.fields[..., 0], np.float64)
        total = pair_sums(x.reshape(len(x), -1)).sum()
        inner = x[:, ~ring]
        level = pair_sums(inner.mean(1, keepdims=True)).sum() * inner.shape[1]
        # Pair (i, j), i != j: P (m_i - m_j)^2 + P (v_i + v_j) - 2 <n_i, n_j>, with level
        # m, variance v and centered noise n of each filter's P interior pixels.
        amplitude = 2 * (len(x) - 1) * inner.var(1).sum() * inner.shape[1]
        noise = inner - inner.mean(1, keepdims=True)
        draws = 2 * np.abs(np.triu(noise @ noise.T, 1)).sum() * 2
        print(f"seed {seed}: of the summed pairwise squared distance, border ring "
              f"({ring.sum()} of {ring.size} pixels) {pair_sums(x[:, ring]).sum() / total:.1%}; "
              f"interior: level {level / total:.1%}, noise amplitude {amplitude / total:.1%}, "
              f"noise draws |2 <n_i, n_j>| {draws / total:.1%}; interior noise std "
              f"{inner.std(1).min():.3f}-{inner.std(1).max():.3f}")  # fmt: skip
        for part, x_part in [("whole", x), ("ring", x[:, ring]), ("interior", inner)]:
            d = np.asarray(distance.pairwise(x_part.reshape(len(x), -1, 1), "mse"))
            labels[part].append(cluster.cluster(d, "dbscan", num_clusters=20).labels)
            if part == "whole":
                matrices.append(d[np.triu_indices(len(x), 1)])
    pairs = list(itertools.combinations(range(5), 2))
    r = [np.corrcoef(matrices[a], matrices[b])[0, 1] for a, b in pairs]
    print(f"MSE matrices across seeds: Pearson r {min(r):.3f}-{max(r):.3f}")
    for part, runs in labels.items():
        ari = [adjusted_rand_score(runs[a], runs[b]) for a, b in pairs]
        consecutive = [adjusted_rand_score(runs[s], runs[s + 1]) for s in range(4)]
        print(f"ARI of the clusters, {part}: every pair of seeds {min(ari):.2f}-{max(ari):.2f} "
              f"(mean {np.mean(ari):.2f}); seeds s, s+1 {min(consecutive):.2f}-"
              f"{max(consecutive):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
