"""fMRI -> image and fMRI -> text retrieval with CLIP's pooled embeddings, as BrainCLIP reports it.

For every test item, the candidate pool is all test items: the CLIP image embeddings of the test images
(fMRI -> image) or, per test image, the normalised mean of its captions' CLIP text embeddings (fMRI ->
text). Recall@K is the share of queries whose own item ranks within the top K by cosine; exact ties count
in the true item's favour. Chance is K / n. Intervals are 95% percentile bootstrap intervals over queries
(the candidate pool stays whole), so they say how much the figure depends on which test items were drawn.

Any method's predictions can be scored: BrainCLIP's one embedding per row, or the CLIP image embedding
inside a token prediction (token 0 of the semantic branch, see :func:`brainmclip.features.pooled.pooled_prediction`).
The output folder follows the analysis contract (:mod:`brainmclip.analysis.common`), so ``brainmclip report
--analyses`` shows its table and figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainmclip.analysis.common import save_figure, write_analysis
from brainmclip.atomic import locks_output, write_bytes_atomic, write_json_atomic
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError
from brainmclip.features.feature_store import open_feature_store
from brainmclip.features.pooled import caption_embeddings, image_embeddings, pooled_prediction
from brainmclip.models.predictions import load_predictions, prediction_run
from brainmclip.paths import resolve_path

__all__ = ["KS", "describe_run", "evaluate_embedding_retrieval", "mcnemar_p", "paired_comparisons", "query_ranks",
           "recall_with_interval"]

KS = (1, 5, 10)


def query_ranks(similarity: np.ndarray) -> np.ndarray:
    """Rank of each row's own column: ``1 + #{columns strictly more similar}``."""
    s = np.asarray(similarity, np.float64)
    return (s > np.diag(s)[:, None]).sum(axis=1) + 1


def recall_with_interval(ranks: np.ndarray, ks=KS, n_boot: int = 1000, seed: int = 0) -> dict:
    """Recall@K and mean recall with 95% percentile bootstrap intervals over the queries."""
    ranks = np.asarray(ranks)
    hits = np.stack([ranks <= k for k in ks]).astype(np.float64)  # (K, n)
    rng = np.random.default_rng(seed)
    boot = hits[:, rng.integers(len(ranks), size=(n_boot, len(ranks)))].mean(axis=2)  # (K, n_boot)
    out = {}
    for j, k in enumerate(ks):
        lo, hi = np.percentile(boot[j], [2.5, 97.5])
        out[f"recall@{k}"] = {"value": float(hits[j].mean()), "ci95": [float(lo), float(hi)],
                              "chance": min(k / len(ranks), 1.0)}
    mean_boot = boot.mean(axis=0)
    lo, hi = np.percentile(mean_boot, [2.5, 97.5])
    out["mean_recall"] = {"value": float(hits.mean()), "ci95": [float(lo), float(hi)],
                          "chance": float(np.mean([min(k / len(ranks), 1.0) for k in ks]))}
    return out


def describe_run(method: str, config: dict) -> str:
    """A row label for a run: BrainCLIP's mapping and supervision, ridge's targets, else the method."""
    if method == "brainclip":
        loss, mapping = config.get("loss", {}), config.get("model", {}).get("mapping", "linear")
        a, b = loss.get("alpha", 0) > 0, loss.get("beta", 0) > 0
        label = f"BrainCLIP-{'Linear' if mapping == 'linear' else 'VAE'} ({'V&T' if a and b else 'V' if a else 'T'})"
        held = config.get("data", {}).get("holdout_classes")
        return label + (f", without {len(held)} classes" if held else "")
    if method == "ridge":
        targets = config.get("ridge", {}).get("targets", "tokens")
        return {"clip_image": "Ridge (V)", "clip_text": "Ridge (T)"}.get(targets, "Ridge (token targets)")
    return {"brain_mclip": "BrainMCLIP", "gt_embedding": "GT embedding"}.get(method, method)


def _score(pred_dir: Path, n_boot: int, seed: int, progress: bool = True) -> dict:
    pred = load_predictions(pred_dir)
    run_dir, run = prediction_run(pred, pred_dir)
    if not run:
        raise InvalidInputError(f"{pred_dir}: its training run (run.json) is not found; retrieval needs the run's "
                                "feature store and prepared dataset")
    store = open_feature_store(resolve_path(run["features"], run_dir))
    prepared = load_prepared(resolve_path(run["data"], run_dir), images=False)
    ids = pred.stimulus_ids
    if len(ids) < 2:
        raise InvalidInputError(f"{pred_dir}: {len(ids)} items; retrieval needs at least 2")
    f = pooled_prediction(pred)
    images = image_embeddings(store, ids)
    texts = caption_embeddings(store, [prepared], ids, progress=progress).mean()
    if f.shape[1] != images.shape[1]:
        raise InvalidInputError(f"{pred_dir}: embeddings of width {f.shape[1]}, the feature store's CLIP has "
                                f"{images.shape[1]}; score predictions against the store they were trained on")
    label = describe_run(pred.method, run.get("config", {}))
    result = {"label": label, "method": pred.method, "subject": pred.subject, "split": pred.split,
              "n_items": len(ids), "predictions": str(pred_dir)}
    for name, candidates in (("image", images), ("text", texts)):
        ranks = query_ranks(f @ candidates.T)
        result[name] = recall_with_interval(ranks, n_boot=n_boot, seed=seed)
        result.setdefault("ranks", {})[name] = ranks.tolist()  # per query, for paired tests between methods
    result["stimulus_ids"] = ids.tolist()
    return result


