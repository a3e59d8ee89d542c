"""``evaluate_reconstructions``: the eight image metrics, retrieval and statistics for one or more runs.

For every reconstruction folder: ground truth comes from the prepared dataset the run was
trained on (its test images, by NSD id), the eight metrics from :mod:`image_metrics` under one
named protocol, retrieval from the run's predicted embeddings against the feature store, and
the mapping model's parameter count from the run. Results are per subject and method, with
bootstrap 95% intervals over images, means over subjects, and paired Wilcoxon tests between
methods on the same subject's images.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import stats

from brainmclip import __version__
from brainmclip.atomic import write_bytes_atomic, write_json_atomic
from brainmclip.data.prepared import load_prepared
from brainmclip.evaluation.published import LOWER_IS_BETTER, METRIC_NAMES, PUBLISHED
from brainmclip.evaluation.retrieval import recall_at_k, similarity_matrix, top1_n_way
from brainmclip.evaluation.scene_checks import SceneChecker, scene_root
from brainmclip.generation.reconstruct import load_reconstructions
from brainmclip.models.predictions import load_predictions

__all__ = ["bootstrap_ci", "evaluate_reconstructions", "format_markdown", "make_report", "paired_tests"]

log = logging.getLogger("brainmclip.evaluate")
_IDENTIFICATION = ("AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP")


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling images with replacement."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_tests(per_image: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """Wilcoxon signed-rank test per metric for every pair of methods (same images, same order)."""
    out = []
    for a, b in combinations(sorted(per_image), 2):
        for metric in METRIC_NAMES:
            x, y = per_image[a].get(metric), per_image[b].get(metric)
            if x is None or y is None or len(x) != len(y):
                continue
            diff = np.asarray(x, np.float64) - np.asarray(y, np.float64)
            p = float(stats.wilcoxon(x, y).pvalue) if np.any(diff != 0) else 1.0
            out.append({"metric": metric, "a": a, "b": b, "median_difference": float(np.median(diff)), "p_value": p})
    return out


def _run_info(recon) -> tuple[dict, dict, Path]:
    pred_dir = Path(recon.manifest["settings"]["predictions"])
    pred = load_predictions(pred_dir)
    run_dir = Path(pred.manifest["run"]) if pred.manifest.get("run") else None
    run = json.loads((run_dir / "run.json").read_text()) if run_dir and (run_dir / "run.json").exists() else {}
    return pred.manifest, run, pred_dir


def _truth_images(data: Path, ids: np.ndarray) -> np.ndarray:
    test = load_prepared(data).test
    row = {int(i): r for r, i in enumerate(test.stimulus_ids)}
    missing = [int(i) for i in ids if int(i) not in row]
    if missing:
        raise ValueError(f"{data}: test split lacks NSD ids {missing[:3]} of the reconstructions")
    if test.images is None:
        raise ValueError(f"{data}: prepared without images; ground truth needs them")
    return np.stack([np.asarray(test.images[row[int(i)]]) for i in ids])


def _retrieval(pred_dir: Path, features: Path | None, n_way: int, seed: int) -> dict:
    from brainmclip.features.feature_store import open_feature_store

    if features is None or not (Path(features) / "manifest.json").exists():
        return {}
    pred = load_predictions(pred_dir)
    store = open_feature_store(features)
    targets = store.get(pred.stimulus_ids)
    out = {}
    if pred.image is not None:
        fused = (targets["image_semantic"] + targets["image_detail"]) / 2
        sim = similarity_matrix(np.asarray(pred.image, np.float32), fused)
        top1 = top1_n_way(sim, n_way=n_way, n_repeats=30, seed=seed)
        out["image"] = {"top1": top1, "recall_at_k": recall_at_k(sim)}
    if pred.text is not None:
        sim = similarity_matrix(np.asarray(pred.text, np.float32), targets["text"])
        out["text"] = {"top1": top1_n_way(sim, n_way=n_way, n_repeats=30, seed=seed), "recall_at_k": recall_at_k(sim)}
    return out


def evaluate_reconstructions(recon_dirs, out, protocol=None, clip_model: str = "openai/clip-vit-large-patch14",
                             weights_dir=None, allow_random: bool = False, n_boot: int = 1000, seed: int = 0,
                             batch_size: int = 32, networks=None, truth_cache: dict | None = None,
                             metrics=None) -> dict:
    """Evaluate reconstruction folders; write metrics.json, metrics.csv, metrics.md and per_image.npz to ``out``.

    ``networks`` (from :func:`~brainmclip.evaluation.image_metrics.load_metric_networks`) and
    ``truth_cache`` (a dict this call fills) let a caller that evaluates many folders against the
    same test images load the metric networks and embed the true images once. ``metrics``: a
    subset of the eight to compute (default all); the others are absent from the results.
    """
    from brainmclip.evaluation.image_metrics import METRICS, MetricProtocol, evaluate_images, load_metric_networks

    start = time.perf_counter()
    protocol = protocol or MetricProtocol()
    out = Path(out)
    entries, per_image_all = [], {}
    truth_cache = {} if truth_cache is None else truth_cache
    checker = None
    for recon_dir in recon_dirs:
        recon = load_reconstructions(recon_dir)
        pred_manifest, run, pred_dir = _run_info(recon)
        data = Path(run.get("data") or "")
        if not run or not (data / "manifest.json").exists():
            raise FileNotFoundError(f"{recon_dir}: cannot find the run and prepared dataset behind these "
                                    f"reconstructions (predictions at {pred_dir})")
        ids = recon.stimulus_ids
        recons = np.stack([recon.load(i) for i in range(len(recon))])
        truths = _truth_images(data, ids)
        if networks is None:  # loaded once, after the inputs are known to be there
            networks = load_metric_networks(metrics or METRICS, clip_model, weights_dir, allow_random)
        result = evaluate_images(recons, truths, protocol=protocol, clip_model=clip_model, weights_dir=weights_dir,
                                 allow_random=allow_random, batch_size=batch_size, networks=networks,
                                 truth_cache=truth_cache, metrics=metrics or METRICS)
        subject, method = int(pred_manifest.get("subject", 0)), str(pred_manifest.get("method", "unknown"))
        key = f"subj{subject:02d}/{method}"
        per_image = {m: np.asarray(v) for m, v in result["per_image"].items()}
        scene_checks = {}
        root = scene_root(data)
        if root is not None and SceneChecker.applies(clip_model):
            checker = checker or SceneChecker(clip_model)
            scene_checks = checker.check(root, ids, recons, truths)
            per_image["category_agreement"] = scene_checks.pop("per_image").astype(np.float64)
            scene_checks["ci95"] = bootstrap_ci(per_image["category_agreement"], n_boot, seed)
        per_image_all[key] = per_image
        prepared_manifest = json.loads((data / "manifest.json").read_text())
        entries.append({
            "subject": subject, "method": method, "reconstructions": str(Path(recon_dir).resolve()),
            "metrics": {m: float(result[m]) for m in METRIC_NAMES if m in result},
            "ci95": {m: bootstrap_ci(per_image[m], n_boot, seed) for m in METRIC_NAMES if m in per_image},
            "uncalibrated": list(result.get("uncalibrated", [])),
            "scene_checks": scene_checks,
            "retrieval": _retrieval(pred_dir, run.get("features"), n_way=min(300, len(ids)), seed=seed),
            "parameters": int(run.get("parameters", {}).get("total", 0)),
            "n_images": int(len(ids)),
            "test_set": prepared_manifest.get("test_set"),
            "data": str(data),
            "run": pred_manifest.get("run"),
        })
        log.info("%s: %s", key, ", ".join(f"{m} {v:.3f}" for m, v in entries[-1]["metrics"].items()))
    by_subject: dict[int, dict] = {}
    for key, values in per_image_all.items():
        by_subject.setdefault(int(key[4:6]), {})[key.split("/", 1)[1]] = values
    tests = {f"subj{s:02d}": paired_tests(methods) for s, methods in by_subject.items() if len(methods) > 1}
    methods = sorted({e["method"] for e in entries})
    means = {}
    for method in methods:
        rows = [e for e in entries if e["method"] == method]
        means[method] = {m: float(np.mean([r["metrics"][m] for r in rows if m in r["metrics"]]))
                         for m in METRIC_NAMES if all(m in r["metrics"] for r in rows)}
    report = {
        "format": "brainmclip-evaluation/1",
        "protocol": asdict(protocol) if hasattr(protocol, "__dataclass_fields__") else dict(protocol),
        "clip_model": clip_model, "allow_random_metric_nets": allow_random,
        "runs": entries, "mean_over_subjects": means, "paired_tests": tests,
        "published": PUBLISHED, "code_version": __version__, "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", report)
    write_bytes_atomic(out / "metrics.csv", _csv(entries, means).encode())
    write_bytes_atomic(out / "metrics.md", format_markdown(report).encode())
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{k}:{m}": v for k, d in per_image_all.items() for m, v in d.items()})
    write_bytes_atomic(out / "per_image.npz", buffer.getvalue())
    return report


def _csv(entries, means) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject", "method", *METRIC_NAMES, "image_retrieval_top1", "brain_retrieval_top1", "parameters",
                     "uncalibrated"])
    for e in entries:
        top1 = e["retrieval"].get("image", {}).get("top1", {})
        writer.writerow([e["subject"], e["method"], *[f"{e['metrics'].get(m, float('nan')):.4f}" for m in METRIC_NAMES],
                         f"{top1.get('image_retrieval', {}).get('mean', float('nan')):.4f}",
                         f"{top1.get('brain_retrieval', {}).get('mean', float('nan')):.4f}",
                         e["parameters"], ";".join(e["uncalibrated"])])
    for method, values in means.items():
        writer.writerow(["mean", method, *[f"{values.get(m, float('nan')):.4f}" for m in METRIC_NAMES], "", "", "", ""])
    return buffer.getvalue()


def _cell(metric: str, value: float, uncalibrated: bool = False) -> str:
    text = f"{100 * value:.1f}%" if metric in _IDENTIFICATION else f"{value:.3f}"
    return text + ("†" if uncalibrated else "")


def format_markdown(report: dict) -> str:
    """A table laid out like the paper's Tables 1-2, ours first, published rows marked."""
    arrows = [f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in METRIC_NAMES]
    label = clip_metric_label(report["clip_model"]) or report["clip_model"]
    lines = [f"Protocol: {report['protocol'].get('name', 'mindeye1')}; CLIP for metrics: {label}",
             "", "| method | subject | " + " | ".join(arrows) + " | params |",
             "|---|---|" + "---|" * len(METRIC_NAMES) + "---|"]
    for e in report["runs"]:
        cells = [_cell(m, e["metrics"][m], m in e["uncalibrated"]) if m in e["metrics"] else "–" for m in METRIC_NAMES]
        lines.append(f"| {e['method']} (ours) | {e['subject']} | " + " | ".join(cells) +
                     f" | {e['parameters'] / 1e6:.1f}M |")
    for method, values in report["mean_over_subjects"].items():
        unc = set().union(*[set(e["uncalibrated"]) for e in report["runs"] if e["method"] == method])
        cells = [_cell(m, values[m], m in unc) if m in values else "–" for m in METRIC_NAMES]
        lines.append(f"| **{method} (ours, mean)** | all | " + " | ".join(cells) + " | |")
    lines.append("| *published (papers, NSD subjects 1,2,5,7)* | | " + " | ".join("" for _ in METRIC_NAMES) + " | |")
    for row in report["published"]:
        cells = [_cell(m, row["metrics"][m]) for m in METRIC_NAMES]
        lines.append(f"| *{row['method']}* (published) | 1,2,5,7 | " + " | ".join(cells) + f" | {row['params'] or ''} |")
    checked = [e for e in report["runs"] if e.get("scene_checks")]
    if checked:
        lines += ["", "Category agreement with the simulated scenes (zero-shot category of the image names one of the "
                      "scene's largest objects; CLIP: " + label + "):", "",
                  "| method | subject | reconstructions | true images |", "|---|---|---|---|"]
        lines += [f"| {e['method']} | {e['subject']} | {100 * e['scene_checks']['category_agreement']:.1f}% | "
                  f"{100 * e['scene_checks']['truth_zero_shot']:.1f}% |" for e in checked]
    if any(e["uncalibrated"] for e in report["runs"]):
        lines += ["", "† uncalibrated: computed with a randomly initialised metric network (weights were absent and "
                      "--allow-random-metric-nets was given); not comparable with published numbers."]
    return "\n".join(lines) + "\n"


