"""Learning-rate schedules of the BrainMCLIP trainer, both resumable through ``state_dict``.

``plateau`` (default): linear warm-up to ``max_lr``, then constant; each time validation has not
improved for ``plateau_epochs`` epochs the rate is multiplied by ``lr_factor``. It fits early
stopping: the run length is decided by validation, so a schedule that needs the total number of
steps in advance (one-cycle) would be cut off mid-way with its rate still high.
``onecycle``: PyTorch's OneCycleLR over a fixed budget (``epochs`` or ``max_steps``).
"""

from __future__ import annotations

import torch

from brainmclip.errors import InvalidInputError

__all__ = ["SCHEDULES", "PlateauSchedule", "make_schedule"]

SCHEDULES = ("plateau", "onecycle")


class PlateauSchedule:
    """Warm-up, then ``max_lr`` times ``lr_factor`` per plateau; :meth:`step` per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, warmup_steps: int, lr_factor: float,
                 plateau_epochs: int):
        if not 0 < lr_factor < 1:
            raise InvalidInputError(f"lr_factor={lr_factor}; expected a factor in (0, 1)")
        self.optimizer, self.max_lr = optimizer, max_lr
        self.warmup_steps, self.lr_factor, self.plateau_epochs = max(1, warmup_steps), lr_factor, max(1, plateau_epochs)
        self.steps, self.scale, self.epochs_since_cut = 0, 1.0, 0
        self._apply()

    def _apply(self) -> None:
        lr = self.max_lr * self.scale * min(1.0, (self.steps + 1) / self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def end_epoch(self, improved: bool) -> bool:
        """Record an epoch's validation; returns True when the rate was just lowered."""
        self.epochs_since_cut = 0 if improved else self.epochs_since_cut + 1
        if self.epochs_since_cut >= self.plateau_epochs:
            self.scale *= self.lr_factor
            self.epochs_since_cut = 0
            self._apply()
            return True
        return False

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "scale": self.scale, "epochs_since_cut": self.epochs_since_cut}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.scale, self.epochs_since_cut = state["steps"], state["scale"], state["epochs_since_cut"]
        self._apply()


class _OneCycle(torch.optim.lr_scheduler.OneCycleLR):
    def end_epoch(self, improved: bool) -> bool:
        return False


def make_schedule(cfg, optimizer, total_steps: int, steps_per_epoch: int):
    """The schedule ``cfg.schedule`` names (``cfg`` is a :class:`~brainmclip.training.loop.TrainConfig`)."""
    if cfg.schedule == "plateau":
        return PlateauSchedule(optimizer, cfg.max_lr, int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.lr_factor,
                               cfg.plateau_epochs)
    if cfg.schedule == "onecycle":
        return _OneCycle(optimizer, max_lr=cfg.max_lr, total_steps=total_steps, pct_start=cfg.pct_start)
    raise InvalidInputError(f"Unknown train.schedule={cfg.schedule!r}; choose one of {list(SCHEDULES)}")
