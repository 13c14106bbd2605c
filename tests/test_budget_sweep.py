"""A sweep of --target_* fractions: the planner meets any target, one search serves
every target, and a bad list is one clear error."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from absl import flags

from graycnn import config as config_lib
from graycnn import graph, io, merge
from graycnn.models import ModelConfig, build_model, count_params, init_variables
from graycnn.study import CompressConfig, allocation, budget, compress, stages, validate
from graycnn.study.table import recovered_spec
from graycnn.study.writer import Writer
from graycnn.training import train

TARGETS = [round(0.25 + 0.05 * i, 2) for i in range(14)]  # 0.25, 0.3, ..., 0.9


class _Planner:
    """A model's candidate layers with synthetic options: deterministic pseudo-random
    accuracy drops (growing as a layer narrows), sizes counted by the search's own
    `_size_of_plan` on the gray model's channel graph."""

    def __init__(self, name: str):
        self.color_config = ModelConfig(name=name)
        gray_config = self.color_config.replace(in_channels=1)
        self.gray = stages.Model(gray_config, budget._abstract_variables(gray_config))
        self.graph = g = self.gray.graph()
        rng = np.random.default_rng(35)
        self.options = []
        for layer, path in enumerate(g.conv_order, start=1):
            counts = budget._counts(g.widths.get(path, 0))
            if not counts or not budget._mergeable(g, path):
                continue
            drops = np.cumsum(rng.uniform(0.0, 3.0, len(counts)))  # widest first
            for k, drop in zip(counts, drops, strict=True):
                size = self.size_of({layer: k})
                self.options.append(budget.Option(layer, k, float(drop), **size))

    def size_of(self, steps: dict[int, int]) -> dict[str, int]:
        return budget._size_of_plan(self.gray, steps, self.graph)

    def plan(self, kind: str, target: float, full: int, allocate: str) -> dict[int, int]:
        size_of = lambda steps: self.size_of(steps)[kind]  # noqa: E731
        if allocate == "checked":
            # Measured whole: the options' drops added, plus a loss growing with the
            # number of layers cut together, so the second plan differs from the first.
            drops = {(o.layer, o.clusters): max(o.drop, 0.0) for o in self.options}
            drop_of = lambda s: sum(drops[i] for i in s.items()) + 0.3 * len(s) ** 2  # noqa: E731
            return allocation.allocate_checked(
                self.options, kind, target * full, full, size_of, drop_of
            )
        floor = 1.0 if allocate == "floor" else None
        return allocation.allocate(self.options, kind, target * full, full, size_of, floor)


@pytest.fixture(scope="module", params=["densenet_tiny", "resnet20"])
def planner(request):
    return _Planner(request.param)


def _color_size(config: ModelConfig) -> dict[str, int]:
    """The color model's size, counted on random-init variables of its own trace."""
    variables = init_variables(config, jax.random.key(0))
    flops = graph.trace(build_model(config), variables, config.input_shape).flops()["total"]
    return {"params": count_params(variables), "flops": flops}


@pytest.mark.parametrize("allocate", ["additive", "floor", "checked"])
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_the_planner_meets_every_target_from_a_quarter_to_nine_tenths(planner, kind, allocate):
    full = _color_size(planner.color_config)[kind]
    layers = {o.layer for o in planner.options}
    for target in TARGETS:
        steps = planner.plan(kind, target, full, allocate)
        assert steps and set(steps) <= layers
        size = planner.size_of(steps)[kind]
        assert size <= target * full, (target, steps)
        reached = size / full
        # Not far under it either: the options are quarters of a layer's width, so the
        # greedy plan and its relaxation leave at most a tenth of the model unspent. A
        # floor, or drops re-read from whole plans, may plan under that: one deep cut,
        # predicted to lose less than the several layers that would spend the rest
        # (resnet20's params at 0.6: layer 16 at 16 alone, 0.48).
        assert allocate != "additive" or reached > target - 0.1, (target, reached)
        for layer, k in steps.items():  # each a measured option of its layer
            assert any(o.layer == layer and o.clusters == k for o in planner.options)
            # ... and the budget is filled: no planned layer widens (to a wider option
            # or unmerged) and still fits.
            rest = {m: c for m, c in steps.items() if m != layer}
            for o in planner.options:
                if o.layer == layer and o.clusters > k:
                    assert planner.size_of(rest | {layer: o.clusters})[kind] > target * full
            assert planner.size_of(rest)[kind] > target * full, (target, steps, layer)


