"""benchmarks/sample_speed.py's solver rows: diffusers' scheduler for each --method samples the timesteps ddpm_fast's
sampler takes (0, T/steps, ... descending), so the rows' images are comparable."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
diffusers = pytest.importorskip("diffusers")
import sample_speed  # noqa: E402


@pytest.mark.parametrize("method, cls, order", [
    ("ddim", "DDIMScheduler", None),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", 2),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", 3),
])  # fmt: skip
def test_solver_scheduler_takes_the_native_timesteps(method, cls, order):
    T, steps = 1000, 20
    timesteps = [i * (T // steps) for i in range(steps)][::-1]
    sched = sample_speed.make_scheduler(diffusers, method, T, 0.02, timesteps)
    assert type(sched).__name__ == cls and sample_speed.STEP_OP[method] in ("ddpm_step", "dpmpp_step")
    if order is not None:
        assert sched.config.solver_order == order
    sched.set_timesteps(steps)  # as the pipeline calls it
    print(method, sched.timesteps[:3].tolist(), "...", sched.timesteps[-3:].tolist())
    assert sched.timesteps.tolist() == timesteps
