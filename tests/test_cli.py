"""The CLIs as a user runs them, in subprocesses."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from graycnn.training import data, evaluation, train

pytestmark = pytest.mark.slow  # every test runs a CLI in a new Python process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "flags, total",
    [
        ([], 995230),
        (["--in_channels=1"], 994582),
        (["--in_channels=1", "--widths=1:20,2:12"], 950046),
    ],
)
def test_summary_ends_with_total(flags, total):
    result = _run("experiments.summary", "--model=densenet_seed", *flags)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"total parameters: {total}"
    assert any(line.split()[:2] == ["1", "stem"] for line in lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_npz):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1)
    model_config, variables, _ = train.train_and_evaluate(config, workdir)
    return workdir, model_config, variables


@pytest.mark.parametrize(
    "view, split, examples", [("color", None, 160), ("gray3", "validation", 30)]
)
def test_evaluate_loads_the_model_from_the_checkpoint(trained, sample_npz, view, split, examples):
    """An npz file is evaluated whole unless a split is asked for."""
    workdir, model_config, variables = trained
    flags = [f"--split={split}"] if split else []
    result = _run(
        "experiments.evaluate",
        f"--checkpoint={workdir}",
        f"--dataset=npz:{sample_npz}",
        f"--view={view}",
        *flags,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected_split = data.load_dataset(f"npz:{sample_npz}", split or "all")
    expected = evaluation.evaluate(model_config, variables, expected_split, view)
    assert report["examples"] == examples == len(expected_split) and report["params"] > 0
    assert report["split"] == (split or "all")
    assert report["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)


def test_cli_errors_are_one_clear_line(tmp_path):
    result = _run("experiments.evaluate", f"--checkpoint={tmp_path}/nothing")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint directory")
    result = _run("experiments.train", "--dataset=imagenet", f"--workdir={tmp_path}/w")
    assert result.returncode == 2 and "unknown dataset 'imagenet'" in result.stderr
    result = _run("experiments.summary", "--model=densenet_tiny", "--widths=18:4")
    assert result.returncode == 2 and "layer 18 does not exist" in result.stderr


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path):
    workdir, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    for f in copy.rglob("manifest.ocdbt"):
        f.write_bytes(b"garbage")
    result = _run("experiments.evaluate", f"--checkpoint={copy}")
    assert result.returncode == 2
    # Orbax's own restore threads may add a stray traceback line (BUILD_NOTES.md, orbax
    # pitfalls); our message is one line.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is corrupt or incomplete" in errors[0]