def test_the_fill_reads_each_layers_drops_clamped_and_non_increasing_in_the_count():
    options = [budget.Option(3, k, d, 0, 0) for k, d in ((12, -1.2), (8, 0.8), (4, 0.4))]
    # By hand: -1.2 -> 0 (a gain is noise); 0.8 at 8 above 0.4 at 4 violates the order,
    # so the two pool to their mean.
    assert allocation._monotone_drops(options) == pytest.approx({12: 0.0, 8: 0.6, 4: 0.6})
    assert allocation._monotone_drops(options[:1]) == {12: 0.0}


def test_the_noise_floor_is_the_root_mean_square_of_the_negative_drops():
    options = [budget.Option(1, k, d, 0, 0) for k, d in ((12, -0.6), (8, 0.8), (4, 2.0))]
    options.append(budget.Option(2, 8, -0.8, 0, 0))
    # By hand: sqrt((0.6^2 + 0.8^2) / 2) = sqrt(0.5).
    assert allocation.noise_floor(options) == pytest.approx(0.5**0.5)
    assert allocation.noise_floor(options[1:3]) == 0.0


def test_a_floor_cuts_one_layer_deep_where_the_drops_would_spread_the_budget_thin():
    # Layers 2-5 each save 10 of 100 at 8 clusters and score above the unmerged model
    # (noise); layer 1 saves 40 at 4 clusters for 0.6 points.
    saved = {(1, 4): 40} | {(layer, 8): 10 for layer in (2, 3, 4, 5)}
    options = [budget.Option(1, 4, 0.6, 0, 60)]
    options += [budget.Option(layer, 8, -0.5, 0, 90) for layer in (2, 3, 4, 5)]
    size_of = lambda steps: 100 - sum(saved[item] for item in steps.items())  # noqa: E731
    # Additive: the four "free" merges, 0 predicted against 0.6.
    assert allocation.allocate(options, "flops", 60, 100, size_of) == {2: 8, 3: 8, 4: 8, 5: 8}
    # With a floor of 0.5 each costs 0.5 / 10 a unit saved, layer 1 max(0.6, 0.5) / 40.
    steps = allocation.allocate(options, "flops", 60, 100, size_of, floor=0.5)
    assert steps == {1: 4} and size_of(steps) == 60
    # A floor is only a lower bound: with 0.1 the four cost 0.1 / 10 < 0.6 / 40.
    assert allocation.allocate(options, "flops", 60, 100, size_of, floor=0.1) == {
        2: 8, 3: 8, 4: 8, 5: 8}  # fmt: skip


