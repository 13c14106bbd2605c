"""Compression to a target: the plan meets it, and never reads the validation split."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from graycnn import config as config_lib
from graycnn import io
from graycnn.study import (
    CompressConfig,
    allocation,
    budget,
    compress,
    search_proxy,
    stages,
    validate,
)
from graycnn.study import report as report_lib
from graycnn.study.config import with_preset
from graycnn.study.writer import Writer
from graycnn.training import data, train


@pytest.fixture(scope="module")
def setting(tmp_path_factory, sample_npz):
    workdir = str(tmp_path_factory.mktemp("color"))
    dataset = f"npz:{sample_npz}"
    model_config, variables, _ = train.train_and_evaluate(
        train.TrainConfig(model="densenet_test", dataset=dataset, epochs=1), workdir
    )
    config = CompressConfig(
        checkpoint=workdir,
        dataset=dataset,
        target_flops=0.7,
        round_to=1,  # any count: densenet_test's layers are 4 to 8 filters wide
        objective="activation",
        metric="correlation",
        cluster="complete",
    )
    color = stages.Model(model_config, variables, workdir)
    return config, color


@pytest.fixture(scope="module")
def run(setting, tmp_path_factory):
    """compress with the target: its report and workdir (the search runs inside)."""
    config, _ = setting
    workdir = tmp_path_factory.mktemp("run")
    return compress(_run_config(config), str(workdir)), workdir


def _run_config(config):
    return _with(
        config, steps=2, bn="recalibrate", controls=False, eval_dataset="none", speed_rounds=0
    )


def _plan(config, color):
    train_split = data.load_dataset(config.dataset, "train")
    gray = stages.fold_color_model(config, color, train_split)
    [plan] = budget.search(config, gray, color, train_split)
    return plan


def _with(config, **changes):
    return dataclasses.replace(config, **changes)


@pytest.mark.slow
def test_plan_meets_the_target_from_training_data_only(setting, run, tmp_path):
    config, color = setting
    plan = run[0]["config"]["budget_search"]
    steps = [(s["layer"], s["clusters"]) for s in plan["steps"]]
    assert steps and plan["achieved"]["flops"] <= 0.7
    assert [layer for layer, _ in steps] == sorted(layer for layer, _ in steps)
    # Poison the validation images (the last 20% of each class) with noise: the same plan.
    split = data.load_dataset(config.dataset, "all")
    images = split.images.copy()
    for c in range(10):
        idx = np.flatnonzero(split.labels == c)
        held = idx[-round(len(idx) * 0.2) :]
        images[held] = np.random.default_rng(c).integers(0, 256, images[held].shape, np.uint8)
    poisoned = tmp_path / "poisoned.npz"
    np.savez(poisoned, images=images, labels=split.labels)
    assert data.load_dataset(f"npz:{poisoned}", "validation").images.tolist() != (
        data.load_dataset(config.dataset, "validation").images.tolist()
    )
    again = _plan(_with(config, dataset=f"npz:{poisoned}"), color)
    assert again.steps == steps
    assert [o.drop for o in again.options] == [o["drop"] for o in plan["options"]]


def test_an_unreachable_target_is_a_clear_error_before_the_search(setting, monkeypatch):
    config, color = setting

    def measured(*args):
        raise AssertionError("the search measured a sensitivity for an unreachable target")

    monkeypatch.setattr(budget, "_distances", measured)
    with pytest.raises(ValueError, match="--target_flops: cannot reach .* 0.25 of their"):
        _plan(_with(config, target_flops=0.01), color)


@pytest.mark.slow
def test_compress_merges_what_the_search_planned(run):
    report, workdir = run
    planned = report["config"]["budget_search"]["steps"]
    assert report["config"]["steps"] == planned
    final = {r["key"]: r for r in report["rows"]}[
        "merged_" + "+".join(str(s["layer"]) for s in planned)
    ]
    assert final["clusters"] == {str(s["layer"]): s["clusters"] for s in planned}
    achieved = report["config"]["budget_search"]["achieved"]["flops"]
    assert final["flops"] / report["rows"][0]["flops"] == pytest.approx(achieved)
    assert achieved <= 0.7
    text = (workdir / "report.md").read_text()
    plan = ", ".join(f"L{s['layer']}: {s['clusters']}" for s in planned)
    assert "## Budget search" in text and f"plan {plan}; reached" in text


@pytest.mark.slow
def test_a_rerun_reads_its_search_back(setting, run, monkeypatch):
    """The search runs before the first checkpoint: a rerun into the same workdir (as
    after a kill) takes its plan from budget_search.json instead of searching again."""
    config, _ = setting
    report, workdir = run

    def searched(*args):
        raise AssertionError("the rerun searched again")

    monkeypatch.setattr(budget, "search", searched)
    again = compress(_run_config(config), str(workdir))
    assert again["config"]["budget_search"] == report["config"]["budget_search"]
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]


def test_round_to_makes_every_tried_count_a_multiple_narrower_than_the_layer():
    # Written out: each of 3/4, 1/2, 1/4 of the width, to the nearest multiple.
    assert budget._counts(20) == [15, 10, 5]
    assert budget._counts(24, 8) == [16, 8]  # 18 -> 16, 12 -> 16, 6 -> 8
    assert budget._counts(48, 16) == [32, 16]  # 36 -> 32, 24 -> 32, 12 -> 16
    assert budget._counts(8, 8) == [] and budget._counts(2) == []  # nothing narrower


def test_round_to_needs_a_target():
    with pytest.raises(ValueError, match="--round_to rounds the counts a --target_flops"):
        validate(CompressConfig(round_to=8))
    with pytest.raises(ValueError, match="--round_to must be >= 0"):
        validate(CompressConfig(round_to=-1, target_flops=0.5))
    validate(CompressConfig(round_to=8, target_flops=0.5))


def test_round_to_defaults_to_4_with_a_target_and_to_any_count_otherwise():
    assert CompressConfig().round_to == 0 and CompressConfig().rounding == 1
    for target in ({"target_flops": (0.5,)}, {"target_params": (0.7, 0.5)},
                   {"target_latency": (0.5,)}):  # fmt: skip
        validate(CompressConfig(**target))
        assert CompressConfig(**target).rounding == 4
        assert CompressConfig(round_to=1, **target).rounding == 1  # free counts
        assert CompressConfig(round_to=8, **target).rounding == 8


def test_a_run_written_when_round_to_defaulted_to_1_resumes_unless_it_rounds_now(tmp_path):
    # Without a target, round_to 1 (the old default) and 0 (the new) are one run.
    cases = [({}, True), ({"target_latency": (0.5,)}, False), ({"target_flops": (0.5,)}, False)]
    for i, (target, resumes) in enumerate(cases):
        workdir = tmp_path / f"run{i}"
        settings = config_lib.to_json(CompressConfig(**target))
        assert settings["round_to"] == 0
        io.write_json(str(workdir / "run.json"), settings | {"round_to": 1})
        if resumes:
            Writer(str(workdir), settings)
        else:  # a search with free counts, not the default multiples of 4
            with pytest.raises(FileExistsError, match="round_to: 1 there, 0 now"):
                Writer(str(workdir), settings)


def test_a_run_written_when_allocation_defaulted_to_additive_resumes_unless_it_plans_now(
    tmp_path,
):
    # Without a --target_flops or --target_params no allocation is read: an old run's
    # 'additive' is the new default's run; with one, it planned otherwise.
    cases = [({}, True), ({"target_latency": (0.5,)}, True), ({"target_flops": (0.5,)}, False)]
    for i, (target, resumes) in enumerate(cases):
        workdir = tmp_path / f"run{i}"
        settings = config_lib.to_json(CompressConfig(**target))
        assert settings["allocation"] == "checked"
        io.write_json(str(workdir / "run.json"), settings | {"allocation": "additive"})
        if resumes:
            Writer(str(workdir), settings)
        else:
            with pytest.raises(FileExistsError, match="allocation: 'additive' there, 'checked'"):
                Writer(str(workdir), settings)
    # A run written before --allocation existed searched additively.
    old = {k: v for k, v in settings.items() if k != "allocation"}
    io.write_json(str(tmp_path / "older" / "run.json"), old)
    with pytest.raises(FileExistsError, match="allocation: 'additive' there"):
        Writer(str(tmp_path / "older"), settings)
    Writer(str(tmp_path / "older"), settings | {"allocation": "additive"})


def test_the_default_rounding_is_what_the_search_tries(setting, monkeypatch):
    # The counts each candidate layer is merged to in the sensitivity search: multiples
    # of 4 by default with a target, any count with --round_to=1 (densenet_test's
    # widths: 8 for the stem, 4 for a dense layer, 6 for a transition).
    config, color = setting
    tried = []

    def sensitivities(config, gray, train, candidates, counts, timed, *score):
        tried.append({layer: counts[layer] for layer, _ in candidates})
        raise RuntimeError("stop after the counts")

    monkeypatch.setattr(budget, "_sensitivities", sensitivities)
    for round_to in (0, 1):
        with pytest.raises(RuntimeError, match="stop after the counts"):
            _plan(_with(config, round_to=round_to), color)
    by_default, free = tried
    assert all(k % 4 == 0 for counts in by_default.values() for k in counts)
    assert any(k % 4 for counts in free.values() for k in counts)


def _flops_time(calls):
    """A stand-in for timing (no timed asserts): a plan's latency is its FLOPs fraction,
    which is not the sum of its layers' savings (a conv's input narrows with its producer)."""

    def time_plans(gray, plans):
        calls.append(plans)
        full = budget._size_of_plan(gray, {})["flops"]
        return {
            name: budget._size_of_plan(gray, steps)["flops"] / full for name, steps in plans.items()
        }

    return time_plans


@pytest.mark.slow
def test_latency_target_is_met_as_measured_on_the_planned_model(setting):
    config, color = setting
    config = _with(config, target_flops=(), target_latency=0.6)
    train_split = data.load_dataset(config.dataset, "train")
    gray = stages.fold_color_model(config, color, train_split)
    calls = []
    [plan] = budget.search(config, gray, color, train_split, time_plans=_flops_time(calls))
    assert plan.target == ("latency", 0.6)
    # Every option was timed (with the narrowest plan) before any sensitivity, and whole
    # candidate plans after: what the plan reached is their measurement, not a sum.
    assert "smallest" in calls[0] and all(":" in n for n in calls[0] if n != "smallest")
    assert dict(plan.steps) in calls[-1].values()
    measured = _flops_time([])(gray, {"p": dict(plan.steps)})["p"]
    assert plan.achieved["latency"] == pytest.approx(measured) and measured <= 0.6
    for o in plan.options:
        assert o.latency == pytest.approx(_flops_time([])(gray, {"o": {o.layer: o.clusters}})["o"])
    assert budget.Plan.from_json(plan.to_json()) == plan
    # The real timing: one fraction per plan (its size is the machine's, not asserted).
    real = budget.measure_plans(gray, {"plan": dict(plan.steps)}, config)
    assert set(real) == {"plan"} and 0 < real["plan"] < 10
    with pytest.raises(ValueError, match="--target_latency: cannot reach 0.01 of the gray"):
        budget.search(_with(config, target_latency=0.01), gray, color, train_split,
                      time_plans=_flops_time([]))  # fmt: skip


def _options(timed, drops):
    return [budget.Option(int(k[0]), int(k[2:]), drop=drops[k], params=0, flops=0, latency=v)
            for k, v in timed.items()]  # fmt: skip


def _least_drop_under(target, drops, timings):
    """The reference: of every plan timed, the one of least summed drop measured at
    `target` or under, of equal drops the slowest (`drops` are all positive here)."""
    timed = [(s, m) for call in timings for s, m in call]
    met = [(sum(drops[f"{k}:{c}"] for k, c in s.items()), -m, s) for s, m in timed if m <= target]
    return min(met, key=lambda dms: dms[:2])[2]


def _no_flops_plan(fraction):
    """A stand-in for `at_flops` where no FLOPs fraction can be planned."""
    raise ValueError(f"--target_flops: cannot reach {fraction}")


class _Clock:
    """A stand-in for timing: `measure(steps)` for each plan, every call recorded."""

    def __init__(self, measure):
        self.measure, self.calls = measure, []

    def __call__(self, gray, plans):
        self.calls.append([(s, self.measure(s)) for s in plans.values()])
        return {n: self.measure(s) for n, s in plans.items()}


def test_measured_allocation_picks_steps_by_the_whole_plans_drop():
    # Layers 1 and 2 are each cheap alone but lose 5 points together; 1 and 3, 1.5.
    saving = {1: 30, 2: 30, 3: 25}  # of a size of 100
    alone = {1: 0.5, 2: 0.6, 3: 1.0}
    together = {(1,): 0.5, (2,): 0.6, (3,): 1.0, (1, 2): 5.0, (1, 3): 1.5, (2, 3): 1.6,
                (1, 2, 3): 6.0}  # fmt: skip
    options = [budget.Option(k, 8, drop=alone[k], params=0, flops=100 - saving[k]) for k in alone]
    size_of = lambda steps: 100 - sum(saving[k] for k in steps)  # noqa: E731
    measured = []
    drop_of = lambda steps: measured.append(dict(steps)) or together[tuple(sorted(steps))]  # noqa: E731
    additive = allocation.allocate(options, "flops", 45, 100, size_of)
    assert additive == {1: 8, 2: 8}  # the sum of the drops: 1.1, as measured 5.0
    steps = allocation.allocate_measured(options, "flops", 45, size_of, drop_of)
    assert steps == {1: 8, 3: 8} and size_of(steps) <= 45
    assert {1: 8, 2: 8} in measured and {1: 8, 3: 8} in measured  # both were measured
    # Measuring only the cheapest next step by the added drops is the additive plan.
    assert allocation.allocate_measured(options, "flops", 45, size_of, drop_of, top=1) == additive
    with pytest.raises(ValueError, match="--target_flops: cannot reach 10 flops"):
        allocation.allocate_measured(options, "flops", 10, size_of, drop_of)


def test_a_latency_plan_is_the_least_predicted_drop_of_the_timed_plans_that_meet_it():
    timed = {"1:8": 0.74, "1:4": 0.6, "2:8": 0.9, "3:8": 0.85}  # fractions of the gray's
    drops = {"1:8": 0.5, "1:4": 3.0, "2:8": 0.2, "3:8": 0.1}  # accuracy lost, points
    options = _options(timed, drops)
    size_of = lambda steps: allocation.latency_of_plan(timed, steps)  # noqa: E731
    # Measured as predicted: the latency path's plans; the kept one is the reference's.
    exact = _Clock(size_of)
    steps, measured = allocation.meet_latency(None, options, 0.75, size_of, _no_flops_plan, exact)
    assert len(exact.calls) == 1 and len(exact.calls[0]) >= 2  # one interleaved timing
    assert steps == _least_drop_under(0.75, drops, exact.calls) and measured <= 0.75
    # A FLOPs plan (layers 2 and 3: 0.3 points lost) that the latency path does not
    # make is timed too, and kept: as fast as needed, less lost.
    flops_plan = lambda fraction: {2: 8, 3: 8}  # noqa: E731
    clock = _Clock(size_of)
    steps, measured = allocation.meet_latency(None, options, 0.75, size_of, flops_plan, clock)
    assert steps == {2: 8, 3: 8} and measured == pytest.approx(0.75)
    # Every plan measured 0.35 slower than predicted: none near the target meets it at
    # first; the re-plan to a budget cut by the miss does.
    slow = _Clock(lambda s: size_of(s) + 0.35)
    steps, measured = allocation.meet_latency(None, options, 0.75, size_of, _no_flops_plan, slow)
    assert len(slow.calls) >= 2 and measured == pytest.approx(size_of(steps) + 0.35)
    assert measured <= 0.75 and steps == _least_drop_under(0.75, drops, slow.calls)
    # Never under 0.8 as measured: no exception, the fastest plan measured.
    floor = _Clock(lambda s: max(size_of(s), 0.8))
    steps, measured = allocation.meet_latency(None, options, 0.75, size_of, _no_flops_plan, floor)
    assert measured == 0.8 and len(floor.calls) >= 2
    # An option scored above the unmerged model (-2 points: selection noise) is no gain:
    # a plan that adds it to one already fast enough does not win by it.
    noisy = {"1:8": 0.6, "4:8": 0.95}
    options = _options(noisy, {"1:8": 0.5, "4:8": -2.0})
    size_of = lambda steps: allocation.latency_of_plan(noisy, steps)  # noqa: E731
    both = lambda fraction: {1: 8} if fraction > 0.6 else {1: 8, 4: 8}  # noqa: E731
    steps, _ = allocation.meet_latency(None, options, 0.62, size_of, both, _Clock(size_of))
    assert steps == {1: 8}


# --search_images: a cheaper score, on training data still.


def _poisoned(config, tmp_path, name, pick):
    """The dataset with the images `pick(class indices)` of each class replaced by noise."""
    split = data.load_dataset(config.dataset, "all")
    images = split.images.copy()
    for c in range(10):
        idx = pick(np.flatnonzero(split.labels == c))
        images[idx] = np.random.default_rng(c).integers(0, 256, images[idx].shape, np.uint8)
    path = tmp_path / f"{name}.npz"
    np.savez(path, images=images, labels=split.labels)
    return f"npz:{path}"


def test_search_images_reads_the_selection_images_of_training_data_only(setting, tmp_path):
    config, color = setting
    cheap = _with(config, search_images=20)  # 2 images a class: the last of its training
    plan = _plan(cheap, color)
    # The validation images (the last 20% of each class) poisoned: the same numbers.
    validation = _poisoned(config, tmp_path, "val", lambda idx: idx[-round(len(idx) * 0.2) :])
    again = _plan(_with(cheap, dataset=validation), color)
    assert again.steps == plan.steps
    assert [o.drop for o in again.options] == [o.drop for o in plan.options]
    # Its 2 selection images a class (the training images just before them) poisoned:
    # other drops, so those are the images it scores on.
    n = lambda idx: len(idx) - round(len(idx) * 0.2)  # noqa: E731
    selection = _poisoned(config, tmp_path, "sel", lambda idx: idx[n(idx) - 2 : n(idx)])
    moved = _plan(_with(cheap, dataset=selection), color)
    assert [o.drop for o in moved.options] != [o.drop for o in plan.options]


def test_search_images_0_is_the_selection_accuracy_of_500_images(setting):
    # The default score written out: budget._accuracy on the last 50 images a class.
    config, color = setting
    train_split = data.load_dataset(config.dataset, "train")
    gray = stages.fold_color_model(config, color, train_split)
    selected = budget.selection_split(train_split, 50)
    score = functools.partial(budget._accuracy, gray.config, train_split, selected, config.seed)
    [default] = budget.search(config, gray, color, train_split)
    [explicit] = budget.search(config, gray, color, train_split, score=score)
    assert default.options == explicit.options and default.steps == explicit.steps
    assert default.selection_accuracy == score(gray.variables)
    [cheap] = budget.search(_with(config, search_images=20), gray, color, train_split)
    assert [o.drop for o in cheap.options] != [o.drop for o in default.options]


def test_the_divergence_is_the_kl_of_the_predictions():
    # Written out with numpy: sum p (log p - log q) per row, the mean over rows.
    rng = np.random.default_rng(0)
    ref, logits = rng.normal(size=(2, 5, 4))
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.mean(np.sum(p * np.log(p / q), -1))
    got = search_proxy.kl_divergence(jax.nn.log_softmax(ref, -1), logits)
    assert np.isclose(float(got), expected, rtol=1e-5)
    assert float(search_proxy.kl_divergence(jax.nn.log_softmax(ref, -1), ref)) < 1e-6
    # Recalibration batches: the default's 8 per 500 images, at least one.
    assert [search_proxy.bn_batches(n) for n in (20, 128, 250, 500)] == [1, 2, 4, 8]


def test_search_images_needs_a_target_and_is_one_error_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="^--search_images sets the data of a --target_flops"):
        compress(CompressConfig(search_images=128), str(tmp_path / "w"))
    with pytest.raises(ValueError, match=r"^--search_images must be >= 0, got -1$"):
        compress(CompressConfig(search_images=-1, target_flops=0.5), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    validate(CompressConfig(search_images=128, target_flops=0.5))


def test_allocation_needs_a_size_target_and_a_known_name_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="^--allocation=measured plans a --target_flops"):
        compress(CompressConfig(allocation="measured"), str(tmp_path / "w"))
    with pytest.raises(ValueError, match="^--allocation=additive plans a .*leave it 'checked'"):
        compress(CompressConfig(allocation="additive", layers=(1,)), str(tmp_path / "w"))
    with pytest.raises(ValueError, match="^--allocation=measured plans a --target_flops"):
        compress(CompressConfig(allocation="measured", target_latency=0.5), str(tmp_path / "w"))
    with pytest.raises(ValueError, match="allocation.*'greedy'"):
        compress(CompressConfig(allocation="greedy", target_flops=0.5), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    validate(CompressConfig(allocation="measured", target_params=0.5))
    validate(CompressConfig(allocation="floor", target_flops=0.5))
    with pytest.raises(ValueError, match="^--allocation=floor plans a --target_flops"):
        validate(CompressConfig(allocation="floor", layers=(1,)))
    validate(CompressConfig(allocation="additive", target_params=0.5))
    # The default is no request: runs without a size target take it.
    validate(CompressConfig(target_latency=0.5))
    validate(CompressConfig(layers=(1,)))


def test_the_settings_line_shows_the_search_a_target_ran_not_the_layers_it_replaced():
    with_target = config_lib.to_json(CompressConfig(target_latency=(0.5,)))
    line = report_lib._settings(with_target)
    # A latency target reads no --allocation: it is not shown.
    assert "target_latency=0.5, round_to=0 (multiples of 4), search_images=0" in line
    assert "layers=" not in line and "num_clusters=" not in line and "target_flops" not in line
    line = report_lib._settings(config_lib.to_json(CompressConfig(target_flops=(0.7, 0.5))))
    assert "target_flops=0.7,0.5, round_to=0" in line
    line = report_lib._settings(config_lib.to_json(CompressConfig()))
    assert "layers=[1, 2], fold=sum" in line and "num_clusters=1:20,2:12" in line
    assert "compensate=auto (lstsq_color)" in line
    assert "compensate=auto (none)" in report_lib._settings(with_target)


def test_auto_compensation_is_the_color_refit_except_at_a_target_without_fine_tuning():
    """--compensate=auto (the default): lstsq_color for the default command and after a
    target's fine-tune, none at a target's BN budget; any other value is kept."""
    default = CompressConfig()
    assert default.compensate == "auto" and default.compensation == "lstsq_color"
    at = lambda **kw: dataclasses.replace(default, **kw).compensation  # noqa: E731
    assert at(target_flops=(0.5,)) == at(target_params=(0.5,)) == "none"
    assert at(target_latency=(0.5,)) == at(target_flops=(0.7, 0.5)) == "none"
    assert at(target_flops=(0.35,), finetune_epochs=3) == "lstsq_color"
    assert at(finetune_epochs=3) == "lstsq_color"
    for value in ("none", "lstsq", "lstsq_color"):
        assert at(compensate=value) == at(compensate=value, target_flops=(0.5,)) == value
    assert with_preset(CompressConfig(preset="study")).compensation == "none"


def test_the_report_says_which_score_ranked_the_options():
    search = {"steps": [{"layer": 1, "clusters": 4}], "target": {"flops": 0.5},
              "achieved": {"flops": 0.49}, "selection_accuracy": 0.5, "options": []}  # fmt: skip
    default = " ".join(report_lib._budget_search(search))
    assert "accuracy lost (points)" in default and "(unmerged: 50.0%)" in default
    cheap = " ".join(report_lib._budget_search(search, 130))
    assert "KL divergence" in cheap and "130 selection images" in cheap
    assert "unmerged: " not in cheap  # its base score is no accuracy
