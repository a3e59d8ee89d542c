"""BrainCLIP's zero-shot classification of fMRI embeddings by prompting: prompt ensembles and learned context (CoOp).

An fMRI embedding lives in CLIP's projected space, so any text CLIP can embed is a classifier weight: the class
whose text embedding is most cosine-similar to the fMRI embedding is the prediction. Two ways of making the class
weights are supported: the 18-template prompt ensemble BrainCLIP lists, or a CoOp context learned on the
training classes (both in :mod:`brainmclip.models.coop`).

Accuracy (:func:`topk_accuracy`) is top-k with ties shared: a row's credit is the chance that its true class
lands in the top k when tied scores are ordered at random, so a classifier that scores every class alike gets
exactly the chance level k/C. The 95% interval is Wilson's score interval for a binomial proportion over rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.models.coop import (  # noqa: F401 (part of this module's API, used by classify)
    BRAINCLIP_TEMPLATES,
    CONTEXT_FORMAT,
    DEFAULT_LOGIT_SCALE,
    LearnedContext,
    class_prompts,
    class_weights,
    clip_logit_scale,
    context_tokens,
    context_weights,
    encode_token_embeddings,
    text_features,
    train_context,
)

__all__ = [
    "NAME", "HELP", "BRAINCLIP_TEMPLATES", "DEFAULT_LOGIT_SCALE", "RESULT_FILE", "TABLE_FILE", "CONTEXT_FILE",
    "ZeroShotResult", "ZeroShotTable", "LearnedContext",
    "class_prompts", "class_weights", "text_features", "encode_token_embeddings", "context_tokens",
    "context_weights", "train_context", "clip_logit_scale", "zero_shot_scores", "topk_accuracy", "wilson_interval",
    "evaluate_table", "classify", "add_arguments", "run",
]

NAME = "classify"
HELP = "zero-shot classification of fMRI embeddings by prompting (18-template ensemble or learned CoOp context)"

RESULT_FILE = "zero_shot.json"
TABLE_FILE = "zero_shot.md"
CONTEXT_FILE = "context.safetensors"
RESULT_FORMAT = "brainmclip-zero-shot/1"
TIE_RULE = "shared: credit = P(true class in top k) with tied scores ordered at random"
INTERVAL = "Wilson score interval, 95%, binomial over rows"
_Z95 = 1.959963984540054


# -- scoring ---------------------------------------------------------------------------------------------------


def zero_shot_scores(embeddings, weights) -> np.ndarray:
    """Cosine similarity ``(n, C)`` float32 of each embedding row to each class weight row."""
    x = np.asarray(embeddings, np.float32)
    w = np.asarray(weights, np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise InvalidInputError(f"embeddings of shape {x.shape} and class weights of shape {w.shape}; expected (n, D) "
                                "and (C, D) in the same space")
    if not (np.isfinite(x).all() and np.isfinite(w).all()):
        raise InvalidInputError("embeddings or class weights hold NaN or inf")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return x @ w.T


def wilson_interval(successes: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (95% for the default ``z``)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict[int, dict]:
    """Top-k accuracy per k: ``{k: {"accuracy", "chance", "correct", "n", "ci95"}}``.

    ``scores`` ``(n, C)`` (higher = more likely), ``labels`` ``(n,)`` true class indices. Ties are shared: a row
    whose true class has ``g`` classes scoring strictly higher and ``t`` others scoring the same gets credit
    ``clip((k - g) / (t + 1), 0, 1)``, its chance of being in the top k under a random order of the ties.
    ``correct`` is the summed credit; ``chance`` is ``min(k / C, 1)``; ``ci95`` is Wilson's 95% interval.
    A k larger than the number of classes is an error.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if s.ndim != 2 or len(s) != len(y):
        raise InvalidInputError(f"scores of shape {s.shape} and {len(y)} labels; expected (n, C) scores, one label a row")
    n, n_classes = s.shape
    if n_classes == 0 or not np.isfinite(s).all():
        raise InvalidInputError("scores are empty or hold NaN; expected finite scores for at least one class")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise InvalidInputError(f"labels span {y.min()}..{y.max()}; expected indices into {n_classes} classes")
    ks = [int(k) for k in ks]
    bad = [k for k in ks if k < 1 or k > n_classes]
    if bad:
        raise InvalidInputError(f"top-{bad[0]} accuracy among {n_classes} classes; expected 1 <= k <= {n_classes}")
    true = s[np.arange(n), y][:, None]
    greater = (s > true).sum(1)
    ties = (s == true).sum(1) - 1
    result = {}
    for k in ks:
        credit = np.clip((k - greater) / (ties + 1), 0.0, 1.0)
        correct = float(credit.sum())
        low, high = wilson_interval(correct, n)
        result[k] = {"accuracy": correct / n if n else float("nan"), "chance": min(k / n_classes, 1.0),
                     "correct": correct, "n": int(n), "ci95": [low, high]}
    return result