def test_a_checked_plan_moves_off_layers_that_lose_more_together_than_alone():
    # As above: layers 2-5 each "free" alone (noise), layer 1 at 4 clusters 0.6 points.
    saved = {(1, 4): 40} | {(layer, 8): 10 for layer in (2, 3, 4, 5)}
    options = [budget.Option(1, 4, 0.6, 0, 60)]
    options += [budget.Option(layer, 8, -0.5, 0, 90) for layer in (2, 3, 4, 5)]
    size_of = lambda steps: 100 - sum(saved[item] for item in steps.items())  # noqa: E731
    measured = []
    together = {0: 0.0, 1: 0.0, 2: 0.5, 3: 2.0, 4: 4.0}  # by how many of the four

    def drop_of(steps):
        # Measured whole: the four lose more together; layer 1 adds its 0.6.
        measured.append(dict(steps))
        return together[len(set(steps) - {1})] + 0.6 * (1 in steps)

    # By hand: the additive plan, the four, measures 4.0; each one's share is
    # 4.0 - 2.0 = 2.0, so each costs 2.0 / 10 a unit saved against layer 1's 0.6 / 40:
    # the second plan is layer 1 alone (0.6), and its share (0.6) reads as before.
    steps = allocation.allocate_checked(options, "flops", 60, 100, size_of, drop_of)
    assert steps == {1: 4}
    assert measured[0] == {2: 8, 3: 8, 4: 8, 5: 8} and {1: 4} in measured
    # Layers that do not interact keep the additive plan: four each sharing 0.05.
    no_interaction = lambda steps: 0.05 * len(steps)  # noqa: E731
    assert allocation.allocate_checked(options, "flops", 60, 100, size_of, no_interaction) == {
        2: 8, 3: 8, 4: 8, 5: 8}  # fmt: skip
    with pytest.raises(ValueError, match="--target_flops: cannot reach 10 flops"):
        allocation.allocate_checked(options, "flops", 10, 100, size_of, drop_of)


def test_the_fill_spends_what_the_greedys_last_step_left():
    # Sizes: 100 unmerged; layer 1 saves 20 at 8 clusters, 40 at 4; layer 2 saves 10 at 8.
    saved = {(1, 8): 20, (1, 4): 40, (2, 8): 10}
    options = [budget.Option(1, 8, 1.0, 0, 80), budget.Option(1, 4, 1.0, 0, 60)]
    options.append(budget.Option(2, 8, 0.5, 0, 90))
    size_of = lambda steps: 100 - sum(saved[item] for item in steps.items())  # noqa: E731
    # To 85 the greedy takes layer 1 at 4 (1.0 lost per 40 saved is the cheapest), 60;
    # the relaxation keeps it (8 is measured no better). Widening it to 8 (80) fits and
    # loses no more, unmerging it (100) does not fit; layer 2 is not planned.
    steps = allocation.allocate(options, "flops", 85, 100, size_of)
    assert steps == {1: 8} and size_of(steps) == 80


def _merged_for_real(gray_config: ModelConfig, steps: dict[int, int]) -> stages.Model:
    """The gray model (random init) with each planned layer merged to its count by
    `merge.plan_merge`, in forward order (random labels, every cluster used)."""
    model = stages.Model(gray_config, init_variables(gray_config, jax.random.key(1)))
    rng = np.random.default_rng(0)
    for layer, k in sorted(steps.items()):
        g = model.graph()
        width = g.widths[g.conv_order[layer - 1]]
        labels = rng.permutation(np.arange(width) % k)
        model = stages.apply_plan(model, merge.plan_merge(g, layer, labels, "moments"))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_a_planned_model_merged_for_real_has_the_size_the_plan_claims(planner, kind):
    color = _color_size(planner.color_config)
    for target in (0.25, 0.5, 0.85):
        steps = planner.plan(kind, target, color[kind], "additive")
        claimed = planner.size_of(steps)
        model = _merged_for_real(planner.gray.config, steps)
        # Counted on the merged tree, traced with the unmerged module (its widths are
        # read off the tree), not with the plan's config.
        flops = graph.count_flops(
            build_model(planner.gray.config), model.variables, model.config.input_shape
        )["total"]
        assert {"params": count_params(model.variables), "flops": flops} == claimed
        assert claimed[kind] <= target * color[kind]


