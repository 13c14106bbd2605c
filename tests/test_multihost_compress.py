"""compress and baselines on several processes: two localhost `jax.distributed` processes
with one CPU device each, against one process with two host devices (the README's
commands, run as CLIs), on a densenet_test trained one epoch and 160 + 160 images.

Every accuracy of every report row (validation and held out) must be equal, and every
row's saved model equal to float rounding. A killed process must stop the other with
one `error:` line, and a rerun of both must resume and end with the same report.

Every child runs in its own session and is killed by process group in a `finally`; every
wait has a timeout.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_multihost import _free_port, _kill_process_1, _lines, _stop

from graycnn import tree
from graycnn.training import checkpoint, data, train

pytestmark = pytest.mark.slow  # each test runs a CLI three times: two processes and one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 400  # a bound on each run, far above its ~60 s on 2 shared cores
# The tests' XLA level (tests/conftest.py) in every child: both sides compile alike.
LEVEL = "--xla_backend_optimization_level=0"


def _start(args: list[str], logs, process_id: int | None = None, port: int = 0):
    """One CLI process: of a two-process run (`process_id`), else one with 2 devices."""
    env = os.environ | {"PYTHONPATH": ROOT}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=2 {LEVEL}"
    name = "single"
    if process_id is not None:
        env |= {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {LEVEL}",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(process_id),
        }
        args = [*args, "--distributed", "--peer_timeout=10"]
        name = str(process_id)
    out = open(logs / f"stdout{name}.txt", "w")  # noqa: SIM115 - closed with the run
    err = open(logs / f"stderr{name}.txt", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out, stderr=err,
        start_new_session=True,
    )  # fmt: skip


def _run(args: list[str], logs, processes: int) -> None:
    """Runs the CLI to its end: one process (2 devices), or two of one device each."""
    port = _free_port()
    children = (
        [_start(args, logs)] if processes == 1 else [_start(args, logs, i, port) for i in (0, 1)]
    )
    names = ["single"] if processes == 1 else ["0", "1"]
    try:
        for name, p in zip(names, children, strict=True):
            status = p.wait(timeout=TIMEOUT)
            assert status == 0, "\n".join(_lines(logs / f"stderr{name}.txt")[-30:])
    finally:
        _stop(children)


def _report(workdir) -> dict:
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f)


def _same_models(first, second, paths) -> None:
    """The checkpoints at `paths` (relative to each workdir) hold equal weights."""
    for path in paths:
        _, a, _ = checkpoint.load_model(os.path.join(first, path))
        _, b, _ = checkpoint.load_model(os.path.join(second, path))
        a, b = tree.flatten(a), tree.flatten(b)
        assert a.keys() == b.keys(), path
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def _same_compress_reports(one, two) -> list[dict]:
    """Every row of the two reports equal in name, accuracies (validation, held out),
    size and clusters; every row's model equal."""
    rows = [_report(one)["rows"], _report(two)["rows"]]
    assert [r["key"] for r in rows[0]] == [r["key"] for r in rows[1]]
    for a, b in zip(*rows, strict=True):
        for field in ("name", "accuracy", "params", "flops", "clusters", "checkpoint"):
            assert a[field] == b[field], (a["key"], field)
        assert a["eval"]["accuracy"] == b["eval"]["accuracy"], a["key"]
        assert a["eval"]["examples"] == b["eval"]["examples"] == 160
        assert a.get("delta") == b.get("delta") and a.get("ci95") == b.get("ci95")
    _same_models(one, two, sorted({r["checkpoint"] for r in rows[0]}))
    return rows[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sample_npz):
    """(the color checkpoint, the held-out npz): densenet_test trained one epoch on the
    160 images of sample_npz; 160 other images (cifar10_sample's test split)."""
    workdir = str(tmp_path_factory.mktemp("color"))
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1)
    train.train_and_evaluate(config, workdir)
    split = data.load_dataset("cifar10_sample", "test")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:16] for c in range(10)])
    held_out = str(tmp_path_factory.mktemp("held_out") / "held_out.npz")
    np.savez(held_out, images=split.images[idx], labels=split.labels[idx])
    return workdir, held_out


