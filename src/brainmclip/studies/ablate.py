"""``brainmclip ablate``: the BrainMCLIP paper's ablation tables, rebuilt on our data.

Table 3 removes parts of the model (text only; one image path; no cross-reconstruction),
Table 4 swaps the multi-granularity loss for its baselines (MSE + InfoNCE / SoftCLIP) and its
parts (MSE + Sims, MSE + CKA). Every row is trained, predicted, reconstructed and scored with
the eight metrics on the test set, per subject, resumable row by row; the table puts our numbers
(mean over subjects, 95% bootstrap interval over test images) beside the paper's and tests each
row against the full model ("Ours") with paired Wilcoxon tests over the same images.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from brainmclip.atomic import locks_output, write_bytes_atomic
from brainmclip.errors import InvalidInputError
from brainmclip.studies.rows import Row, row_folder, train_row

__all__ = ["TABLES", "run_ablation"]

log = logging.getLogger("brainmclip.studies")

TABLES: dict[int, tuple[Row, ...]] = {
    3: (Row("text_only", "Text Branch Only", ("ablations/text_only",)),
        Row("text_image_semantic", "Text + Image Semantic", ("ablations/text_image_semantic",)),
        Row("text_image_detail", "Text + Image Detail", ("ablations/text_image_detail",)),
        Row("no_cross_reconstruction", "Text + Image Semantic + Image Detail", ("ablations/no_cross_reconstruction",)),
        Row("full", "Text + Image Semantic + Image Detail + Cross Reconstruction (Ours)")),
    4: (Row("loss_mse_infonce", "MSE + InfoNCE", ("ablations/loss_mse_infonce",)),
        Row("loss_mse_softclip", "MSE + SoftCLIP", ("ablations/loss_mse_softclip",)),
        Row("loss_mse_sims", "MSE + Sims", ("ablations/loss_mse_sims",)),
        Row("loss_mse_cka", "MSE + CKA", ("ablations/loss_mse_cka",)),
        Row("full", "MSE + CKA + Sims (Ours)")),
}
TITLES = {3: "Table 3: BrainMCLIP architecture ablation", 4: "Table 4: multi-granularity loss ablation"}


def _subject_row(row: Row, data: Path, features, folder: Path, base_configs, overrides, recon_options, eval_kwargs,
                 progress: bool) -> dict:
    """Train -> predict -> reconstruct -> evaluate one row for one subject; each stage skips finished work."""
    from brainmclip.evaluation.evaluate import evaluate_reconstructions, load_evaluation
    from brainmclip.evaluation.metric_table import METRICS
    from brainmclip.generation.reconstruct import reconstruct
    from brainmclip.training.predict import predict

    train_row(row, data, features, folder, base_configs, overrides, progress)
    pred = folder / "predictions_test"
    if not (pred / "manifest.json").is_file():
        predict(folder / "run", "test", pred)
    recon = reconstruct(pred, folder / "reconstructions_test", recon_options, progress=progress)
    wanted = set(eval_kwargs["metrics"] or METRICS)
    try:
        report = load_evaluation(folder / "evaluation")
    except (FileNotFoundError, ValueError):  # not scored yet, or by an older version: score (again)
        report = None
    if report is None or set(report["runs"][0].metrics) != wanted:
        if "networks" not in eval_kwargs:  # loaded once, for the first row that needs scoring
            from brainmclip.evaluation.image_metrics import load_metric_networks

            eval_kwargs["networks"] = load_metric_networks(sorted(wanted), eval_kwargs["clip_model"], None,
                                                           eval_kwargs["allow_random"])
        report = evaluate_reconstructions([recon.root], folder / "evaluation", **eval_kwargs)
    entry = report["runs"][0]
    with np.load(folder / "evaluation" / "per_image.npz") as per_image:
        values = {key.split(":", 1)[1]: per_image[key] for key in per_image.files}
    return {"metrics": entry.metrics, "per_image": values, "uncalibrated": entry.uncalibrated,
            "retrieval": entry.retrieval}


@locks_output()
def run_ablation(table: int, data_dirs, features, out, base_configs=("brain_mclip",), overrides=(),
                 recon_options=None, clip_model: str = "openai/clip-vit-large-patch14", allow_random: bool = False,
                 n_boot: int = 1000, metrics=None, progress: bool = True) -> list[dict]:
    """Run every row of ``table`` (3 or 4) for every prepared subject in ``data_dirs``; write ``OUT/table<N>``.

    ``metrics``: compute only these of the eight (default all; the ImageNet networks dominate the
    cost of scoring on a CPU). A row scored earlier with other metrics is scored again.

    Returns the table rows (label, our mean metrics, intervals, published values, tests vs Ours).
    """
    from brainmclip.analysis.common import write_analysis
    from brainmclip.data.prepared import load_prepared
    from brainmclip.evaluation.evaluate import bootstrap_ci
    from brainmclip.evaluation.metric_table import METRICS, check_metrics
    from brainmclip.evaluation.published import PUBLISHED_ABLATIONS
    from brainmclip.generation.reconstruct import ReconstructOptions

    if table not in TABLES:
        raise InvalidInputError(f"Unknown table={table!r}; choose 3 (architecture) or 4 (loss)")
    out = Path(out)
    recon_options = recon_options or ReconstructOptions()
    if metrics is not None:
        if not metrics:
            raise InvalidInputError(f"no metrics given; choose from {list(METRICS)}")
        metrics = list(check_metrics(metrics))
    eval_kwargs = {"clip_model": clip_model, "allow_random": allow_random, "n_boot": n_boot, "truth_cache": {},
                   "metrics": metrics}
    subjects = [(load_prepared(d, images=False).subject, Path(d)) for d in data_dirs]
    if len({s for s, _ in subjects}) != len(subjects):
        raise InvalidInputError(f"--data gives subject(s) {[s for s, _ in subjects]} more than once")
    results: dict[str, dict] = {}
    for row in TABLES[table]:
        per_subject = [_subject_row(row, data, features, row_folder(out, row, subject), base_configs, overrides,
                                    recon_options, eval_kwargs, progress) for subject, data in subjects]
        pooled = {m: np.concatenate([s["per_image"][m] for s in per_subject]) for m in METRICS
                  if all(m in s["per_image"] for s in per_subject)}
        results[row.name] = {
            "row": row, "pooled": pooled,
            "mean": {m: float(np.mean([s["metrics"][m] for s in per_subject])) for m in pooled},
            "ci95": {m: bootstrap_ci(pooled[m], n_boot) for m in pooled},
            "uncalibrated": sorted({u for s in per_subject for u in s["uncalibrated"]})}
    rows = _table_rows(table, results, PUBLISHED_ABLATIONS[table], METRICS)
    folder = out / f"table{table}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_tables(folder, rows, METRICS)
    _figure(table, rows, METRICS, folder / "figure.png")
    uncalibrated = sorted({u for r in results.values() for u in r["uncalibrated"]})
    caption = (f"Each row trained, reconstructed and scored on the test set of subject(s) "
               f"{', '.join(str(s) for s, _ in subjects)} (ours: mean over subjects, [95% bootstrap interval]; "
               f"'p ... vs Ours': paired Wilcoxon test against the full model over the same images; table.csv has "
               f"it for every metric). The paper's rows "
               f"(mean of subjects 1, 2, 5, 7; real NSD, CLIP ViT-L/14, Versatile Diffusion) are beside ours for "
               f"orientation only.")
    if uncalibrated:
        caption += f" Uncalibrated (random metric networks): {', '.join(uncalibrated)}."
    write_analysis(folder, f"ablation_table{table}", TITLES[table], caption, table=[
        {"row": r["label"], "source": r["source"], **{m: r["values"].get(m, "") for m in METRICS},
         **{f"p {m} vs Ours": _p_text(r.get("p_values", {}).get(m)) for m in ("PixCorr", "CLIP")}} for r in rows],
        settings={"table": table, "subjects": [s for s, _ in subjects], "base_configs": list(base_configs),
                  "overrides": list(overrides), "clip_model": clip_model, "features": str(features)})
    return rows


def _table_rows(table: int, results: dict, published: dict, metric_names) -> list[dict]:
    from brainmclip.evaluation.evaluate import paired_tests

    ours = results["full"]
    rows = []
    for name, r in results.items():
        tests = {}
        if name != "full":
            tests = {t["metric"]: t["p_value"]
                     for t in paired_tests({"a:row": r["pooled"], "b:ours": ours["pooled"]})}
        values = {m: f"{r['mean'][m]:.3f} [{r['ci95'][m][0]:.3f}, {r['ci95'][m][1]:.3f}]" for m in r["mean"]}
        rows.append({"name": name, "label": r["row"].label, "source": "ours", "values": values,
                     "mean": r["mean"], "ci95": r["ci95"], "p_values": tests})
        if name in published:
            pub = dict(zip(metric_names, published[name], strict=True))
            rows.append({"name": name, "label": r["row"].label, "source": "published", "mean": pub,
                         "values": {m: f"{v:.3f}" for m, v in pub.items()}})
    return rows


def _p_text(p) -> str:
    return "" if p is None else f"{p:.2g}"


def _write_tables(folder: Path, rows: list[dict], metric_names) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "source", *metric_names, *[f"{m} ci_low" for m in metric_names],
                     *[f"{m} ci_high" for m in metric_names], *[f"p {m} vs Ours" for m in metric_names]])
    for r in rows:
        ci = r.get("ci95", {})
        writer.writerow([r["label"], r["source"], *[r["mean"].get(m, "") for m in metric_names],
                         *[ci.get(m, ("", ""))[0] for m in metric_names], *[ci.get(m, ("", ""))[1] for m in metric_names],
                         *[r.get("p_values", {}).get(m, "") for m in metric_names]])
    write_bytes_atomic(folder / "table.csv", buffer.getvalue().encode())
    lines = ["| row | | " + " | ".join(metric_names) + " |", "|---|---|" + "---|" * len(metric_names)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['source']} | " + " | ".join(r["values"].get(m, "") for m in metric_names)
                     + " |")
    write_bytes_atomic(folder / "table.md", ("\n".join(lines) + "\n").encode())


def _figure(table: int, rows: list[dict], metric_names, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainmclip.analysis.common import save_figure

    ours = [r for r in rows if r["source"] == "ours"]
    published = {r["name"]: r for r in rows if r["source"] == "published"}
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.2))
    x = np.arange(len(ours))
    for ax, metric in zip(axes.ravel(), metric_names, strict=True):
        mean = [r["mean"].get(metric, np.nan) for r in ours]
        low = [mean[i] - r["ci95"].get(metric, (np.nan,))[0] for i, r in enumerate(ours)]
        high = [r["ci95"].get(metric, (np.nan, np.nan))[1] - mean[i] for i, r in enumerate(ours)]
        ax.bar(x - 0.2, mean, 0.4, yerr=[low, high], color="tab:blue", label="ours", capsize=2)
        ax.bar(x + 0.2, [published.get(r["name"], {}).get("mean", {}).get(metric, np.nan) for r in ours], 0.4,
               color="lightgrey", hatch="//", edgecolor="grey", label="paper")
        ax.set_title(metric + (" (lower is better)" if metric in ("EffNet-B", "SwAV") else ""), fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels([str(i + 1) for i in x], fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(TITLES[table] + ": rows " + "; ".join(f"{i + 1} = {r['label']}" for i, r in enumerate(ours)),
                 fontsize=8, wrap=True)
    fig.tight_layout()
    save_figure(fig, path)