@dataclass
class ZeroShotTable:
    """One classification: which rows, among which candidate classes, and their top-k accuracies."""

    name: str
    description: str
    classes: list[str]
    n_rows: int
    topk: dict[int, dict]
    per_class: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["topk"] = {str(k): v for k, v in self.topk.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ZeroShotTable:
        return cls(name=data["name"], description=data["description"], classes=list(data["classes"]),
                   n_rows=int(data["n_rows"]), topk={int(k): dict(v) for k, v in data["topk"].items()},
                   per_class={k: dict(v) for k, v in data.get("per_class", {}).items()})


def evaluate_table(name: str, description: str, scores, labels, class_names, ks=(1, 5)) -> ZeroShotTable:
    """:func:`topk_accuracy` of ``scores`` over ``class_names``, with each class's top-1 accuracy and row count."""
    labels = np.asarray(labels, np.int64)
    topk = topk_accuracy(scores, labels, ks)
    top1 = topk_accuracy(scores, labels, (1,))[1] if len(labels) else None
    per_class = {}
    if top1 is not None:
        s = np.asarray(scores, np.float64)
        true = s[np.arange(len(labels)), labels][:, None]
        credit = np.clip((1 - (s > true).sum(1)) / (s == true).sum(1), 0.0, 1.0)
        for c, cname in enumerate(class_names):
            rows = labels == c
            if rows.any():
                per_class[str(cname)] = {"n": int(rows.sum()), "top1": float(credit[rows].mean())}
    return ZeroShotTable(name, description, [str(c) for c in class_names], int(len(labels)), topk, per_class)


@dataclass
class ZeroShotResult:
    """What ``brainmclip classify`` measured: one or more tables, and how the class weights were made."""

    prediction: str
    method: str
    subject: int
    split: str
    clip: str
    prompt: str
    tables: list[ZeroShotTable]
    n_rows: int
    n_unlabelled: int
    labels_source: str
    settings: dict = field(default_factory=dict)

    def table(self, name: str) -> ZeroShotTable:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "tables"}
        data["tables"] = [t.to_dict() for t in self.tables]
        data["format"] = RESULT_FORMAT
        data["tie_rule"] = TIE_RULE
        data["interval"] = INTERVAL
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ZeroShotResult:
        if data.get("format") != RESULT_FORMAT:
            raise InvalidInputError(f"zero-shot result of format {data.get('format')!r}; expected {RESULT_FORMAT!r}")
        return cls(prediction=data["prediction"], method=data["method"], subject=int(data["subject"]),
                   split=data["split"], clip=data["clip"], prompt=data["prompt"],
                   tables=[ZeroShotTable.from_dict(t) for t in data["tables"]], n_rows=int(data["n_rows"]),
                   n_unlabelled=int(data["n_unlabelled"]), labels_source=data["labels_source"],
                   settings=dict(data.get("settings", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ZeroShotResult:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZeroShotResult:
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        if not path.is_file():
            raise MissingInputError(f"{path}: no zero-shot result (run brainmclip classify)")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path}: not a zero-shot result ({type(exc).__name__}: {exc})") from None

    def markdown(self) -> str:
        how = ("18-template prompt ensemble (BrainCLIP's templates)" if self.prompt == "ensemble"
               else f"CoOp learned context ({self.settings.get('context', {}).get('n_ctx', '?')} vectors)")
        lines = [f"# Zero-shot classification: subject {self.subject}, {self.method}, {self.split} split", "",
                 f"Predictions: `{self.prediction}`; CLIP: `{self.clip}`; class weights: {how}.",
                 f"Labels: `{self.labels_source}`; {self.n_rows} labelled rows classified"
                 + (f", {self.n_unlabelled} rows without a label skipped." if self.n_unlabelled else "."), ""]
        for t in self.tables:
            lines += [f"## {t.description}", "", f"{t.n_rows} rows, {len(t.classes)} candidate classes.", "",
                      "| k | accuracy | 95% interval | chance |", "|---|---|---|---|"]
            for k, v in sorted(t.topk.items()):
                lo, hi = v["ci95"]
                lines.append(f"| top-{k} | {100 * v['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | "
                             f"{100 * v['chance']:.1f}% |")
            lines.append("")
        lines += [f"Ties: {TIE_RULE}. Interval: {INTERVAL}.", ""]
        return "\n".join(lines)

    def write(self, out: str | os.PathLike) -> Path:
        """Write ``zero_shot.json``, ``zero_shot.md``, and a figure with an analysis manifest (so ``brainmclip
        report --analyses`` shows it) into ``out``, each atomically (the manifest last)."""
        from brainmclip.analysis.common import write_analysis
        from brainmclip.atomic import write_bytes_atomic

        out = Path(out)
        write_bytes_atomic(out / TABLE_FILE, self.markdown().encode())
        write_bytes_atomic(out / RESULT_FILE, self.to_json().encode())
        self._figure(out / "figure.png")
        how = "18-template prompt ensemble" if self.prompt == "ensemble" else "CoOp learned context"
        rows = []
        for t in self.tables:
            for k, v in sorted(t.topk.items()):
                lo, hi = v["ci95"]
                rows.append({"rows classified": t.description, "n": t.n_rows, "classes": len(t.classes), "k": k,
                             "accuracy %": f"{100 * v['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                             "chance %": f"{100 * v['chance']:.1f}"})
        write_analysis(out, "zero_shot", f"Zero-shot classification ({self.method}, subject {self.subject}, {how})",
                       f"Top-k accuracy of classifying fMRI embeddings by CLIP text embeddings of class prompts; "
                       f"[95% {INTERVAL.split(',')[0].lower()}]; grey ticks mark chance. Labels: "
                       f"{self.labels_source}.", rows, {"prompt": self.prompt, "clip": self.clip})
        return out / RESULT_FILE

    def _figure(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from brainmclip.analysis.common import save_figure

        ks = sorted({k for t in self.tables for k in t.topk})
        fig, ax = plt.subplots(figsize=(8, 0.7 * len(self.tables) * len(ks) + 1.2))
        labels, y = [], 0
        for t in self.tables:
            for k in ks:
                if k not in t.topk:
                    continue
                v = t.topk[k]
                lo, hi = v["ci95"]
                ax.barh(y, 100 * v["accuracy"], xerr=[[100 * (v["accuracy"] - lo)], [100 * (hi - v["accuracy"])]],
                        color="C0" if k == 1 else "C1", capsize=3)
                ax.plot([100 * v["chance"]] * 2, [y - 0.4, y + 0.4], color="grey", lw=2)
                labels.append(f"{t.description}\n({len(t.classes)} classes) top-{k}")
                y += 1
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        save_figure(fig, path)


# -- the classify command ----------------------------------------------------------------------------------------


def _read_run(pred_dir: Path, manifest: dict) -> tuple[Path | None, dict]:
    from types import SimpleNamespace

    from brainmclip.models.predictions import prediction_run

    return prediction_run(SimpleNamespace(manifest=manifest), pred_dir)


def _clip_name(clip, manifest: dict, run_dir: Path | None, run: dict) -> str:
    """The CLIP model the embeddings belong to: ``clip``, else the prediction's, else its run's feature store's."""
    if clip:
        return str(clip)
    if manifest.get("clip"):
        return str(manifest["clip"])
    if run_dir is not None and run.get("features"):
        from brainmclip.features.feature_store import open_feature_store
        from brainmclip.features.pooled import clip_name_of
        from brainmclip.paths import resolve_path

        try:
            return clip_name_of(open_feature_store(resolve_path(run["features"], run_dir)))
        except (MissingInputError, InvalidInputError, KeyError, TypeError):
            pass  # no readable store: the user has to name the model
    raise MissingInputError("the prediction does not record its CLIP model; pass clip= (--clip NAME)")


def _labels_for(pred_dir: Path, data, labels_file, run_dir, run):
    """Labels from ``labels_file``, else the ones the run was trained with, on ``data`` or the run's dataset."""
    from brainmclip.data.labels import load_class_labels
    from brainmclip.paths import resolve_path

    if labels_file is None:
        labels_file = run.get("config", {}).get("data", {}).get("labels")
    if data is None and run_dir is not None and run.get("data"):
        data = resolve_path(run["data"], run_dir)
    if labels_file is not None and not str(labels_file).startswith("scene:"):
        return load_class_labels(data or pred_dir, labels_file)
    if data is None:
        raise MissingInputError(f"{pred_dir}: its training run records no prepared dataset; pass data= (--data) "
                                "or labels_file= (--labels)")
    if not Path(data).is_dir():
        raise MissingInputError(f"{data}: no such prepared dataset folder; pass data= (--data) or labels_file= (--labels)")
    return load_class_labels(data, labels_file)


def _labelled_rows(labels, ids) -> tuple[np.ndarray, np.ndarray]:
    """Row indices whose stimulus has a class label, and their class indices."""
    ids = np.asarray(ids, np.int64)
    rows = np.array([i for i, s in enumerate(ids) if int(s) in labels.by_id], np.int64)
    classes = labels.of(ids[rows]) if len(rows) else np.empty(0, np.int64)
    return rows, classes


def _resolve_ks(ks, n_classes: int, explicit: bool) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if explicit:
        return ks
    kept = [k for k in ks if k <= n_classes]
    return kept or [1]


def _check_embedding_space(embeddings: np.ndarray, towers, clip: str) -> None:
    if embeddings.shape[1] != towers.embed_dim:
        raise InvalidInputError(f"the prediction's embeddings have {embeddings.shape[1]} dimensions but CLIP {clip!r} "
                                f"embeds in {towers.embed_dim}; pass the CLIP model the run was trained for (--clip)")


def classify(pred_dir, data=None, clip=None, labels_file=None, classes=None, holdout=None, prompt: str = "ensemble",
             context=None, out=None, *, templates=BRAINCLIP_TEMPLATES, ks=None, train_context_from=None,
             context_source: str = "fmri", n_ctx: int = 4, steps: int = 200, lr: float = 2e-3, batch_size: int = 64,
             seed: int = 0, init: str = "random", logit_scale: float | None = None, towers=None,
             device: str | None = None, progress: bool = False) -> ZeroShotResult:
    """Zero-shot classification of a prediction folder's fMRI embeddings; writes ``out/zero_shot.{json,md}``.

    Parameters
    ----------
    pred_dir : the prediction folder (``brainmclip predict``); its embedding is
        :func:`brainmclip.features.pooled.pooled_prediction`.
    data, labels_file : class labels come from ``labels_file`` if given, else from the prepared dataset ``data``,
        else from the prediction's run's prepared dataset (:func:`brainmclip.data.labels.load_class_labels`).
        Rows whose stimulus has no label are skipped (and counted); none labelled is an error.
    clip : CLIP model name; default: the one the prediction records.
    classes : candidate class names; default: every class among the classified rows. Rows of other classes
        are not classified.
    holdout : class names held out of training. Then two tables: held-out rows among the held-out classes only
        (the GOD-style zero-shot test) and held-out rows among all candidate classes; plus seen rows among all
        candidates when there are any.
    prompt : 'ensemble' (:data:`BRAINCLIP_TEMPLATES` or ``templates``) or 'coop' (learned context: ``context``
        as a :class:`LearnedContext` or a file, or learned here from the prediction folder
        ``train_context_from``, normally ``RUN/predictions_train``; see :func:`train_context`).
    context_source : what CoOp learns from: 'fmri' (the training rows' fMRI embeddings) or 'image' (CLIP image
        embeddings of the training rows' stimuli, from the run's feature store).
    ks : top-k values; default (1, 5), dropping those above a table's class count. Given explicitly, a k
        above a table's class count is an error.
    towers, device : CLIP towers already loaded (else loaded by name on ``device``: a GPU when present).
    """
    arguments = dict(locals())
    if out is None:
        return _classify(**arguments)
    from brainmclip.atomic import output_lock

    with output_lock(out):  # one writer per output folder: the context file and the tables belong together
        return _classify(**arguments)


def _classify(pred_dir, data, clip, labels_file, classes, holdout, prompt, context, out, templates, ks,
              train_context_from, context_source, n_ctx, steps, lr, batch_size, seed, init, logit_scale, towers,
              device, progress) -> ZeroShotResult:
    from brainmclip.features.clip_models import load_clip
    from brainmclip.models.predictions import load_predictions

    if prompt not in ("ensemble", "coop"):
        raise InvalidInputError(f"Unknown prompt={prompt!r}; choose from ['ensemble', 'coop']")
    if context_source not in ("fmri", "image"):
        raise InvalidInputError(f"Unknown context source {context_source!r}; choose from ['fmri', 'image']")
    if prompt == "coop" and context is None and train_context_from is None:
        raise InvalidInputError("prompt 'coop' needs a learned context: pass context= (--context FILE) or learn one "
                                "from the train split's predictions (--train-context)")
    if prompt == "ensemble" and (context is not None or train_context_from is not None):
        raise InvalidInputError("a learned context is only used with prompt 'coop'; pass --prompt coop")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise MissingInputError(f"{pred_dir}: no such prediction folder (run brainmclip predict)")
    pred = load_predictions(pred_dir)
    run_dir, run = _read_run(pred_dir, pred.manifest)
    clip_name = _clip_name(clip, pred.manifest, run_dir, run)
    labels = _labels_for(pred_dir, data, labels_file, run_dir, run)
    rows, y = _labelled_rows(labels, pred.stimulus_ids)
    if not len(rows):
        raise InvalidInputError(f"none of the {len(pred.stimulus_ids)} stimuli of {pred_dir} has a class label in "
                                f"{labels.source or 'the labels'}; expected labels for the classified stimuli")
    n_unlabelled = len(pred.stimulus_ids) - len(rows)

    holdout_idx = labels.index(list(holdout)) if holdout else []
    # Default candidates: every class among the labelled rows (held-out classes included).
    candidates = labels.index(list(classes)) if classes else sorted(set(y.tolist()) | set(holdout_idx))
    missing = [labels.names[h] for h in holdout_idx if h not in candidates]
    if missing:
        raise InvalidInputError(f"held-out class {missing[0]!r} is not among the candidate classes; add it to --classes")
    keep = np.isin(y, candidates)
    rows, y = rows[keep], y[keep]
    if not len(rows):
        raise InvalidInputError("no classified row belongs to the candidate classes "
                                f"{[labels.names[c] for c in candidates]}")
    if holdout_idx and not np.isin(y, holdout_idx).any():
        raise InvalidInputError(f"no classified row belongs to a held-out class {[labels.names[h] for h in holdout_idx]}")

    from brainmclip.features.pooled import pooled_prediction

    embeddings = np.asarray(pooled_prediction(pred), np.float32)[rows]
    if towers is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        towers = load_clip(clip_name, device=device)
    _check_embedding_space(embeddings, towers, clip_name)
    names = [labels.names[c] for c in candidates]

    settings: dict = {"candidates": "given" if classes else "classes of the classified rows",
                      "holdout": [labels.names[h] for h in holdout_idx], "run": str(run_dir) if run_dir else None}
    if prompt == "ensemble":
        weights = class_weights(towers, names, templates)
        settings["templates"] = list(templates)
    else:
        if context is None:
            context = _learn_context(train_context_from, towers, labels, holdout_idx, context_source, run_dir, run,
                                     n_ctx=n_ctx, steps=steps, lr=lr, batch_size=batch_size, seed=seed, init=init,
                                     logit_scale=logit_scale, progress=progress)
            if out is not None:
                context.save(Path(out) / CONTEXT_FILE)
                settings["context_file"] = CONTEXT_FILE
        elif not isinstance(context, LearnedContext):
            settings["context_file"] = str(Path(context).resolve())
            context = LearnedContext.load(context)
        weights = context_weights(towers, names, context)
        settings["context"] = context.settings | {"n_ctx": context.n_ctx}
    scores = zero_shot_scores(embeddings, weights)
    position = {c: j for j, c in enumerate(candidates)}
    local = np.array([position[c] for c in y], np.int64)

    explicit = ks is not None
    ks = list(ks) if explicit else [1, 5]
    tables = []
    if holdout_idx:
        held = np.isin(y, holdout_idx)
        cols = [position[h] for h in holdout_idx]
        held_local = np.array([cols.index(position[c]) for c in y[held]], np.int64)
        held_names = [names[c] for c in cols]
        tables.append(evaluate_table("heldout_among_heldout", "Held-out-class rows among the held-out classes",
                                     scores[held][:, cols], held_local, held_names,
                                     _resolve_ks(ks, len(cols), explicit)))
        tables.append(evaluate_table("heldout_among_all", "Held-out-class rows among all candidate classes",
                                     scores[held], local[held], names, _resolve_ks(ks, len(names), explicit)))
        if (~held).any():
            tables.append(evaluate_table("seen_among_all", "Training-class rows among all candidate classes",
                                         scores[~held], local[~held], names, _resolve_ks(ks, len(names), explicit)))
    else:
        tables.append(evaluate_table("all", "All labelled rows among the candidate classes", scores, local, names,
                                     _resolve_ks(ks, len(names), explicit)))
    result = ZeroShotResult(prediction=str(pred_dir.resolve()), method=str(pred.method), subject=int(pred.subject),
                            split=str(pred.split), clip=str(towers.identity.get("model", clip_name)), prompt=prompt,
                            tables=tables, n_rows=int(len(rows)), n_unlabelled=int(n_unlabelled),
                            labels_source=str(labels.source), settings=settings)
    if out is not None:
        result.write(out)
    return result


def _learn_context(train_pred, towers, labels, holdout_idx, source, run_dir, run, **kwargs) -> LearnedContext:
    """CoOp context learned on the training rows (classes not held out) of the prediction folder ``train_pred``."""
    from brainmclip.features.pooled import pooled_prediction
    from brainmclip.models.predictions import load_predictions

    train_pred = Path(train_pred)
    if not train_pred.is_dir():
        raise MissingInputError(f"{train_pred}: no training-split predictions to learn the context from (run brainmclip "
                                "predict --split train, or pass --train-pred DIR)")
    pred = load_predictions(train_pred)
    rows, y = _labelled_rows(labels, pred.stimulus_ids)
    keep = ~np.isin(y, holdout_idx)
    rows, y = rows[keep], y[keep]
    if not len(rows):
        raise InvalidInputError(f"{train_pred}: no labelled row of a training (not held-out) class to learn the "
                                "context from")
    train_classes = sorted(set(y.tolist()))
    if len(train_classes) < 2:
        raise InvalidInputError(f"{train_pred}: rows of one training class only ({labels.names[train_classes[0]]!r}); "
                                "learning a context needs two or more classes")
    if source == "fmri":
        x = np.asarray(pooled_prediction(pred), np.float32)[rows]
    else:
        from brainmclip.features.feature_store import open_feature_store
        from brainmclip.features.pooled import image_embeddings
        from brainmclip.paths import resolve_path

        if run_dir is None or not run.get("features"):
            raise MissingInputError("context source 'image' needs the run's feature store, and the run records none")
        store = open_feature_store(resolve_path(run["features"], run_dir))
        x = np.asarray(image_embeddings(store, pred.stimulus_ids[rows]), np.float32)
    position = {c: j for j, c in enumerate(train_classes)}
    context = train_context(towers, x, [position[c] for c in y], [labels.names[c] for c in train_classes],
                            source=f"{source} embeddings of {train_pred.resolve()}", **kwargs)
    return context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="prediction folder (brainmclip predict)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for zero_shot.json and zero_shot.md")
    parser.add_argument("--data", type=Path, help="prepared dataset whose labels to use (default: the run's)")
    parser.add_argument("--clip", help="CLIP model of the embedding space (default: the one the prediction records)")
    parser.add_argument("--labels", help="class labels: CSV 'stimulus_id,class', a labels.json, or scene:category / "
                                         "scene:colour / scene:background for a simulated NSD (default: the "
                                         "labels the run was trained with, else the prepared dataset's)")
    parser.add_argument("--classes", nargs="+", metavar="NAME",
                        help="candidate classes (default: every class among the classified rows)")
    parser.add_argument("--holdout", nargs="+", metavar="NAME",
                        help="classes held out of training (names, space- or comma-separated; default: the run's "
                             "data.holdout_classes): report held-out rows among held-out classes and among all")
    parser.add_argument("--prompt", choices=("ensemble", "coop"), default=None,
                        help="class weights from BrainCLIP's 18 templates or a learned CoOp context (default: coop "
                             "when --context or --train-context is given, else ensemble)")
    parser.add_argument("--context", type=Path, help="learned context file (context.safetensors) for --prompt coop")
    parser.add_argument("--train-context", action="store_true",
                        help="learn the CoOp context on the run's train-split predictions (classes not held out); "
                             "saved as OUT/context.safetensors")
    parser.add_argument("--train-pred", type=Path,
                        help="train-split prediction folder for --train-context (default: RUN/predictions_train)")
    parser.add_argument("--context-source", choices=("fmri", "image"), default="fmri",
                        help="learn the context from the training rows' fMRI embeddings (default) or CLIP image "
                             "embeddings")
    parser.add_argument("--n-ctx", type=int, default=4, help="context vectors (default 4)")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps of context learning (default 200)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of context learning (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topk", type=int, nargs="+", metavar="K", help="top-k accuracies (default: 1 5)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _names(values) -> list[str] | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: class names given with spaces or commas."""
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def run(args) -> int:
    from brainmclip.models.predictions import load_predictions

    holdout = _names(args.holdout)
    if holdout is None:  # the classes the run itself was trained without
        _, record = _read_run(Path(args.pred), load_predictions(args.pred).manifest)
        holdout = record.get("config", {}).get("data", {}).get("holdout_classes") or None
    train_from = None
    if args.train_context:
        if args.context is not None:
            raise InvalidInputError("--context and --train-context exclude each other; give one")
        train_from = args.train_pred
        if train_from is None:
            run_dir, _ = _read_run(Path(args.pred), load_predictions(args.pred).manifest)
            if run_dir is None:
                raise MissingInputError(f"{args.pred}: records no training run; pass --train-pred DIR")
            train_from = run_dir / "predictions_train"
    elif args.train_pred is not None:
        raise InvalidInputError("--train-pred is only used with --train-context")
    prompt = args.prompt or ("coop" if args.context is not None or train_from is not None else "ensemble")
    result = classify(args.pred, data=args.data, clip=args.clip, labels_file=args.labels, classes=_names(args.classes),
                      holdout=holdout, prompt=prompt, context=args.context, out=args.out, ks=args.topk,
                      train_context_from=train_from, context_source=args.context_source, n_ctx=args.n_ctx,
                      steps=args.steps, lr=args.lr, seed=args.seed, device="cpu" if args.cpu else None,
                      progress=not (args.no_progress or getattr(args, "quiet", False)))
    print(result.markdown())
    print(f"wrote {Path(args.out) / RESULT_FILE}")
    return 0