def test_a_plan_counted_on_the_graph_is_the_traced_count_of_its_model(planner):
    rng = np.random.default_rng(7)
    by_layer: dict[int, list[int]] = {}
    for o in planner.options:
        by_layer.setdefault(o.layer, []).append(o.clusters)
    for _ in range(2):  # a random count for a random half of the candidates
        layers = rng.choice(sorted(by_layer), len(by_layer) // 2, replace=False)
        steps = {int(k): int(rng.choice(by_layer[k])) for k in layers}
        config = budget._config_of_plan(planner.gray, steps)
        variables = budget._abstract_variables(config)  # shapes: traced, not compiled
        flops = graph.trace(build_model(config), variables, config.input_shape).flops()
        assert budget._counted(planner.graph, steps) == {
            "params": count_params(variables), "flops": flops["total"]}  # fmt: skip


# A sweep run end to end on the test-only model.


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, sample_npz):
    """A trained densenet_test and the sweep's config (0.7 and 0.5 of its FLOPs)."""
    workdir = str(tmp_path_factory.mktemp("color"))
    dataset = f"npz:{sample_npz}"
    train.train_and_evaluate(
        train.TrainConfig(model="densenet_test", dataset=dataset, epochs=1), workdir
    )
    return CompressConfig(
        checkpoint=workdir, dataset=dataset, target_flops=(0.7, 0.5), objective="activation",
        metric="correlation", cluster="complete", steps=2, bn="recalibrate",
        eval_dataset="none", speed_rounds=0, round_to=1,  # densenet_test: 4-8 filters
    )  # fmt: skip


@pytest.mark.slow
def test_a_sweep_searches_once_and_makes_each_targets_rows(sweep, tmp_path, monkeypatch):
    searches, measured = [], []
    search, sensitivities = budget.search, budget._sensitivities
    monkeypatch.setattr(budget, "search", lambda *a, **k: searches.append(1) or search(*a, **k))
    monkeypatch.setattr(
        budget, "_sensitivities", lambda *a: measured.append(1) or sensitivities(*a)
    )
    report = compress(sweep, str(tmp_path / "run"))
    assert searches == [1] and measured == [1]
    plans = report["config"]["budget_search"]["plans"]
    assert [p["target"] for p in plans] == [{"flops": 0.7}, {"flops": 0.5}]
    assert plans[0]["options"] == plans[1]["options"]  # one sensitivity table
    rows = {r["key"]: r for r in report["rows"]}
    color_flops = rows["color"]["flops"]
    for plan, tag in zip(plans, ("flops0.7", "flops0.5"), strict=True):
        names = "+".join(str(s["layer"]) for s in plan["steps"])
        keys = [f"{c}_{names}_{tag}" for c in ("merged", "random", "prune_l1")]
        for key in [f"merged_{names}_{tag}_raw", *keys]:
            assert rows[key]["flops"] / color_flops == pytest.approx(plan["achieved"]["flops"])
            assert rows[key]["flops"] <= plan["target"]["flops"] * color_flops
            assert f"(flops {plan['target']['flops']:g})" in rows[key]["name"]
            assert os.path.isdir(tmp_path / "run" / rows[key]["checkpoints"][0])
    assert len({r["checkpoints"][0] for r in report["rows"]}) == len(rows) - 1  # color x2
    text = (tmp_path / "run" / "report.md").read_text()
    assert "target_flops=0.7,0.5" in text and text.count("- Target: flops") == 2
    assert (tmp_path / "run" / "figures" / "pareto.png").stat().st_size > 0  # every row
    # Killed and rerun: the search is read back from budget_search.json, not run again.
    monkeypatch.setattr(budget, "search", lambda *a, **k: pytest.fail("searched again"))
    again = compress(sweep, str(tmp_path / "run"))
    assert again["config"]["budget_search"] == report["config"]["budget_search"]
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]


