"""The CPU thread policy applied when the command line starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from brainmclip.errors import InvalidInputError
from brainmclip.threads import SPIN_COUNT, apply_thread_policy, available_cpus


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_defaults_spin_briefly_and_use_every_available_cpu(clean_env):
    policy = apply_thread_policy()
    assert os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT) and policy["threads"] == available_cpus()
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(available_cpus())
    assert torch.get_num_threads() == available_cpus()  # torch was imported first: its count follows


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