def _compress(inputs, sample_npz, *more: str) -> list[str]:
    color, held_out = inputs
    return [
        "experiments.compress", f"--checkpoint={color}", f"--dataset=npz:{sample_npz}",
        f"--eval_dataset=npz:{held_out}", "--layers=1", "--controls=false", "--steps=3",
        *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(inputs, sample_npz, tmp_path_factory):
    """The reference: compress by one process with two devices, to a FLOPs target with
    the budget search, the default color refit, fine-tuning and the speed table; its
    workdir."""
    logs = tmp_path_factory.mktemp("one_process")
    workdir = logs / "run"
    args = _compress(
        inputs, sample_npz, "--target_flops=0.8", "--round_to=1", "--finetune_epochs=1",
        "--speed_rounds=1", "--speed_batch=8", "--compensate_images=32",
    )  # fmt: skip
    _run([*args, f"--workdir={workdir}"], logs, processes=1)
    return args, workdir


def test_two_processes_killed_then_rerun_equal_one_process(one_process, tmp_path):
    """Process 1 is killed during the BN training of the first gray row; process 0 must
    stop with one `error:` line. The same two commands again finish the run: the budget
    search (before the kill), the refit, fine-tuning and the speed table (timed by
    process 0 alone) give every row and model of one uninterrupted process."""
    args, reference = one_process
    workdir = tmp_path / "run"
    port = _free_port()
    children = [_start([*args, f"--workdir={workdir}"], tmp_path, i, port) for i in (0, 1)]
    # Killed once the first BN training has begun.
    _kill_process_1(children, tmp_path, (workdir / "bn").is_dir, "BN training", TIMEOUT)
    assert not (workdir / "report.json").exists()

    _run([*args, f"--workdir={workdir}"], tmp_path, processes=2)
    rows = _same_compress_reports(reference, workdir)
    assert [r["key"] for r in rows] == [
        "color", "color_gray3", "gray_fold", "gray_bn", "gray_finetune", "gray_refit_bn",
        "gray_refit_finetune", "merged_1_raw", "merged_1", "merged_1_finetune",
    ]  # fmt: skip
    assert all(r["speed"] for r in _report(workdir)["rows"])
    searches = [_report(w)["config"]["budget_search"] for w in (reference, workdir)]
    assert searches[0]["steps"] == searches[1]["steps"] == [{"layer": 1, "clusters": 6}]
    for a, b in zip(searches[0]["options"], searches[1]["options"], strict=True):
        assert (a["layer"], a["clusters"], a["drop"]) == (b["layer"], b["clusters"], b["drop"])
    # Process 0 wrote every file once; the BN training ran on both (its checkpoints).
    names = {"run.json", "report.json", "report.md", "budget_search.json", "refits", "figures"}
    assert names <= set(os.listdir(workdir))
    assert not [n for n in os.listdir(workdir) if n.startswith(".tmp")]
    # Both print the report's tables, alike.
    tables = [[x for x in _lines(tmp_path / f"stdout{i}.txt") if x.startswith("|")] for i in (0, 1)]
    assert tables[0] == tables[1] and len(tables[0]) > 12


def test_baselines_on_two_processes_equals_one_process(sample_npz, tmp_path):
    args = ["experiments.baselines", "--models=densenet_test", f"--dataset=npz:{sample_npz}",
            "--epochs=1"]  # fmt: skip
    _run([*args, f"--workdir={tmp_path / 'one'}"], tmp_path, processes=1)
    _run([*args, f"--workdir={tmp_path / 'two'}"], tmp_path, processes=2)
    rows = [_report(tmp_path / w)["rows"] for w in ("one", "two")]
    assert len(rows[0]) == 5
    for a, b in zip(*rows, strict=True):
        assert (a["row"], a["accuracy"], a["history"]) == (b["row"], b["accuracy"], b["history"])
        assert a["params"] == b["params"]
        where = [
            os.path.relpath(r["checkpoint"], tmp_path / w) for r, w in ((a, "one"), (b, "two"))
        ]
        assert where[0] == where[1]
        _same_models(tmp_path / "one", tmp_path / "two", where[:1])


def test_transfer_on_two_processes_equals_one_process(inputs, sample_npz, tmp_path):
    color, held_out = inputs
    args = ["experiments.transfer", f"--checkpoint={color}", f"--dataset=npz:{sample_npz}",
            f"--eval_dataset=npz:{held_out}", "--steps=4", "--eval_every=2", "--batch_size=16",
            "--layers=1", "--num_clusters=4"]  # fmt: skip
    _run([*args, f"--workdir={tmp_path / 'one'}"], tmp_path, processes=1)
    _run([*args, f"--workdir={tmp_path / 'two'}"], tmp_path, processes=2)
    rows = [_report(tmp_path / w)["rows"] for w in ("one", "two")]
    assert [r["kind"] for r in rows[0]] == ["scratch", "transfer", "merged"]
    for a, b in zip(*rows, strict=True):
        # The validation curve (every 2 steps) and the held-out accuracy with its stats.
        assert (a["kind"], a["curve"], a["eval"]) == (b["kind"], b["curve"], b["eval"])
        assert (a["params"], a["flops"]) == (b["params"], b["flops"])
        assert [s for s, _ in a["curve"]] == [0, 2, 4]
