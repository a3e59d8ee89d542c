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
from brainmclip.atomic import locks_output, write_bytes_atomic, write_json_atomic
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.evaluation.metric_table import METRIC_TABLE, METRICS
from brainmclip.evaluation.published import PUBLISHED
from brainmclip.evaluation.retrieval import DIRECTIONS, INTERVAL, decoded_retrieval
from brainmclip.evaluation.scene_checks import SceneChecker, scene_root
from brainmclip.generation.reconstruct import load_reconstructions
from brainmclip.models.predictions import load_predictions, prediction_run
from brainmclip.paths import record_path, resolve_path
from brainmclip.types import RunEvaluation

__all__ = ["bootstrap_ci", "evaluate_reconstructions", "format_markdown", "load_evaluation", "make_report",
           "paired_tests"]

log = logging.getLogger("brainmclip.evaluate")
EVALUATION_FORMAT = "brainmclip-evaluation/2"


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling images with replacement."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_tests(per_image: dict[str, dict[str, np.ndarray]], ids: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Wilcoxon signed-rank test per metric for every pair of methods, on the images both were scored on.

    ``ids[method]`` lists the NSD ids behind ``per_image[method]``'s rows; without it both must hold the same
    images in the same order. ``n_images`` of each test says how many images were paired.
    """
    out = []
    for a, b in combinations(sorted(per_image), 2):
        if ids is not None:
            common, ra, rb = np.intersect1d(ids[a], ids[b], assume_unique=True, return_indices=True)
        for metric in METRICS:
            x, y = per_image[a].get(metric), per_image[b].get(metric)
            if x is None or y is None:
                continue
            if ids is not None:
                x, y = np.asarray(x)[ra], np.asarray(y)[rb]
            if len(x) != len(y) or len(x) < 2:
                continue
            diff = np.asarray(x, np.float64) - np.asarray(y, np.float64)
            p = float(stats.wilcoxon(x, y).pvalue) if np.any(diff != 0) else 1.0
            out.append({"metric": metric, "a": a, "b": b, "median_difference": float(np.median(diff)), "p_value": p,
                        "n_images": int(len(x))})
    return out


def _run_info(recon) -> tuple[dict, dict, Path, Path | None]:
    """The predictions manifest, the training run's run.json, the predictions folder and the run folder."""
    pred_dir = resolve_path(recon.manifest["settings"]["predictions"], recon.root)
    pred = load_predictions(pred_dir)
    run_dir, run = prediction_run(pred, pred_dir)
    return pred.manifest, run, pred_dir, run_dir


def _truth_images(data: Path, ids: np.ndarray) -> np.ndarray:
    test = load_prepared(data).test
    row = {int(i): r for r, i in enumerate(test.stimulus_ids)}
    missing = [int(i) for i in ids if int(i) not in row]
    if missing:
        raise InvalidInputError(f"{data}: test split lacks NSD ids {missing[:3]} of the reconstructions")
    if test.images is None:
        raise InvalidInputError(f"{data}: prepared without images; ground truth needs them")
    return np.stack([np.asarray(test.images[row[int(i)]]) for i in ids])


def _retrieval(pred_dir: Path, features: Path | None, seed: int) -> dict:
    from brainmclip.features.feature_store import open_feature_store

    if features is None or not (Path(features) / "manifest.json").exists():
        return {}
    return decoded_retrieval(load_predictions(pred_dir), open_feature_store(features), n_way=300, n_repeats=30,
                             seed=seed)


