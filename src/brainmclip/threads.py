"""How many CPU threads brainmclip computes with, and how idle OpenMP threads wait.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels) and MKL. After each
parallel region libgomp's threads spin for a while before they sleep (``GOMP_SPINCOUNT``, 300,000
iterations by default). On a machine whose cores are busy with other work, spinning threads steal the
time slices the working threads need, and every barrier waits for a thread that is not running: on two
cores with one other busy process, a small CLIP forward pass fell from 229 to 10 images/s. Not spinning
at all (``OMP_WAIT_POLICY=PASSIVE``) avoids that but makes a sequence of small kernels (sampling at
batch 1) pay a wake-up per kernel, 2.3-2.5x slower on an idle machine. A short spin (1,000 iterations) is the
compromise: ``bench/thread_policy.py`` (2 cores, 2 threads) measured it against libgomp's default at 0.79-1.19x idle
and 1.04-1.88x beside one busy process, where passive waiting gave 0.40-1.01x and 1.31-3.65x. (10,000 iterations
was slower than the default beside a busy process, 0.52-0.77x: the measure, not a guess, chose the count.)

:func:`apply_thread_policy` runs once when the command line starts, before torch is imported (libgomp
reads its environment when it is loaded):

* the spin count is :data:`SPIN_COUNT` unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``;
* the thread count is ``--threads`` if given, else ``OMP_NUM_THREADS`` if set, else the CPUs this
  process may run on (its affinity mask, which containers and ``taskset`` restrict) less those that
  other processes keep busy at that moment (sampled over 0.1 s from ``/proc/stat``; at least one), and
  it is given to torch, MKL and OpenBLAS alike. A thread on a core another process holds only makes
  every barrier wait for it: beside one busy process on 2 cores, the demo's feature extraction (3,800
  images) ran at 127 images/s with the one thread this rule chose and at 65 images/s with two.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["SPIN_COUNT", "apply_thread_policy", "available_cpus", "busy_cpus", "default_threads"]

# Iterations an idle OpenMP thread spins before it sleeps (libgomp's default is 300,000).
SPIN_COUNT = 1_000

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the system has one, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as fh:
            lines = [line.split() for line in fh if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    busy = total = 0.0
    for fields in lines:
        if int(fields[0][3:]) in cpus:
            values = [float(v) for v in fields[1:8]]  # user nice system idle iowait irq softirq
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def busy_cpus(window: float = 0.1) -> float:
    """How many of this process's CPUs other processes kept busy over the next ``window`` seconds (0 if unknown).

    This process sleeps meanwhile, so what is counted is other work.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return 0.0
    first = _cpu_times(cpus)
    if first is None:
        return 0.0
    time.sleep(window)
    second = _cpu_times(cpus)
    if second is None or second[1] <= first[1]:
        return 0.0
    return len(cpus) * (second[0] - first[0]) / (second[1] - first[1])


def default_threads() -> int:
    """The available CPUs less those other processes keep busy now (rounded), at least one."""
    return max(1, available_cpus() - round(busy_cpus()))


def apply_thread_policy(threads: int | None = None) -> dict:
    """Set the thread count and the OpenMP wait policy for this process; returns what was decided.

    ``threads``: an explicit count (``--threads``); None keeps ``OMP_NUM_THREADS`` when the user set
    it, else :func:`default_threads`. Call before torch is imported for the wait policy to apply;
    the thread count is also set on an already-imported torch.
    """
    from brainmclip.errors import InvalidInputError

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InvalidInputError(f"--threads {threads!r}; expected a positive number of threads")
    user_policy = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if not user_policy:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    if threads is None:
        text = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(text) if text.isdigit() and int(text) > 0 else default_threads()
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if "torch" in sys.modules:  # imported before us: the wait policy is fixed, the count is not
        sys.modules["torch"].set_num_threads(threads)
    return {"threads": threads,
            "wait": (f"user: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}, "
                     f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '-')}") if user_policy
            else f"GOMP_SPINCOUNT={SPIN_COUNT}"}