def make_report(eval_dir, out, title: str = "brainmclip reconstructions", debug_image_check: bool = False,
                analyses=()) -> Path:
    """An HTML report (grids, metric table with intervals, retrieval, training curves) from an evaluation folder.

    ``analyses``: folders holding finished analyses (``brainmclip analyze`` / ``ablate`` outputs, or
    folders of them); each gets a section of the report.
    """
    from brainmclip.analysis.common import find_analyses
    from brainmclip.evaluation.report import read_tensorboard_scalars, write_report

    eval_dir = Path(eval_dir)
    metrics_file = eval_dir / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: missing; run brainmclip evaluate --out {eval_dir} first")
    report = json.loads(metrics_file.read_text())
    runs = []
    for e in report["runs"]:
        recon = load_reconstructions(e["reconstructions"])
        retrieval = {}
        for kind in ("image", "text"):
            top1 = e["retrieval"].get(kind, {}).get("top1")
            if top1:
                retrieval[f"{kind}_top1"] = top1["image_retrieval"]["mean"]
                retrieval[f"{'brain' if kind == 'image' else 'text_brain'}_top1"] = top1["brain_retrieval"]["mean"]
                retrieval["n_way"] = top1["n_way"]
        run_dir = Path(e["run"]) if e.get("run") else None
        runs.append({
            "subject": e["subject"], "method": e["method"], "metrics": e["metrics"], "ci95": e["ci95"],
            "uncalibrated": e["uncalibrated"], "retrieval": retrieval, "parameters": e["parameters"],
            "recon_paths": [str(p) for p in recon.paths],
            "truth_images": _truth_images(Path(e["data"]), recon.stimulus_ids),
            "curves": read_tensorboard_scalars(run_dir) if run_dir else {},
            "scene_checks": e.get("scene_checks") or {},
            "protocol": report["protocol"],
            "data": {"test_set": e.get("test_set"), "n_images": e["n_images"], "prepared": e["data"]},
        })
    clip_label = clip_metric_label(report.get("clip_model", ""))
    notes = []
    if clip_label:
        notes.append(f"The CLIP column is 2-way identification with {clip_label}, not CLIP ViT-L/14: these numbers "
                     "compare our own rows and are not comparable with published CLIP numbers.")
    found = [a for folder in analyses for a in find_analyses(folder)]
    return write_report(out, runs, title=title, published=report["published"], debug_image_check=debug_image_check,
                        clip_label=clip_label, notes=notes, analyses=found)


def clip_metric_label(clip_model: str) -> str | None:
    """How to name the CLIP metric's network in tables: None for CLIP ViT-L/14 (the field's), else its name."""
    from brainmclip.features.clip_models import DEFAULT_CLIP

    name = str(clip_model)
    if name == DEFAULT_CLIP or name.rstrip("/").endswith("clip-vit-large-patch14"):
        return None
    if name == "mini":
        return "mini-CLIP (miniature world)"
    if name == "tiny" or name.startswith("random:"):
        return f"random CLIP ({name})"
    return name