@locks_output()
def evaluate_reconstructions(recon_dirs, out, protocol=None, clip_model: str = "openai/clip-vit-large-patch14",
                             weights_dir=None, allow_random: bool = False, n_boot: int = 1000, seed: int = 0,
                             batch_size: int | None = None, networks=None, truth_cache: dict | None = None,
                             metrics=None, common_images: bool = False) -> dict:
    """Evaluate reconstruction folders; write metrics.json, metrics.csv, metrics.md and per_image.npz to ``out``.

    ``networks`` (from :func:`~brainmclip.evaluation.image_metrics.load_metric_networks`) and
    ``truth_cache`` (a dict this call fills) let a caller that evaluates many folders against the
    same test images load the metric networks and embed the true images once. ``metrics``: a
    subset of the eight to compute (default all); the others are absent from the results.
    ``common_images``: score every folder only on the images that all folders of its subject hold (a method made
    on part of the test set then compares with the others on the same images); otherwise each on all of its own.
    Returns what ``metrics.json`` holds, with ``runs`` as :class:`~brainmclip.types.RunEvaluation`.
    Paths in ``metrics.json`` are relative to ``out``, so the folders can move together.
    """
    from brainmclip.evaluation.image_metrics import MetricProtocol, evaluate_images, load_metric_networks

    start = time.perf_counter()
    protocol = protocol or MetricProtocol()
    out = Path(out)
    entries: list[RunEvaluation] = []
    per_image_all = {}
    ids_all: dict[str, np.ndarray] = {}
    folders: dict[str, object] = {}
    truth_cache = {} if truth_cache is None else truth_cache
    checker = None
    recons_in = []
    shared: dict[int, set] = {}
    for recon_dir in recon_dirs:  # every folder checked before any is scored
        recon = load_reconstructions(recon_dir)
        info = _run_info(recon)
        pred_manifest = info[0]
        subject = int(pred_manifest.get("subject", 0))
        # The reconstruction names its method where it differs from the predictions' (Stage 1 alone, a refinement).
        method = str(recon.manifest["settings"].get("method") or pred_manifest.get("method", "unknown"))
        key = f"subj{subject:02d}/{method}"
        if key in folders:
            raise InvalidInputError(f"{folders[key]} and {recon_dir} both hold {method} reconstructions of subject "
                                    f"{subject}; expected one folder per method and subject (evaluate them separately)")
        folders[key] = recon_dir
        ids = set(np.asarray(recon.stimulus_ids).tolist())
        shared[subject] = shared[subject] & ids if subject in shared else ids
        recons_in.append((recon_dir, recon, info, subject, method, key))
    for recon_dir, recon, (_, run, pred_dir, run_dir), subject, method, key in recons_in:
        data = resolve_path(run["data"], run_dir) if run.get("data") else None
        if not run or data is None or not (data / "manifest.json").exists():
            raise MissingInputError(f"{recon_dir}: cannot find the run and prepared dataset behind these "
                                    f"reconstructions (predictions at {pred_dir})")
        features = resolve_path(run["features"], run_dir) if run.get("features") else None
        rows = range(len(recon))
        if common_images:
            rows = [r for r, i in enumerate(recon.stimulus_ids) if int(i) in shared[subject]]
            if not rows:
                raise InvalidInputError(f"{recon_dir}: no image that every subject-{subject} folder holds; expected "
                                        "folders of the same test images (or leave out --common-images)")
        ids = np.asarray(recon.stimulus_ids)[list(rows)]
        ids_all[key] = ids
        recons = np.stack([recon.load(i) for i in rows])
        truths = _truth_images(data, ids)
        if networks is None:  # loaded once, after the inputs are known to be there
            networks = load_metric_networks(metrics or METRICS, clip_model, weights_dir, allow_random)
        result = evaluate_images(recons, truths, protocol=protocol, clip_model=clip_model, weights_dir=weights_dir,
                                 allow_random=allow_random, batch_size=batch_size, networks=networks,
                                 truth_cache=truth_cache, metrics=metrics or METRICS)
        per_image = {m: np.asarray(v) for m, v in result.per_image.items()}
        scene_checks = {}
        root = scene_root(data)
        if root is not None and SceneChecker.applies(clip_model):
            checker = checker or SceneChecker(clip_model)
            scene_checks = checker.check(root, ids, recons, truths)
            per_image["category_agreement"] = scene_checks.pop("per_image").astype(np.float64)
            scene_checks["ci95"] = bootstrap_ci(per_image["category_agreement"], n_boot, seed)
        per_image_all[key] = per_image
        prepared_manifest = json.loads((data / "manifest.json").read_text())
        entries.append(RunEvaluation(
            subject=subject, method=method, metrics=dict(result.values),
            ci95={m: bootstrap_ci(per_image[m], n_boot, seed) for m in METRICS if m in result.per_image},
            uncalibrated=list(result.uncalibrated), scene_checks=scene_checks,
            retrieval=_retrieval(pred_dir, features, seed=seed),
            parameters=int(run.get("parameters", {}).get("total", 0)), n_images=int(len(ids)),
            test_set=prepared_manifest.get("test_set"), reconstructions=record_path(recon.root, out),
            data=record_path(data, out), run=record_path(run_dir, out) if run_dir else None))
        log.info("%s: %s", key, ", ".join(f"{m} {v:.3f}" for m, v in entries[-1].metrics.items()))
    by_subject: dict[int, dict] = {}
    ids_by_subject: dict[int, dict] = {}
    for key, values in per_image_all.items():
        by_subject.setdefault(int(key[4:6]), {})[key.split("/", 1)[1]] = values
        ids_by_subject.setdefault(int(key[4:6]), {})[key.split("/", 1)[1]] = ids_all[key]
    tests = {f"subj{s:02d}": paired_tests(methods, ids_by_subject[s]) for s, methods in by_subject.items()
             if len(methods) > 1}
    methods = sorted({e.method for e in entries})
    means = {}
    for method in methods:
        rows = [e for e in entries if e.method == method]
        means[method] = {m: float(np.mean([r.metrics[m] for r in rows])) for m in METRICS
                         if all(m in r.metrics for r in rows)}
    report = {
        "format": EVALUATION_FORMAT,
        "protocol": asdict(protocol) if hasattr(protocol, "__dataclass_fields__") else dict(protocol),
        "clip_model": clip_model, "allow_random_metric_nets": allow_random,
        "runs": entries, "mean_over_subjects": means, "paired_tests": tests,
        "retrieval_directions": dict(DIRECTIONS), "retrieval_interval": INTERVAL,
        "published": PUBLISHED, "code_version": __version__, "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", {**report, "runs": [e.to_json() for e in entries]})
    write_bytes_atomic(out / "metrics.csv", _csv(entries, means).encode())
    write_bytes_atomic(out / "metrics.md", format_markdown(report).encode())
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{k}:{m}": v for k, d in per_image_all.items() for m, v in d.items()})
    write_bytes_atomic(out / "per_image.npz", buffer.getvalue())
    return report


