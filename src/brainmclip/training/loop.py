"""Training BrainMCLIP: AdamW, warm-up + plateau schedule, accelerate (multi-GPU, bf16 on GPU), resumable.

Reads top to bottom: build data and model, then for each epoch a seeded permutation of the
training rows is cut into batches; every optimizer step may end in a checkpoint; each epoch
ends with a validation pass that keeps the best model and stops the run once validation has
not improved for ``patience`` epochs (``epochs`` is only a cap). A run killed at any point restarts
from its last checkpoint and reaches the same weights an uninterrupted run reaches, because
the data order depends on (seed, epoch) only and the RNG state travels in the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from brainmclip import __version__
from brainmclip.atomic import atomic_path, crash_point, output_lock, write_json_atomic
from brainmclip.config import check_choice, check_float, check_int, check_keys, check_sections, load_config
from brainmclip.cpu_memory import keep_freed_memory
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError
from brainmclip.evaluation.retrieval import pairwise_identification, similarity_matrix, top1_n_way
from brainmclip.features.feature_store import open_feature_store
from brainmclip.losses.brain_mclip_objective import ObjectiveConfig, brain_mclip_objective
from brainmclip.models.brain_mclip import BrainMCLIP, BrainMCLIPConfig, image_target
from brainmclip.paths import record_path
from brainmclip.training.balance import gradient_norms
from brainmclip.training.checkpoint import identity_of, load_checkpoint, load_safetensors, same_identities, save_checkpoint
from brainmclip.training.data import PairedSplit
from brainmclip.training.run_folder import CHECKPOINT_FILE, RUN_FILE, clear_run_folder, differing_keys, read_run_record
from brainmclip.training.schedule import SCHEDULES, make_schedule

__all__ = ["RUN_FILE", "TrainConfig", "TrainResult", "build_model", "load_best_model", "train_brain_mclip"]

log = logging.getLogger("brainmclip.train")


@dataclass
class TrainConfig:
    """Optimisation settings (saved with every checkpoint).

    ``epochs`` and ``max_steps`` (> 0) cap the run; ``patience`` epochs without a better
    validation ``select_on`` stop it. ``select_on``: 'score' (the mean over the model's outputs,
    image and/or text, of validation 2-way identification against their own targets) or 'loss'.
    ``schedule``: 'plateau' (warm-up over ``warmup_epochs``, then ``max_lr`` times ``lr_factor``
    after each ``plateau_epochs`` epochs without improvement) or 'onecycle' (over the cap, with
    ``pct_start``). ``mixed_precision``: 'bf16' autocasts on GPU only (on CPU a paper-size step ran
    slower than in float32 even with native bf16 matmuls: casting the weights every step costs more than
    the faster products save), 'bf16-always' also on CPU (to check bf16 numerics without a GPU), 'no' never.
    ``checkpoint_every`` is in optimizer steps.
    """

    epochs: int = 100
    batch_size: int = 32
    max_lr: float = 3e-4
    weight_decay: float = 0.01
    pct_start: float = 0.1
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: str = "bf16"
    patience: int = 6
    checkpoint_every: int = 200
    log_every: int = 20
    max_steps: int = 0
    select_on: str = "score"
    schedule: str = "plateau"
    warmup_epochs: float = 1.0
    lr_factor: float = 0.3
    plateau_epochs: int = 3

    def __post_init__(self):
        for name in ("epochs", "grad_accum", "patience", "checkpoint_every", "log_every", "plateau_epochs"):
            check_int(f"train.{name}", getattr(self, name), 1)
        # A global batch needs 2 rows: CKA and the contrastive terms compare the rows of a batch.
        check_int("train.batch_size", self.batch_size, 2)
        check_int("train.seed", self.seed, 0)
        check_int("train.max_steps", self.max_steps, 0)
        check_float("train.max_lr", self.max_lr, 0, low_open=True)
        check_float("train.weight_decay", self.weight_decay, 0)
        check_float("train.pct_start", self.pct_start, 0, 1, low_open=True, high_open=True)
        check_float("train.warmup_epochs", self.warmup_epochs, 0)
        check_float("train.lr_factor", self.lr_factor, 0, 1, low_open=True, high_open=True)
        check_choice("train.select_on", self.select_on, ("score", "loss"))
        check_choice("train.mixed_precision", self.mixed_precision, ("bf16", "bf16-always", "no"))
        check_choice("train.schedule", self.schedule, SCHEDULES)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**check_keys(cls, d, "train"))


@dataclass
class DataConfig:
    """Which voxel groups of the prepared dataset are F_S and F_D."""

    semantic_group: str = "semantic"
    detail_group: str = "detail"

    def __post_init__(self):
        for name in ("semantic_group", "detail_group"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"data.{name}={getattr(self, name)!r}: expected the name of a voxel group")

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        return cls(**check_keys(cls, d, "data"))


def check_train_config(cfg: dict) -> tuple[TrainConfig, ObjectiveConfig, DataConfig]:
    """Check every value of a BrainMCLIP run config that does not depend on the data; one error naming the first bad one.

    The model section's sizes are checked too (with placeholder voxel counts): a bad value fails
    here, before anything is loaded or written, rather than when the model is built.
    """
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"config {cfg!r}: expected an object of sections")
    check_sections(cfg, ("method", "data", "model", "loss", "train"))
    if cfg.get("method", "brain_mclip") != "brain_mclip":
        raise InvalidInputError(f"config method={cfg.get('method')!r}; train_brain_mclip needs 'brain_mclip'")
    train_cfg = TrainConfig.from_dict(cfg.get("train", {}))
    loss_cfg = ObjectiveConfig.from_dict(cfg.get("loss", {}))
    data_cfg = DataConfig.from_dict(cfg.get("data", {}))
    model_cfg = check_keys(BrainMCLIPConfig, cfg.get("model", {}), "model")
    BrainMCLIPConfig.from_dict({**model_cfg, "n_semantic_voxels": 1, "n_detail_voxels": 1})
    return train_cfg, loss_cfg, data_cfg


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_val_loss: float
    best_epoch: int
    steps: int
    finished: bool
    val_retrieval: float
    parameters: dict[str, int]
    val_score: float = float("nan")
    val_metrics: dict | None = None

    def summary(self) -> str:
        return (f"BrainMCLIP run at {self.run_dir}: {self.steps} steps, best epoch {self.best_epoch} "
                f"(val loss {self.best_val_loss:.4f}, val 2-way {self.val_score:.3f}, "
                f"image retrieval top-1 {self.val_retrieval:.3f}), "
                f"{self.parameters['total'] / 1e6:.1f}M parameters" + ("" if self.finished else " (stopped early; "
                                                                      "rerun with --resume to continue)"))


def build_model(model_cfg: dict, prepared, store_settings: dict, data_cfg: dict) -> BrainMCLIP:
    config = BrainMCLIPConfig.from_dict({
        **model_cfg,
        "n_semantic_voxels": len(prepared.voxels.group(data_cfg.get("semantic_group", "semantic"))),
        "n_detail_voxels": len(prepared.voxels.group(data_cfg.get("detail_group", "detail"))),
        "image_tokens": store_settings["image_tokens"],
        "text_tokens": store_settings["text_tokens"],
        "embed_dim": store_settings["embed_dim"],
    })
    return BrainMCLIP(config)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    # No decay on biases and LayerNorm weights (1-D parameters), as usual for transformers/MLPs.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This process's batches of the epoch: a permutation fixed by (seed, epoch), cut into global batches."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    step = batch_size * world
    # Drop a last global batch too small to split over processes or to estimate CKA (n >= 2).
    starts = [s for s in range(0, n, step) if min(step, n - s) >= 2 * world]
    return [perm[s:s + step][rank::world] for s in starts]


@torch.no_grad()
def _validate(model, split: PairedSplit, loss_cfg: ObjectiveConfig, device, batch_size: int = 64):
    """Validation loss and, per output the model has ('image', 'text'), 2-way identification and top-1."""
    model.eval()
    core = getattr(model, "module", model)
    total, n = 0.0, 0
    preds: dict[str, list] = {"image": [], "text": []}
    targets: dict[str, list] = {"image": [], "text": []}
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        if len(rows) < 2:
            continue
        batch = {k: v.to(device) for k, v in split.fetch(rows).items()}
        out = model(batch["semantic"], batch["detail"])
        loss, _ = brain_mclip_objective(out, batch, batch["semantic"], batch["detail"], loss_cfg)
        total += float(loss) * len(rows)
        n += len(rows)
        if out.image is not None:
            preds["image"].append(out.image.float().cpu())
            targets["image"].append(image_target(core.config.branches, batch).float().cpu())
        if out.text is not None:
            preds["text"].append(out.text.float().cpu())
            targets["text"].append(batch["text"].float().cpu())
    model.train()
    metrics = {}
    for kind in ("image", "text"):
        if preds[kind]:
            sim = similarity_matrix(torch.cat(preds[kind]).numpy(), torch.cat(targets[kind]).numpy())
            metrics[f"{kind}_two_way"] = pairwise_identification(sim)
            metrics[f"{kind}_top1"] = top1_n_way(sim, n_way=min(300, len(sim)), n_repeats=5,
                                                 seed=0)["image_retrieval"]["mean"]
    metrics["score"] = float(np.mean([metrics[f"{k}_two_way"] for k in ("image", "text") if f"{k}_two_way" in metrics]))
    return total / max(n, 1), metrics


def train_brain_mclip(data, features, config: dict | str | list[str] | None, out, resume: bool = False,
                      overrides: list[str] | None = None, stop_after_steps: int | None = None, cpu: bool = False,
                      progress: bool = True, force: bool = False) -> TrainResult:
    """Train BrainMCLIP on a prepared dataset and feature store into the run folder ``out``.

    ``config`` is a config dict or names/paths of config files (see :mod:`brainmclip.config`).
    ``stop_after_steps`` ends this call after that many optimizer steps with a checkpoint, as
    a preempted job would; ``resume=True`` continues from the run's last checkpoint, or starts
    the run from its beginning when it has none yet (with the config it was started with, if any).
    A folder holding only the start of a run (no checkpoint) with the same settings is started
    afresh; ``force=True`` deletes the files an earlier run wrote there (and its predictions)
    first. Every setting and input is checked before anything is written.
    """
    with keep_freed_memory(enabled=cpu or not torch.cuda.is_available()):
        return _train(data, features, config, out, resume, overrides, stop_after_steps, cpu, progress, force)


def _run_settings(cfg: dict, identities: dict) -> dict:
    """What decides whether two starts of a run are the same run."""
    return {"method": cfg.get("method", "brain_mclip"), "config": cfg,
            "identities": {name: {k: v for k, v in identity.items() if k != "path"}
                           for name, identity in identities.items()}}


def _choose_start(out: Path, config, overrides, given: dict | None, resume: bool, force: bool, identities: dict):
    """Return ``(cfg, checkpoint state or None, whether to clear earlier files)`` for a run in ``out``, or refuse.

    ``given`` is the checked config of ``config`` and ``overrides`` when already loaded.
    """
    last_ckpt = out / CHECKPOINT_FILE
    if force:
        return given or _given_config(out, config, overrides), None, True
    if last_ckpt.is_file():
        if not resume:
            raise OutputInTheWayError(f"{out} already holds a run with a checkpoint; pass --resume to continue it, "
                                      "--force to start it again, or choose another --out")
        state = load_checkpoint(last_ckpt)
        if not same_identities(state["identities"], identities):
            raise InvalidInputError(f"{out}: the checkpoint was trained on other data or features "
                                    f"({state['identities']['data']['path']}, "
                                    f"{state['identities']['features']['path']}); pass --force to start a new run there")
        return state["config"], state, False
    record = read_run_record(out)
    if resume:
        # Nothing was saved yet: the run starts from its beginning, with the settings it was started with.
        if record is not None:
            if not same_identities(record.get("identities", {}), identities):
                raise InvalidInputError(f"{out}: the run was started on other data or features; pass --force to start "
                                        "a new run there or choose another --out")
            cfg = record["config"]
        elif config is None:
            raise MissingInputError(f"{out}: nothing to resume (no {CHECKPOINT_FILE} or {RUN_FILE}); start the run "
                                    "without --resume, or name its --config to start it with --resume")
        else:
            cfg = given or _given_config(out, config, overrides)
        log.info("%s holds no checkpoint yet: starting the run from its beginning", out)
        return cfg, None, True
    cfg = given or _given_config(out, config, overrides)
    if record is not None:
        before = _run_settings(record["config"], record.get("identities", {}))
        before["method"] = record.get("method")
        differing = differing_keys(before, _run_settings(cfg, identities))
        if differing:
            shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
            raise OutputInTheWayError(f"{out} holds the start of another run (no checkpoint yet; differing: {shown}); "
                                      "pass --force to replace it or choose another --out")
    return cfg, None, True


def _given_config(out: Path, config, overrides) -> dict:
    """The run config from ``config`` (a dict, or names/paths of config files) and ``overrides``, checked."""
    if config is None:
        raise InvalidInputError(f"{out}: no config given to start a run with")
    cfg = copy.deepcopy(config) if isinstance(config, dict) else load_config(config, overrides)
    check_train_config(cfg)
    return cfg


def _train(data, features, config, out, resume, overrides, stop_after_steps, cpu, progress, force) -> TrainResult:
    from accelerate import Accelerator

    out = Path(out)
    if resume and force:
        raise InvalidInputError("--resume continues the run in --out and --force deletes it; pass one of them")
    if stop_after_steps is not None:
        check_int("stop_after_steps", stop_after_steps, 1)
    # A new run's settings are checked first, before the data is read (a resumed run's come from its folder).
    given = _given_config(out, config, overrides) if not resume else None
    # Autocast is ours, not accelerate's: accelerate fixes mixed precision once per process, and a
    # process may train several runs (sweeps, ablation tables, tests) with different settings.
    accelerator = Accelerator(cpu=cpu, mixed_precision="no")
    # The main process writes the run folder; its lock keeps a second training out of it.
    with output_lock(out) if accelerator.is_main_process else contextlib.nullcontext():
        return _train_locked(accelerator, data, features, config, given, out, resume, overrides, stop_after_steps,
                             cpu, progress, force)


def _train_locked(accelerator, data, features, config, given, out, resume, overrides, stop_after_steps, cpu,
                  progress, force) -> TrainResult:
    from torch.utils.tensorboard import SummaryWriter

    last_ckpt = out / CHECKPOINT_FILE
    # Everything below up to the first write only reads and checks: a bad setting or input leaves --out as it was.
    prepared = load_prepared(data)
    store = open_feature_store(features)
    identities = {"data": identity_of(Path(data) / "manifest.json"),
                  "features": identity_of(Path(features) / "manifest.json")}
    cfg, state, clear = _choose_start(out, config, overrides, given, resume, force, identities)
    train_cfg, loss_cfg, data_cfg = check_train_config(cfg)

    train_split = PairedSplit(prepared, "train", store, data_cfg.semantic_group, data_cfg.detail_group)
    if "val" not in prepared.splits:
        raise InvalidInputError(f"{data}: no val split; training selects its model on validation (prepare with "
                                "--val-size 2 or more)")
    val_split = PairedSplit(prepared, "val", store, data_cfg.semantic_group, data_cfg.detail_group)
    if len(val_split) < 2:
        raise InvalidInputError(f"{data}: the val split has {len(val_split)} rows; training selects its model on "
                                "validation and needs at least 2 (prepare with --val-size 2 or more)")
    train_split.check_finite(f"{data} train split")
    val_split.check_finite(f"{data} val split")
    world = accelerator.num_processes
    n_batches = len(_batches(len(train_split), train_cfg.batch_size, 0, 0, 0, world))
    if n_batches < train_cfg.grad_accum:
        raise InvalidInputError(f"{data}: {len(train_split)} training rows make {n_batches} batches of "
                                f"train.batch_size={train_cfg.batch_size}{f' x {world} processes' if world > 1 else ''}"
                                f" per epoch, fewer than train.grad_accum={train_cfg.grad_accum}; lower them")

    # bf16 autocast on GPU only unless asked for everywhere: it slows CPU training (see TrainConfig).
    on_gpu = torch.cuda.is_available() and not cpu
    use_bf16 = train_cfg.mixed_precision == "bf16-always" or (train_cfg.mixed_precision == "bf16" and on_gpu)
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg.get("model", {}), prepared, store.manifest["settings"], cfg.get("data", {}))
    if state is None and model.config.start_at_mean:
        means = train_split.target_means()
        bad = [name for name, value in means.items() if not torch.isfinite(value).all()]
        if bad:
            raise InvalidInputError(f"{features}: the {', '.join(bad)} targets of {data}'s training images hold NaN "
                                    "or inf; extract the features again")
        model.start_at_mean(means)
    # fused AdamW: one kernel over all parameters; the step is memory-bound at 0.76B parameters.
    optimizer = torch.optim.AdamW(_param_groups(model, train_cfg.weight_decay), lr=train_cfg.max_lr, fused=True)
    steps_per_epoch = n_batches // train_cfg.grad_accum
    total_steps = steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps:
        total_steps = min(total_steps, train_cfg.max_steps)
    scheduler = make_schedule(train_cfg, optimizer, total_steps, steps_per_epoch)
    progress_state = {"epoch": 0, "batch": 0, "step": 0, "best_val": math.inf, "best_score": -math.inf,
                      "best_epoch": -1, "bad_epochs": 0, "val_retrieval": float("nan"), "finished": False}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress_state.update(state["progress"])
        torch.set_rng_state(state["torch_rng"])
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    main = accelerator.is_main_process

    if main:
        if clear:
            removed = clear_run_folder(out, predictions=force)
            if removed:
                log.info("%s: deleted %s of an earlier start", out, ", ".join(removed))
        out.mkdir(parents=True, exist_ok=True)
        counts = accelerator.unwrap_model(model).parameter_counts()
        write_json_atomic(out / RUN_FILE, {"method": "brain_mclip", "config": cfg, "identities": identities,
                                           "data": record_path(data, out), "features": record_path(features, out),
                                           "subject": prepared.subject, "parameters": counts,
                                           "model_config": accelerator.unwrap_model(model).config.to_dict(),
                                           "code_version": __version__})
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        writer = SummaryWriter(str(out / "tensorboard"))
        log.info("%s BrainMCLIP with %.1fM parameters; %d train / %d val rows; %d steps",
                 "resuming" if state is not None else "training", counts["total"] / 1e6, len(train_split), len(val_split),
                 total_steps)

    def checkpoint():
        if main:
            save_checkpoint(last_ckpt, {
                "model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "progress": dict(progress_state), "config": cfg,
                "identities": identities, "torch_rng": torch.get_rng_state(), "code_version": __version__})
            crash_point("train-checkpoint")
        accelerator.wait_for_everyone()

    p = progress_state
    bar = tqdm(total=total_steps, initial=p["step"], desc="train", unit="step", disable=not progress or not main)
    steps_this_call = 0
    model.train()
    while p["epoch"] < train_cfg.epochs and p["step"] < total_steps and not p["finished"]:
        batches = _batches(len(train_split), train_cfg.batch_size, train_cfg.seed, p["epoch"],
                           accelerator.process_index, world)
        usable = len(batches) - len(batches) % train_cfg.grad_accum
        while p["batch"] < usable and p["step"] < total_steps:
            parts = {}
            for micro in range(train_cfg.grad_accum):
                rows = batches[p["batch"] + micro]
                batch = {k: v.to(device) for k, v in train_split.fetch(rows).items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    output = model(batch["semantic"], batch["detail"])
                    loss, parts = brain_mclip_objective(output, batch, batch["semantic"], batch["detail"], loss_cfg)
                accelerator.backward(loss / train_cfg.grad_accum)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            p["batch"] += train_cfg.grad_accum
            p["step"] += 1
            steps_this_call += 1
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.4f}", epoch=p["epoch"])
            if main and p["step"] % train_cfg.log_every == 0:
                for key, value in parts.items():
                    writer.add_scalar(f"train/{key}", value, p["step"])
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], p["step"])
            if p["step"] % train_cfg.checkpoint_every == 0 or (stop_after_steps and steps_this_call >= stop_after_steps):
                checkpoint()
            if stop_after_steps and steps_this_call >= stop_after_steps:
                bar.close()
                if main:
                    log.info("stopped after %d steps as asked; resume with --resume", steps_this_call)
                    _close(writer, handler)
                return _result(out, p, accelerator.unwrap_model(model))
        # End of epoch: validate, keep the best, lower the rate on a plateau, stop when it no longer improves.
        val_loss, val = _validate(model, val_split, loss_cfg, device)
        if main:
            writer.add_scalar("val/loss", val_loss, p["step"])
            for key, value in val.items():
                writer.add_scalar(f"val/{key}", value, p["step"])
            log.info("epoch %d: val loss %.4f, %s", p["epoch"], val_loss,
                     ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
        if p["epoch"] == 0 and main:
            _log_gradient_shares(accelerator.unwrap_model(model), val_split, loss_cfg, device, out)
        improved = (val["score"] > p["best_score"]) if train_cfg.select_on == "score" else (val_loss < p["best_val"])
        if improved:
            p.update(best_val=val_loss, best_score=val["score"], best_epoch=p["epoch"], bad_epochs=0,
                     val_retrieval=val.get("image_top1", val.get("text_top1", float("nan"))), best_metrics=dict(val))
            if main:
                _save_best(out, accelerator.unwrap_model(model), cfg)
        else:
            p["bad_epochs"] += 1
            if p["bad_epochs"] >= train_cfg.patience:
                log.info("no better validation %s for %d epochs; stopping", train_cfg.select_on, p["bad_epochs"])
                p["finished"] = True
        if scheduler.end_epoch(improved) and main:
            log.info("validation %s flat for %d epochs: learning rate now %.3g", train_cfg.select_on,
                     train_cfg.plateau_epochs, scheduler.get_last_lr()[0])
        p["epoch"] += 1
        p["batch"] = 0
        checkpoint()
    p["finished"] = True
    checkpoint()
    bar.close()
    if main:
        log.info("finished: best epoch %d (val loss %.4f, val score %.4f)", p["best_epoch"], p["best_val"],
                 p["best_score"])
        _close(writer, handler)
    return _result(out, p, accelerator.unwrap_model(model))


def _log_gradient_shares(model, split: PairedSplit, loss_cfg: ObjectiveConfig, device, out: Path) -> None:
    """After the first epoch (at the start the heads emit the mean, where CKA has no gradient yet),
    write each loss term's gradient norm on a validation batch to the log and ``balance.json``."""
    rows = np.arange(min(32, len(split)))
    batch = {k: v.to(device) for k, v in split.fetch(rows).items()}
    norms = gradient_norms(model, batch, loss_cfg)
    write_json_atomic(out / "balance.json", {"after_epoch": 0, "rows": len(rows), "terms": norms})
    log.info("gradient norm on the output heads per weighted loss term after epoch 0 (share): %s",
             ", ".join(f"{name} {v['heads']:.3g} ({v['share']:.0%})" for name, v in norms.items() if v["heads"] > 0))


def _close(writer, handler) -> None:
    writer.close()
    log.removeHandler(handler)
    handler.close()


def _save_best(out: Path, model: BrainMCLIP, cfg: dict) -> None:
    with atomic_path(out / "model_best.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"config": json.dumps(cfg), "model_config": json.dumps(model.config.to_dict())})


def _result(out: Path, p: dict, model: BrainMCLIP) -> TrainResult:
    return TrainResult(out, p["best_val"], p["best_epoch"], p["step"], p["finished"], p["val_retrieval"],
                       model.parameter_counts(), p.get("best_score", float("nan")), p.get("best_metrics"))


def load_best_model(run_dir: Path) -> BrainMCLIP:
    path = Path(run_dir) / "model_best.safetensors"
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; the run has not finished an epoch yet")
    metadata, state = load_safetensors(path, json_metadata=("model_config",))
    model = BrainMCLIP(BrainMCLIPConfig.from_dict(metadata["model_config"]))
    model.load_state_dict(state)
    return model.eval()

