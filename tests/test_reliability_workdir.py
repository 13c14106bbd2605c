"""Workdirs (issue 33): one writer at a time, never into someone else's directory, no
debris after an input error, each epoch logged once, and Ctrl-C as one line.

Every child process runs in its own session and is killed by process group in a
`finally`; every wait has a timeout.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from graycnn import study
from graycnn.cli import runtime, workdir
from graycnn.study import baselines
from graycnn.training import checkpoint, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "graycnn" / "assets" / "densenet_tiny_color"
TIMEOUT = 120


def _tree(path: pathlib.Path) -> list[tuple[str, int]]:
    """Every file under `path` with its size: what "untouched" compares."""
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file()
    )


def _popen(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
        text=True, start_new_session=True, **kwargs,
    )  # fmt: skip


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=TIMEOUT)


# A process that claims a workdir for `command`, says so on stdout, and holds it.
_HOLDER = """
import sys, time
from graycnn.cli import workdir
with workdir.claim(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(path: pathlib.Path, command: str) -> subprocess.Popen:
    holder = _popen(["-c", _HOLDER, str(path), command], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    return holder


def _last_line(text: str) -> str:
    # Progress bars redraw with \r: each redraw is a line of its own.
    return [line for line in re.split(r"[\r\n]", text) if line.strip()][-1]


@pytest.mark.slow
def test_a_second_compress_is_refused_while_the_first_holds_the_workdir(tmp_path):
    """The issue's data loss: a second compress into a workdir in use exits 2 with one
    line before any work, and leaves the first run's files as they were; once the holder
    is killed (SIGKILL: no cleanup runs), the lock is gone with it."""
    run = tmp_path / "run"
    holder = _hold(run, "compress")
    try:
        (run / "report.md").write_text("the first run's report\n")
        before = _tree(run)
        start = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "experiments.compress", "--layers=1", f"--workdir={run}"],
            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        seconds = time.monotonic() - start
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines() == [
            f"error: --workdir {run} is in use by another run (compress, pid {holder.pid} on "
            f"{os.uname().nodename}); wait for it to finish, or pass another --workdir"
        ]
        assert _tree(run) == before and (run / "report.md").read_text().startswith("the first")
        assert seconds < 60  # refused at once (the study itself takes minutes)
    finally:
        _kill(holder)
    assert holder.returncode == -signal.SIGKILL
    with workdir.claim(str(run), "compress"):  # no stale lock
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run, "train")
    try:
        with pytest.raises(
            ValueError, match=rf"is in use by another run \(train, pid {holder.pid}"
        ):
            with workdir.claim(str(run), "train"):
                pass
    finally:
        _kill(holder)
    with workdir.claim(str(run), "train") as path:
        assert path == str(run)
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


# One fuzz process: claims the workdir again and again for `seconds`, logging each hold
# (enter/exit lines, O_APPEND) to the log; sometimes fails inside the claim (a run that
# wrote nothing, whose new directory is then removed) or dies holding it (SIGKILL of
# itself: the kernel drops the lock).
_FUZZER = """
import os, random, signal, sys, time
from graycnn.cli import workdir
path, log, seed, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(seed)
print("ready", flush=True)
sys.stdin.readline()  # everyone starts together
def note(text):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{text} {os.getpid()}\\n".encode())
    os.close(fd)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with workdir.claim(path, "compress"):
            note("enter")
            time.sleep(rng.uniform(0, 0.02))
            if rng.random() < 0.03:
                note("die")
                os.kill(os.getpid(), signal.SIGKILL)
            if rng.random() < 0.3:
                note("exit")
                raise RuntimeError("fail inside")
            with open(os.path.join(path, "owner"), "w") as f:
                f.write(str(os.getpid()))
            note("exit")
    except RuntimeError:
        pass
    except ValueError as e:
        assert "is in use by another run" in str(e), e
        note("refused")
    time.sleep(rng.uniform(0, 0.01))
"""


@pytest.mark.slow
def test_concurrent_writers_fuzz_one_holder_at_a_time(tmp_path):
    """Four processes race for one workdir for a few seconds: the log of holds never
    overlaps (each enter is followed by the same process's exit or death), every
    refusal is the in-use error, and processes that die holding the lock do not block
    the others."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    fuzzers = [
        _popen(["-c", _FUZZER, str(run), str(log), str(seed), "3"],
               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for seed in range(4)
    ]  # fmt: skip
    try:
        for f in fuzzers:
            assert f.stdout.readline() == "ready\n", f.stderr.read()
        for f in fuzzers:
            f.stdin.write("go\n")
            f.stdin.flush()
        for f in fuzzers:
            f.wait(timeout=TIMEOUT)
            assert f.returncode in (0, -signal.SIGKILL), f.stderr.read()[-2000:]
    finally:
        for f in fuzzers:
            _kill(f)
    events = [line.split() for line in log.read_text().splitlines()]
    holder = None
    holders, refused = set(), 0
    for event, pid in events:
        if event == "refused":
            refused += 1
        elif event == "enter":
            assert holder is None, f"{pid} entered while {holder} held the workdir"
            holder = pid
            holders.add(pid)
        else:  # exit or die
            assert holder == pid, f"{event} of {pid} while {holder} held the workdir"
            holder = None
    assert len(holders) >= 2 and refused > 0  # the race really happened
    # The last hold that wrote the owner file was a process whose hold completed.
    if (run / "owner").exists():
        owner = (run / "owner").read_text()
        assert ["exit", owner] in events


def test_train_refuses_a_model_checkpoint_and_leaves_it_untouched(tmp_path, sample_npz):
    """The issue: train into a copy of the shipped checkpoint started a fresh model
    inside it, which evaluate then scored. Refused with one line; nothing written."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SHIPPED, ckpt)
    before = _tree(ckpt)
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1)
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(config, str(ckpt))
    assert runtime.error_line(e.value) == (
        f"error: --workdir {ckpt} holds a model checkpoint, not a train run; train writes "
        "only into a new directory or its own run: pass another --workdir"
    )
    assert _tree(ckpt) == before
    model_config, _, _ = checkpoint.load_model(str(ckpt))
    assert model_config.name == "densenet_tiny"  # still the shipped model, not a new one


