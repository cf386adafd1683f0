"""How the CPU backend's threads wait between parallel regions: OpenMP's wait policy, and what it costs.

torch's CPU kernels, oneDNN's and ddpm_fast's run on OpenMP threads, and GNU OpenMP lets a thread that finishes its
share of a parallel region spin before it sleeps. On a machine of its own that is the fast choice: a sleeping
thread takes a while to wake (on a virtual machine the hypervisor must run its idle CPU again). On a machine whose
cores another busy process shares, the spinning thread holds a core its descheduled partner needs, and a parallel
region can cost a scheduler time slice; a U-Net forward has hundreds of them.

Measured on a 2-core Xeon (KVM), the CIFAR-10 U-Net forward on 2 threads: ddpm_fast's speed over OpenVINO f32 (which
schedules its own threads) in the same run, by ``benchmarks/bench_unet.py --batches 1,8 --no-compile --rounds 5``
(``--busy 1``: one other process spinning), records ``benchmarks/results/unet_cpu_xeon_amx*.json``:

| machine | OpenMP policy | batch 1 | batch 8 |
|---|---|---|---|
| quiet | default (spin) | 0.94x | 1.69x |
| quiet | ``OMP_WAIT_POLICY=PASSIVE`` | 0.56x | 1.15x |
| one process spinning | default (spin) | 0.31x | 0.94x |
| one process spinning | ``OMP_WAIT_POLICY=PASSIVE`` | 0.90x | 1.68x |

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