def load_evaluation(eval_dir) -> dict:
    """``metrics.json`` of an evaluation folder, ``runs`` as :class:`~brainmclip.types.RunEvaluation` with their
    paths resolved against the folder."""
    eval_dir = Path(eval_dir)
    metrics_file = eval_dir / "metrics.json"
    if not metrics_file.is_file():
        raise MissingInputError(f"{metrics_file}: missing; run brainmclip evaluate --out {eval_dir} first")
    try:
        report = json.loads(metrics_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{metrics_file}: not readable JSON ({err}); run brainmclip evaluate again") from None
    if report.get("format") != EVALUATION_FORMAT:
        raise InvalidInputError(f"{metrics_file}: format {report.get('format')!r}; expected {EVALUATION_FORMAT!r} "
                         "(written by an older brainmclip: run brainmclip evaluate again)")
    runs = []
    for values in report["runs"]:
        run = RunEvaluation.from_json(values)
        run.reconstructions = str(resolve_path(run.reconstructions, eval_dir))
        run.data = str(resolve_path(run.data, eval_dir))
        run.run = str(resolve_path(run.run, eval_dir)) if run.run else None
        runs.append(run)
    return {**report, "runs": runs}


def _top1(entry: RunEvaluation, kind: str, direction: str) -> float:
    top1 = entry.retrieval.get(kind, {}).get("top1_n_way", {})
    return top1.get(direction, {}).get("mean", float("nan"))


def _csv(entries: list[RunEvaluation], means) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject", "method", *METRICS, "image_retrieval_top1", "brain_retrieval_top1", "parameters",
                     "uncalibrated"])
    for e in entries:
        writer.writerow([e.subject, e.method, *[f"{e.metrics.get(m, float('nan')):.4f}" for m in METRICS],
                         f"{_top1(e, 'image', 'image_retrieval'):.4f}", f"{_top1(e, 'image', 'brain_retrieval'):.4f}",
                         e.parameters, ";".join(e.uncalibrated)])
    for method, values in means.items():
        writer.writerow(["mean", method, *[f"{values.get(m, float('nan')):.4f}" for m in METRICS], "", "", "", ""])
    return buffer.getvalue()