def test_compress_and_baselines_refuse_another_commands_run(tmp_path, sample_npz):
    """A compress workdir that is a model checkpoint or a train run, and a baselines
    workdir that is a compress run, are refused before any work, untouched."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SHIPPED, ckpt)
    trained = tmp_path / "trained"
    (trained / "checkpoints").mkdir(parents=True)
    (trained / "metrics.jsonl").write_text('{"epoch": 1}\n')
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    (compressed / "run.json").write_text("{}\n")
    small = study.CompressConfig(layers=(1,))
    for path, kind, run in [
        (ckpt, "a model checkpoint", lambda p: study.compress(small, p)),
        (trained, "a train run", lambda p: study.compress(small, p)),
        (compressed, "a compress run", lambda p: baselines.run_baselines(
            ["densenet_test"], p, train.TrainConfig(dataset=f"npz:{sample_npz}"))),
    ]:  # fmt: skip
        before = _tree(path)
        with pytest.raises(ValueError, match=f"--workdir {path} holds {kind}, not a"):
            run(str(path))
        assert _tree(path) == before


def test_an_input_error_leaves_no_workdir_behind(tmp_path):
    """train made the workdir and its checkpoints/ before reading the dataset: a missing
    dataset left both behind. A directory that existed is left as it was."""
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{tmp_path}/missing.npz")
    new = tmp_path / "new" / "run"  # its parent too is made, and removed
    with pytest.raises(ValueError, match="missing.npz.* does not exist"):
        train.train_and_evaluate(config, str(new))
    assert not new.parent.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match="missing.npz.* does not exist"):
        train.train_and_evaluate(config, str(existing))
    assert os.listdir(existing) == []


@pytest.mark.slow
def test_a_cli_input_error_removes_the_directory_it_made(tmp_path):
    """pool made --out's directory (and its parent) to prove it writable, then failed
    on a missing run and left both behind."""
    out = tmp_path / "new" / "dir" / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.pool", f"--runs=x={tmp_path}/missing",
         f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/missing/report.json: no such file; is {tmp_path}/missing a "
        "finished compress run?"
    ]
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_resume_logs_each_epoch_once(tmp_path, sample_npz):
    """A run killed after logging epoch 2 but before saving its checkpoint trains epoch
    2 again on resume: its first line is replaced, not repeated; half a line is
    dropped."""
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=2)
    run = tmp_path / "run"
    train.train_and_evaluate(config, str(run))
    first = train.read_history(str(run))
    assert [r["epoch"] for r in first] == [1, 2]
    shutil.rmtree(run / "checkpoints" / "4")  # epoch 2 logged, its checkpoint not saved
    with open(run / "metrics.jsonl", "a") as f:  # and half a line, appended by an older run
        f.write('{"epoch": 3, "st')
    _, _, history = train.train_and_evaluate(config, str(run))
    assert [r["epoch"] for r in history] == [2]
    logged = train.read_history(str(run))
    assert [r["epoch"] for r in logged] == [1, 2]
    assert logged[0] == first[0] and logged[1] == history[0]
    # Same seed, same data order: the epoch trained again has the same loss.
    assert logged[1]["train_loss"] == pytest.approx(first[1]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes(tmp_path, sample_npz):
    run = tmp_path / "run"
    flags = ["--model=densenet_test", f"--dataset=npz:{sample_npz}", f"--workdir={run}"]
    proc = _popen(["-m", "experiments.train", "--epochs=500", *flags],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        for _ in range(TIMEOUT * 10):  # until an epoch is saved: the run is under way
            steps = (run / "checkpoints").glob("*")
            if any(p.name.isdigit() for p in steps) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        _kill(proc)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert _last_line(err) == "error: interrupted; run the same command again to resume"
    # The lock went with the process, and the same run resumes (--epochs may change).
    saved = checkpoint.manager(str(run / "checkpoints"), read_only=True).latest_step()
    config = train.TrainConfig(
        model="densenet_test", dataset=f"npz:{sample_npz}", epochs=saved // 2 + 1
    )
    _, _, history = train.train_and_evaluate(config, str(run))
    assert [r["epoch"] for r in history] == [saved // 2 + 1]
    assert [r["epoch"] for r in train.read_history(str(run))] == list(range(1, saved // 2 + 2))


def test_ctrl_c_of_a_command_that_does_not_resume_says_only_interrupted():
    """experiments.summary, interrupted while it imports or traces: one line, 130."""
    proc = _popen(["-m", "experiments.summary"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        _kill(proc)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["error: interrupted"]


def test_multihost_processes_after_the_first_do_not_lock(tmp_path, monkeypatch):
    """Every process of a multi-host run claims the shared workdir; only process 0
    locks it, so the others are not refused as a second writer."""
    run = tmp_path / "run"
    holder = _hold(run, "train")  # process 0 of the run
    try:
        monkeypatch.setattr(workdir.jax, "process_index", lambda: 1)
        with workdir.claim(str(run), "train") as path:
            assert path == str(run)
    finally:
        _kill(holder)
