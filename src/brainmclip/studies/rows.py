"""One row of a study: a BrainMCLIP variant trained (or resumed, or reused) in its own folder."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from brainmclip.atomic import write_json_atomic

__all__ = ["Row", "train_row", "row_folder"]

log = logging.getLogger("brainmclip.studies")


@dataclass(frozen=True)
class Row:
    """A model variant: config files layered on the study's base configs, then ``--set`` overrides."""

    name: str
    label: str
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


def row_folder(out: Path, row: Row, subject: int | None = None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", row.name)
    return Path(out) / "rows" / safe / (f"subj{subject:02d}" if subject is not None else "")


def train_row(row: Row, data, features, folder: Path, base_configs, overrides=(), progress: bool = True) -> dict:
    """Train the row in ``folder/run`` and return its validation summary (``folder/train_summary.json``).

    A finished row is read back; an interrupted one resumes from its last checkpoint; a run that
    died before its first checkpoint holds nothing worth keeping and starts again.
    """
    from brainmclip.training.loop import train_brain_mclip

    folder = Path(folder)
    summary_file = folder / "train_summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    run = folder / "run"
    resume = (run / "checkpoint_last.pt").is_file()
    if run.exists() and not resume:
        shutil.rmtree(run)
    configs = [*base_configs, *row.configs]
    log.info("row %s: %s %s", row.name, "resuming" if resume else "training", " + ".join(configs))
    result = train_brain_mclip(data, features, configs, run, resume=resume,
                               overrides=[*overrides, *row.overrides], progress=progress)
    if not result.finished:
        raise RuntimeError(f"{run}: training stopped before it finished; rerun the study to resume")
    balance = run / "balance.json"
    summary = {"row": asdict(row), "run": str(run.resolve()), "best_epoch": result.best_epoch, "steps": result.steps,
               "val_loss": result.best_val_loss, "val_score": result.val_score, "val": result.val_metrics or {},
               "gradient_shares": {k: v["share"] for k, v in json.loads(balance.read_text())["terms"].items()}
               if balance.is_file() else {}}
    write_json_atomic(summary_file, summary)
    return summary