def test_one_target_keeps_the_json_and_row_names_of_a_single_plan(tmp_path):
    # What a single-target run wrote before sweeps reads back as one plan, and a single
    # plan is still written that way (no 'plans' list).
    option = {"layer": 1, "clusters": 4, "drop": 1.5, "params": 10, "flops": 20, "latency": 0.0}
    old = {"steps": [{"layer": 1, "clusters": 4}], "target": {"flops": 0.5},
           "achieved": {"flops": 0.4, "params": 0.6}, "selection_accuracy": 0.3,
           "options": [option]}  # fmt: skip
    [plan] = budget.plans_from_json(old)
    assert plan.steps == [(1, 4)] and plan.target == ("flops", 0.5)
    assert budget.plans_to_json([plan]) == old
    two = [plan, dataclasses.replace(plan, target=("flops", 0.4))]
    assert budget.plans_from_json(budget.plans_to_json(two)) == two
    config = CompressConfig(target_flops=0.5)
    single = recovered_spec(config, {1: 4}, None, "bn")
    swept = recovered_spec(config, {1: 4}, None, "bn", "flops 0.5")
    assert (single.key, single.name) == ("merged_1", "merged layer 1 + BN re-estimation")
    assert (swept.key, swept.model_dir) == ("merged_1_flops0.5", "merged_1_flops0.5")
    assert swept.name == "merged layer 1 (flops 0.5) + BN re-estimation"


def _from_argv(*argv: str) -> CompressConfig:
    values = flags.FlagValues()
    config_lib.define_flags(CompressConfig, flag_values=values)
    values(["compress", *argv])
    return config_lib.from_flags(CompressConfig, flag_values=values)


def test_a_list_of_targets_parses_in_order_and_one_value_is_a_list_of_one():
    assert _from_argv("--target_flops=0.7,0.5,0.35,0.25").target_flops == (0.7, 0.5, 0.35, 0.25)
    assert _from_argv("--target_params=0.5").targets_of() == ("params", (0.5,))
    assert _from_argv().target_flops == () and not _from_argv().target
    # What Python callers wrote before sweeps: one fraction, 0 for none.
    assert CompressConfig(target_flops=0.5).target_flops == (0.5,)
    assert CompressConfig(target_flops=0.0).target_flops == () == CompressConfig().target_flops
    validate(_from_argv("--target_flops=0.7,0.5,0.35,0.25"))


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--target_flops=0.5,1.2", r"^--target_flops must be a fraction in \(0, 1\), got 1.2$"),
        ("--target_params=0,0.5", r"^--target_params must be a fraction in \(0, 1\), got 0.0$"),
        ("--target_flops=0.5,nan", r"^--target_flops must be a finite number, got nan$"),
        ("--target_flops=0.5,0.5", r"^--target_flops lists 0.5 twice: give each fraction once$"),
        ("--target_latency=0.5,0.4", r"^--target_latency takes one fraction, got 0.5,0.4: "),
        ("--target_latency=1.5", r"^--target_latency must be a fraction in \(0, 1\), got 1.5$"),
        ("--target_flops=0.5,x", r"^--target_flops: expected float values, got \['0.5', 'x'\]$"),
    ],
)
def test_a_bad_list_is_one_error_naming_its_flag_before_any_work(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        compress(_from_argv(argv), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_a_run_written_before_sweeps_resumes_with_its_search(tmp_path):
    # Its run.json and budget_search.json hold a target as one fraction (0: none).
    settings = config_lib.to_json(CompressConfig(target_flops=0.5))
    assert settings["target_flops"] == [0.5] and settings["target_params"] == []
    before = settings | {"target_flops": 0.5, "target_params": 0.0, "target_latency": 0.0}
    io.write_json(str(tmp_path / "run.json"), before)
    io.write_json(str(tmp_path / "budget_search.json"), {"settings": before, "result": {"a": 1}})
    out = Writer(str(tmp_path), settings)  # not refused as other settings
    assert out.computed_once("budget_search.json", lambda: pytest.fail("searched")) == {"a": 1}
    with pytest.raises(FileExistsError, match="other settings"):
        Writer(str(tmp_path), settings | {"target_flops": [0.4]})
