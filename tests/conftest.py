"""Shared fixtures: offline guard and a tiny simulated NSD written once per test session."""

from __future__ import annotations

import socket

import pytest

from brainmclip.data.synthetic import make_synthetic_nsd

TINY_SUBJECTS = (1, 2)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that tries to reach the network: everything here must run offline."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"test tried to open a network connection to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models are dominated by thread start-up, so one is faster and steadier."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_root_logging():
    """``main()`` points the root logger at the stderr pytest captures for that test; put it back after."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_nsd(tmp_path_factory):
    """The tiny preset for subjects 1 and 2, all sessions (shared read-only by tests)."""
    root = tmp_path_factory.mktemp("tiny_nsd")
    return make_synthetic_nsd(root, preset="tiny", subjects=TINY_SUBJECTS, seed=7, progress=False)