def _cell(metric: str, value: float, uncalibrated: bool = False) -> str:
    from brainmclip.evaluation.metric_table import format_metric

    return format_metric(metric, value) + ("†" if uncalibrated else "")


def format_markdown(report: dict) -> str:
    """A table laid out like the paper's Tables 1-2, ours first, published rows marked; then retrieval."""
    runs: list[RunEvaluation] = report["runs"]
    arrows = [f"{spec.key} {spec.arrow}" for spec in METRIC_TABLE]
    label = clip_metric_label(report["clip_model"]) or report["clip_model"]
    lines = [f"Protocol: {report['protocol'].get('name', 'mindeye1')}; CLIP for metrics: {label}",
             "", "| method | subject | " + " | ".join(arrows) + " | params |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for e in runs:
        cells = [_cell(m, e.metrics[m], m in e.uncalibrated) if m in e.metrics else "–" for m in METRICS]
        lines.append(f"| {e.method} (ours) | {e.subject} | " + " | ".join(cells) + f" | {e.parameters / 1e6:.1f}M |")
    for method, values in report["mean_over_subjects"].items():
        unc = set().union(*[set(e.uncalibrated) for e in runs if e.method == method])
        cells = [_cell(m, values[m], m in unc) if m in values else "–" for m in METRICS]
        lines.append(f"| **{method} (ours, mean)** | all | " + " | ".join(cells) + " | |")
    lines.append("| *published (papers, NSD subjects 1,2,5,7)* | | " + " | ".join("" for _ in METRICS) + " | |")
    for row in report["published"]:
        cells = [_cell(m, row["metrics"][m]) for m in METRICS]
        lines.append(f"| *{row['method']}* (published) | 1,2,5,7 | " + " | ".join(cells) + f" | {row['params'] or ''} |")
    retrieval = [(e, kind, r) for e in runs for kind, r in e.retrieval.items()]
    if retrieval:
        lines += ["", "Retrieval, top-1 among n-way random test items (chance 1/n), 30 subsets, mean [95% interval: "
                      f"{INTERVAL}]. Image retrieval = brain -> image (a decoded embedding ranks the images); "
                      "brain retrieval = image -> brain. MindEye1's code names the two directions the other way round.",
                  "", "| method | subject | embedding | n-way | image retrieval (brain -> image) | "
                      "brain retrieval (image -> brain) |", "|---|---|---|---|---|---|"]
        for e, kind, r in retrieval:
            top1 = r["top1_n_way"]
            cells = [f"{100 * top1[d]['mean']:.1f}% [{100 * top1[d]['ci95_low']:.1f}, {100 * top1[d]['ci95_high']:.1f}]"
                     for d in ("image_retrieval", "brain_retrieval")]
            lines.append(f"| {e.method} | {e.subject} | {kind} | {top1['n_way']} | " + " | ".join(cells) + " |")
    checked = [e for e in runs if e.scene_checks]
    if checked:
        lines += ["", "Category agreement with the simulated scenes (zero-shot category of the image names one of the "
                      "scene's largest objects; CLIP: " + label + "):", "",
                  "| method | subject | reconstructions | true images |", "|---|---|---|---|"]
        lines += [f"| {e.method} | {e.subject} | {100 * e.scene_checks['category_agreement']:.1f}% | "
                  f"{100 * e.scene_checks['truth_zero_shot']:.1f}% |" for e in checked]
    counts = {e.n_images for e in runs}
    if len(counts) > 1:
        lines += ["", "Rows are scored on different numbers of test images (a costly method made on part of the test "
                      "set): " + ", ".join(f"{e.method} subject {e.subject}: {e.n_images}" for e in runs) + ". Paired "
                      "tests below use the images both rows hold."]
    tests = [(subject, t) for subject, rows in sorted(report.get("paired_tests", {}).items()) for t in rows]
    if tests:
        lines += ["", "Paired Wilcoxon signed-rank tests per image (median difference a - b; lower is better for "
                      "EffNet-B and SwAV):", "", "| subject | a | b | metric | images | median a - b | p |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {subject[4:]} | {t['a']} | {t['b']} | {t['metric']} | {t.get('n_images', '')} | "
                  f"{t['median_difference']:+.4f} | {t['p_value']:.2g} |" for subject, t in tests]
    if any(e.uncalibrated for e in runs):
        lines += ["", "† uncalibrated: computed with a randomly initialised metric network (weights were absent and "
                      "--allow-random-metric-nets was given); not comparable with published numbers."]
    return "\n".join(lines) + "\n"


@locks_output()
def make_report(eval_dir, out, title: str = "brainmclip reconstructions", debug_image_check: bool = False,
                analyses=()) -> Path:
    """An HTML report (grids, metric table with intervals, retrieval, training curves) from an evaluation folder.

    ``eval_dir`` may be None when ``analyses`` give everything to show (e.g. BrainCLIP's retrieval and
    zero-shot tables). ``analyses``: folders holding finished analyses (``brainmclip analyze`` / ``ablate`` outputs, or
    folders of them); each gets a section of the report.
    """
    from brainmclip.analysis.common import find_analyses
    from brainmclip.evaluation.report import ReportRun, read_tensorboard_scalars, write_report

    report = load_evaluation(eval_dir) if eval_dir is not None else {"runs": [], "published": [], "protocol": None}
    runs, guided = [], []
    for e in report["runs"]:
        recon = load_reconstructions(e.reconstructions)
        settings = recon.manifest.get("settings", {})
        if settings.get("generator") == "clip-guided" and str(settings.get("clip")) == str(report.get("clip_model")):
            guided.append(f"{e.method} (subject {e.subject})")
        runs.append(ReportRun(
            evaluation=e, recon_paths=[str(p) for p in recon.paths],
            truth_images=_truth_images(Path(e.data), recon.stimulus_ids),
            curves=read_tensorboard_scalars(e.run) if e.run else {}, protocol=report["protocol"],
            data={"test_set": e.test_set, "n_images": e.n_images, "prepared": e.data},
            stimulus_ids=recon.stimulus_ids))
    clip_label = clip_metric_label(report.get("clip_model", ""))
    notes = []
    if clip_label:
        notes.append(f"The CLIP column is 2-way identification with {clip_label}, not CLIP ViT-L/14: these numbers "
                     "compare our own rows and are not comparable with published CLIP numbers.")
    if guided:
        notes.append(f"{', '.join(guided)}: generated under the gradient of the same CLIP that scores the CLIP column "
                     "and the category agreement, so those two figures are not independent of how the images were "
                     "made and overstate how recognisable they are; the other columns are independent of it.")
    found = [a for folder in analyses for a in find_analyses(folder)]
    return write_report(out, runs, title=title, published=report["published"], debug_image_check=debug_image_check,
                        clip_label=clip_label, notes=notes, analyses=found,
                        paired_tests=report.get("paired_tests"))


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
