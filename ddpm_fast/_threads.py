"""How the CPU backend's threads wait between parallel regions: OpenMP's wait policy, and what it costs.

torch's CPU kernels, oneDNN's and ddpm_fast's run on OpenMP threads, and GNU OpenMP lets a thread that finishes its
share of a parallel region spin before it sleeps. On a machine of its own that is the fast choice: a sleeping
thread takes a while to wake (on a virtual machine the hypervisor must run its idle CPU again). On a machine whose
cores another busy process shares, the spinning thread holds a core its descheduled partner needs, and a parallel
region can cost a scheduler time slice; a U-Net forward has hundreds of them.

Measured on a 2-core Xeon (KVM), the CIFAR-10 U-Net forward, 2 threads, ms per image (OpenVINO f32 beside it):

| machine | policy | batch 1 | batch 8 |
|---|---|---|---|
| quiet | default (spin) | 65 (OpenVINO 54) | 30-32 (OpenVINO 46-52) |
| quiet | ``OMP_WAIT_POLICY=PASSIVE`` | 107-109 | 37-41 |
| another process training | default (spin) | 623 (OpenVINO 58) | 92 (OpenVINO 100) |
| another process training | ``OMP_WAIT_POLICY=PASSIVE`` | 108 (OpenVINO 124) | 58 (OpenVINO 102) |

So ddpm_fast leaves the default alone, and a machine shared with busy processes should run with
``OMP_WAIT_POLICY=PASSIVE`` set before torch is imported (OpenMP reads it once, when torch loads it).
``benchmarks/bench_unet.py --busy N`` measures both cases; its records say which policy ran (:func:`wait_policy`).
"""

from __future__ import annotations

import os

VARIABLE = "OMP_WAIT_POLICY"


def wait_policy() -> str:
    """The policy the environment names ('passive', 'active', or 'default' when unset): what OpenMP read when torch
    loaded it, provided the variable has not changed since."""
    value = os.environ.get(VARIABLE, "").strip().lower()
    return value if value in ("passive", "active") else "default"