def mcnemar_p(hits_a, hits_b) -> float:
    """Two-sided exact McNemar test of paired hit/miss outcomes (binomial on the discordant pairs)."""
    from scipy.stats import binomtest

    a, b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_comparisons(rows: list[dict]) -> list[dict]:
    """Every method against each ridge baseline of the same subject and test items: R@1 difference and the exact
    McNemar p-value of the paired hits."""
    out = []
    for r in rows:
        for base in rows:
            if base is r or base["method"] != "ridge" or r["method"] == "ridge" or base["subject"] != r["subject"] \
                    or base["stimulus_ids"] != r["stimulus_ids"]:
                continue
            for kind in ("image", "text"):
                a, b = np.asarray(r["ranks"][kind]) <= 1, np.asarray(base["ranks"][kind]) <= 1
                out.append({"subject": r["subject"], "task": kind, "method": r["label"], "baseline": base["label"],
                            "recall@1_difference": float(a.mean() - b.mean()), "mcnemar_p": mcnemar_p(a, b)})
    return out


def _cell(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{100 * entry['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _table(rows: list[dict]) -> list[dict]:
    table = []
    for r in rows:
        for kind, name in (("image", "fMRI→image"), ("text", "fMRI→text")):
            row = {"task": name, "method": r["label"], "subject": r["subject"]}
            row.update({f"R@{k} %": _cell(r[kind][f"recall@{k}"]) for k in KS})
            row["mean recall %"] = _cell(r[kind]["mean_recall"])
            row["chance R@1 %"] = f"{100 * r[kind]['recall@1']['chance']:.2f}"
            table.append(row)
    return sorted(table, key=lambda row: (row["task"], row["subject"]))


def _markdown(table: list[dict], n_items: list[int]) -> str:
    head = list(table[0])
    lines = [f"Retrieval over all test items ({', '.join(map(str, sorted(set(n_items))))} per subject); "
             "percent, [95% bootstrap interval over queries]", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(row[h]) for h in head) + " |" for row in table]
    return "\n".join(lines) + "\n"


def _figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
    labels = [f"{r['label']} (subj {r['subject']:02d})" for r in rows]
    y = np.arange(len(rows))
    for ax, kind, title in zip(axes, ("image", "text"), ("fMRI → image", "fMRI → text"), strict=True):
        for j, k in enumerate(KS):
            vals = np.array([100 * r[kind][f"recall@{k}"]["value"] for r in rows])
            ci = np.array([[100 * r[kind][f"recall@{k}"]["ci95"][0] for r in rows],
                           [100 * r[kind][f"recall@{k}"]["ci95"][1] for r in rows]])
            ax.barh(y + (j - 1) * 0.27, vals, height=0.26, xerr=np.abs(ci - vals), label=f"R@{k}", capsize=2)
        ax.axvline(100 * rows[0][kind]["recall@1"]["chance"], color="k", ls=":", lw=1, label="chance R@1")
        ax.set_title(f"{title} retrieval, all test items")
        ax.set_xlabel("recall (%)")
        ax.set_xlim(0, 100)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)


@locks_output()
def evaluate_embedding_retrieval(pred_dirs, out, n_boot: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Score prediction folders by retrieval; write ``out/retrieval.json``, ``retrieval.md`` and an analysis
    manifest + figure for the report. Returns the JSON content."""
    if n_boot < 1:
        raise InvalidInputError(f"n_boot={n_boot}: expected at least 1 bootstrap resample")
    out = Path(out)
    rows = [_score(Path(p), n_boot, seed, progress) for p in pred_dirs]
    out.mkdir(parents=True, exist_ok=True)
    report = {"format": "brainmclip-retrieval/1", "ks": list(KS), "interval": "95% percentile bootstrap over queries",
              "candidates": {"image": "CLIP image embeddings of all test images",
                             "text": "per test image, the normalised mean of its captions' CLIP text embeddings"},
              "runs": rows, "paired": paired_comparisons(rows)}
    write_json_atomic(out / "retrieval.json", report)
    table = _table(rows)
    text = _markdown(table, [r["n_items"] for r in rows])
    if report["paired"]:
        text += ("\nPaired against the ridge baselines (same test items): R@1 difference in points, exact McNemar "
                 "p-value\n\n| subject | task | method | baseline | ΔR@1 | p |\n|---|---|---|---|---|---|\n")
        text += "".join(f"| {c['subject']} | fMRI→{c['task']} | {c['method']} | {c['baseline']} | "
                        f"{100 * c['recall@1_difference']:+.1f} | {c['mcnemar_p']:.3g} |\n" for c in report["paired"])
    write_bytes_atomic(out / "retrieval.md", text.encode())
    _figure(rows, out / "figure.png")
    write_analysis(out, "retrieval", "fMRI → image / text retrieval (CLIP embedding space)",
                   "Recall@1/5/10 over all test items (candidates: every test image, or every test image's mean "
                   "caption embedding); bars show 95% bootstrap intervals over queries; the dotted line is chance "
                   "for R@1.", table, {"n_boot": n_boot, "seed": seed})
    return report
