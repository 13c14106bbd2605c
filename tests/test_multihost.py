"""The multi-host path on one machine: two CPU processes of one device each, joined over
loopback with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, against this
process's two host devices on the same global batches.

Every child runs in its own session and is killed by process group in a `finally`; every
wait has a timeout.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from graycnn import tree
from graycnn.models import init_variables
from graycnn.training import checkpoint

pytestmark = pytest.mark.slow  # each test starts two processes and trains in both

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
TIMEOUT = 300  # a bound on each run, far above its ~30 s; never reached when all is well


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], process_id: int, port: int, logs) -> subprocess.Popen:
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",  # one device per process
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(process_id),
        "PYTHONPATH": ROOT,
    }
    out = open(logs / f"stdout{process_id}.txt", "w")  # noqa: SIM115 - closed with the run
    err = open(logs / f"stderr{process_id}.txt", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, *command], cwd=ROOT, env=env, stdout=out, stderr=err,
        start_new_session=True,
    )  # fmt: skip


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def _lines(path) -> list[str]:
    # Progress bars redraw with \r: each redraw is a line of its own.
    return re.split(r"[\r\n]", path.read_text())


def _tail(logs, process_id: int) -> str:
    return "\n".join(_lines(logs / f"stderr{process_id}.txt")[-30:])


def test_two_processes_match_one_process_with_two_devices(sample_npz, tmp_path):
    dataset = f"npz:{sample_npz}"
    init = jax.device_get(init_variables(multihost_worker.MODEL, jax.random.key(0)))
    np.savez(tmp_path / "init.npz", **tree.flatten(init))
    workdir = tmp_path / "two_processes"
    workdir.mkdir()
    port, start = _free_port(), time.monotonic()
    command = [
        WORKER, "--distributed", f"--dataset={dataset}", f"--init={tmp_path / 'init.npz'}",
        f"--workdir={workdir}",
    ]  # fmt: skip
    processes = [_start(command, i, port, tmp_path) for i in range(2)]
    try:
        for i, p in enumerate(processes):
            assert p.wait(timeout=TIMEOUT) == 0, _tail(tmp_path, i)
    finally:
        _stop(processes)
    seconds = time.monotonic() - start
    results = [dict(np.load(workdir / f"process{i}.npz")) for i in range(2)]
    print(f"two processes: {seconds:.1f} s")

    # Every batch (train, evaluation, recalibration) reached both processes whole, and
    # each placed only its own rows: disjoint, together the whole batch, and on its
    # device exactly those rows of the batch.
    batches = int(results[0]["batches"])
    assert batches == int(results[1]["batches"]) > 10
    for b in range(batches):
        first, second = ({k: r[f"batch{b}/{k}"] for k in ("length", "sum", "rows", "exact")}
                         for r in results)  # fmt: skip
        assert first["length"] == second["length"] and first["sum"] == second["sum"]
        assert first["exact"] and second["exact"], f"batch {b}: a process placed wrong rows"
        assert not set(first["rows"]) & set(second["rows"]), f"batch {b}: rows overlap"
        assert sorted([*first["rows"], *second["rows"]]) == list(range(first["length"]))

    # Each process held one device, and both hold the whole result: the trained weights
    # first, then the fields, the BN statistics and the per-example evaluation.
    reference = multihost_worker.run_stages(dataset, str(tmp_path / "one_process"), init)
    assert [r["devices"] for r in results] == [1, 1]
    keys = sorted(reference, key=lambda k: (not k.startswith("trained/"), k))
    for key in keys:
        for r in results:
            np.testing.assert_allclose(r[key], reference[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert any(k.startswith("recalibrated/batch_stats/") for k in keys)
    assert reference["fields"].shape == (4, 32, 32, 3)
    # The primary process wrote the one checkpoint; it holds the trained weights.
    _, saved, _ = checkpoint.load_model(str(workdir / "train"))
    for key, value in tree.flatten(saved).items():
        np.testing.assert_array_equal(value, results[0][f"trained/{key}"], err_msg=key)


def test_a_killed_process_stops_the_other_with_one_error_line(sample_npz, tmp_path):
    """The README's command; process 1 is killed once training has begun."""
    port = _free_port()
    command = [
        "-m", "experiments.train", "--distributed", "--model=densenet_test",
        f"--dataset=npz:{sample_npz}", "--epochs=20", "--peer_timeout=10",
        f"--workdir={tmp_path / 'run'}",
    ]  # fmt: skip
    processes = [_start(command, i, port, tmp_path) for i in range(2)]
    began = lambda: any("epoch 1/20" in line for line in _lines(tmp_path / "stderr0.txt"))  # noqa: E731
    _kill_process_1(processes, tmp_path, began, "training")


def _kill_process_1(processes, logs, began, what: str, timeout: float = TIMEOUT) -> None:
    """Once `began()`, kills process 1: process 0 must end with one `error:` line naming
    itself, within a minute."""
    try:
        deadline = time.monotonic() + timeout
        while not began():
            assert processes[0].poll() is None, _tail(logs, 0)
            assert time.monotonic() < deadline, f"{what} never began"
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status = processes[0].wait(timeout=90)
        seconds = time.monotonic() - killed
    finally:
        _stop(processes)
    print(f"process 0 stopped {seconds:.1f} s after process 1 was killed")
    errors = [line for line in _lines(logs / "stderr0.txt") if line.startswith("error:")]
    assert status != 0 and len(errors) == 1, _tail(logs, 0)
    assert errors[0].startswith("error: process 0 of 2: "), errors
    assert seconds < 60
