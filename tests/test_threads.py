"""The CPU thread policy applied when the command line starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from brainmclip import threads as thread_policy
from brainmclip.errors import InvalidInputError
from brainmclip.threads import SPIN_COUNT, apply_thread_policy, available_cpus, busy_cpus


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_defaults_spin_briefly_and_use_every_idle_cpu(clean_env):
    clean_env.setattr(thread_policy, "busy_cpus", lambda window=0.1: 0.2)
    policy = apply_thread_policy()
    assert os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT) and policy["threads"] == available_cpus()
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(available_cpus())
    assert torch.get_num_threads() == available_cpus()  # torch was imported first: its count follows


@pytest.mark.parametrize(("busy", "expected"), [(0.9, lambda n: max(1, n - 1)), (50.0, lambda n: 1)])
def test_default_leaves_the_cpus_other_processes_hold(clean_env, busy, expected):
    clean_env.setattr(thread_policy, "busy_cpus", lambda window=0.1: busy)
    assert apply_thread_policy()["threads"] == expected(available_cpus())


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_busy_cpus_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # let it start spinning
        busy = busy_cpus(window=0.3)
    finally:
        spinner.kill()
        spinner.wait()
    # The spinner holds one CPU (other work on the machine can only add to it).
    assert 0.7 <= busy <= available_cpus() + 0.05


def test_the_users_settings_win(clean_env):
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    clean_env.setenv("OMP_NUM_THREADS", "1")
    policy = apply_thread_policy()
    assert "GOMP_SPINCOUNT" not in os.environ and policy["threads"] == 1 and "user" in policy["wait"]
    assert apply_thread_policy(2)["threads"] == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    with pytest.raises(InvalidInputError, match="--threads 0"):
        apply_thread_policy(0)


def test_the_command_line_sets_the_policy_before_torch_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    # info on a missing folder fails after the policy is applied; what matters is torch's state afterwards
    code = ("import sys, brainmclip.cli as c; assert 'torch' not in sys.modules; "
            f"c.main(['--threads', '1', 'info', '--data', {str(tmp_path / 'none')!r}]); "
            "import os, torch; print(torch.get_num_threads(), os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["1", str(SPIN_COUNT)]
