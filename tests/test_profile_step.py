"""benchmarks/profile_step.py accounts for a train step's wall time, convolutions included."""

import jax
import pytest

from benchmarks import profile_step


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA:CPU's thread events")
@pytest.mark.slow
def test_profile_accounts_for_the_step():
    rows = profile_step.profile("densenet_test", 8, 2)
    total = rows[-1]
    assert total["category"].startswith("step") and total["ms"] > 0
    work = {r["category"]: r["ms"] for r in rows[:-1] if not r["category"].startswith("idle")}
    # Eigen convolutions return before their pool tasks run: the tasks must count for them.
    conv = sum(ms for name, ms in work.items() if name.startswith("convolution"))
    # Shares of the traced work, not of the wall time: on a loaded machine the step waits
    # for a core, which no thread's events record (seen: wall 174 ms, convolutions 3 ms).
    assert conv > 0.05 * sum(work.values())
    # Thread time per pool thread can't exceed the wall time, and little of it is unnamed.
    assert sum(work.values()) < 1.1 * total["ms"]
    assert work.get(profile_step._OTHER, 0) < 0.25 * sum(work.values())
