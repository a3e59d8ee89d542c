"""The resumable, seeded optimisation loop the three miniature trainings share.

A phase (e.g. "clip", "vae", "unet") runs ``total_steps`` optimiser steps of a ``step_fn``. Batches and noise depend
only on (seed, phase, step): the loop reseeds torch and hands ``step_fn`` a numpy generator seeded from them, so a
run killed at any point and started again continues with exactly the batches it would have seen. A checkpoint
(modules, optimiser, schedule, step) is written atomically every ``checkpoint_seconds`` and when the phase ends;
the folder keeps only the newest one. Progress goes to a tqdm bar (rate, ETA) and to ``train.log``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from brainmclip.atomic import atomic_path, output_entries, output_lock
from brainmclip.errors import InvalidInputError

__all__ = ["Phase", "cosine_with_warmup", "run_phase", "step_seed", "attach_log"]

log = logging.getLogger("brainmclip.miniature")


def step_seed(seed: int, phase: str, step: int) -> int:
    """The seed of one step of one phase (independent of resumption)."""
    digest = hashlib.sha256(f"{seed}:{phase}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def cosine_with_warmup(total_steps: int, warmup_steps: int, final_fraction: float = 0.0) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``final_fraction``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class Phase:
    """One optimisation phase.

    ``step_fn(step, rng) -> dict[str, float]`` does forward, backward and returns scalars to log; the loop
    zeroes gradients, clips them to ``clip_grad``, steps the optimiser and the schedule.
    ``settings`` is anything JSON that must match for a checkpoint to be resumed.
    """

    name: str
    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    step_fn: Callable[[int, np.random.Generator], dict[str, float]]
    settings: dict
    clip_grad: float | None = 1.0
    after_step: Callable[[], None] | None = None


def _checkpoint_path(out: Path, phase: str) -> Path:
    return out / "checkpoints" / f"{phase}.pt"


@contextmanager
def training_folder(out, force: bool = False) -> Iterator[Path]:
    """``out`` as a Path (emptied first when ``force``), with the package log copied to ``out/train.log`` inside.

    The folder is locked (:func:`~brainmclip.atomic.output_lock`) while the training runs.
    """
    out = Path(out)
    with output_lock(out):
        if force:
            for entry in output_entries(out):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        handler = attach_log(out)
        try:
            yield out
        finally:
            logging.getLogger("brainmclip").removeHandler(handler)
            handler.close()


def attach_log(out: Path) -> logging.Handler:
    """Send this package's INFO messages to ``out/train.log`` (appending) until the handler is removed."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("brainmclip").addHandler(handler)
    return handler


def _save(path: Path, phase: Phase, step: int, elapsed: float, finished: bool) -> None:
    state = {"step": step, "finished": finished, "elapsed": elapsed, "settings": json.dumps(phase.settings, sort_keys=True),
             "modules": {k: m.state_dict() for k, m in phase.modules.items()},
             "optimizer": phase.optimizer.state_dict(), "schedule": phase.schedule.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path, phase: Phase) -> tuple[int, float, bool]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a checkpoint is renamed into place whole, so this is a damaged file
        raise InvalidInputError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to start the phase "
                         "again") from None
    if state["settings"] != json.dumps(phase.settings, sort_keys=True):
        raise InvalidInputError(f"{path}: checkpoint of a {phase.name} phase with other settings; use another --out or "
                         "pass --force to start again")
    for key, module in phase.modules.items():
        module.load_state_dict(state["modules"][key])
    phase.optimizer.load_state_dict(state["optimizer"])
    phase.schedule.load_state_dict(state["schedule"])
    return int(state["step"]), float(state["elapsed"]), bool(state["finished"])


def run_phase(out: str | Path, phase: Phase, seed: int, checkpoint_seconds: float = 120.0, log_every: int = 25,
              progress: bool = True) -> dict:
    """Run (or resume, or skip when finished) a phase; returns ``{"steps", "seconds", "last": {scalars}}``."""
    out = Path(out)
    path = _checkpoint_path(out, phase.name)
    step, elapsed, finished = (_load(path, phase) if path.is_file() else (0, 0.0, False))
    if finished:
        log.info("%s: finished earlier (%d steps, %.0f s); skipped", phase.name, step, elapsed)
        return {"steps": step, "seconds": elapsed, "last": {}}
    if step:
        log.info("%s: resuming at step %d of %d", phase.name, step, phase.total_steps)
    for module in phase.modules.values():
        module.train()
    params = [p for m in phase.modules.values() for p in m.parameters() if p.requires_grad]
    bar = tqdm(total=phase.total_steps, initial=step, desc=f"train {phase.name}", unit="step", disable=not progress)
    last: dict[str, float] = {}
    running: dict[str, float] = {}
    started, saved_at = time.perf_counter(), time.perf_counter()
    while step < phase.total_steps:
        seed_value = step_seed(seed, phase.name, step)
        torch.manual_seed(seed_value)
        rng = np.random.default_rng(seed_value)
        scalars = phase.step_fn(step, rng)
        if phase.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, phase.clip_grad)
        phase.optimizer.step()
        phase.optimizer.zero_grad(set_to_none=True)
        phase.schedule.step()
        if phase.after_step is not None:
            phase.after_step()
        step += 1
        for k, v in scalars.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"{phase.name} step {step}: {k} = {v}; training diverged (lower the lr)")
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        bar.update(1)
        if step % log_every == 0 or step == phase.total_steps:
            last = dict(running)
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
            log.info("%s step %d/%d %s lr %.3g", phase.name, step, phase.total_steps,
                     " ".join(f"{k} {v:.4g}" for k, v in last.items()), phase.schedule.get_last_lr()[0])
        if time.perf_counter() - saved_at > checkpoint_seconds and step < phase.total_steps:
            _save(path, phase, step, elapsed + time.perf_counter() - started, finished=False)
            saved_at = time.perf_counter()
    bar.close()
    elapsed += time.perf_counter() - started
    _save(path, phase, step, elapsed, finished=True)
    for module in phase.modules.values():
        module.eval()
    log.info("%s: done, %d steps in %.0f s", phase.name, step, elapsed)
    return {"steps": step, "seconds": elapsed, "last": last}
