"""A static HTML report: reconstructions beside ground truth, the metric table, curves.

:func:`write_report` takes a plain Python structure (so the page does not depend on how the
evaluation computed anything) and writes a self-contained folder::

    out_dir/index.html          inline CSS, no scripts, no external fonts, relative links only
    out_dir/figures/*.png       per-subject reconstruction grids and training curves
    out_dir/.brainmclip-report.json   marks the folder as a report and lists the files above

The folder is built in a hidden sibling directory and renamed into place, so a reader sees the
old report or the new one, never half of one. Only a folder carrying that marker (and nothing the
marker does not list), an empty folder or no folder at all is replaced; any other ``out_dir`` is
refused untouched, so a mistyped ``--out`` cannot delete an evaluation or any other folder.

``runs`` are :class:`ReportRun` objects: one (subject, method) evaluation
(:class:`~brainmclip.types.RunEvaluation`) with what the page shows of it (reconstruction PNGs, ground
truth as PNG paths or a uint8 array, training curves, the metric protocol and data description).
``published`` rows ``{"method", "metrics", "params"}`` are shown in their own block, marked
"published (paper)"; their metric keys may be the evaluation's names (``AlexNet(2)``) or the paper's
column titles (``Alex(2)``, ``Incep``, ``Eff``).
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainmclip import __version__
from brainmclip.atomic import LOCK_FILE, output_entries
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError
from brainmclip.evaluation.metric_table import METRIC_TABLE, canonical_metric, format_interval, format_metric
from brainmclip.evaluation.retrieval import INTERVAL
from brainmclip.types import RunEvaluation

__all__ = ["ReportRun", "write_report", "check_report_out", "REPORT_MARKER", "read_tensorboard_scalars", "format_metric"]

log = logging.getLogger(__name__)

DAGGER = "\u2020"
MAX_GRID_IMAGES = 10


#: How methods are named on the page (others appear as they are called in the runs).
METHOD_LABELS = {"brain_mclip": "BrainMCLIP", "brainclip": "BrainCLIP", "minddiffuser": "MindDiffuser",
                 "minddiffuser_stage1": "MindDiffuser (Stage 1 only)", "gt_embedding": "GT embedding (upper bound)"}


def _method_label(method) -> str:
    method = str(method)
    if method.endswith("+MindDiffuser"):  # a method refined by MindDiffuser's Stage 2
        return f"{_method_label(method[:-len('+MindDiffuser')])} + MindDiffuser"
    return METHOD_LABELS.get(method, method)


def _canonical_map(values: Mapping | None) -> dict:
    return {canonical_metric(k): v for k, v in (values or {}).items()}


@dataclass
class ReportRun:
    """One (subject, method) of the report: its evaluation and what the page shows of it.

    ``truth_paths`` (PNG files) or ``truth_images`` (uint8 (n, H, W, 3)) give the ground truth of the grid;
    ``curves`` are TensorBoard scalars ``{tag: [(step, value), ...]}``; ``protocol`` and ``data`` describe how
    the metrics were computed and on what. ``stimulus_ids`` (NSD id per reconstruction) lines the grid's columns up
    by image when runs hold different images (one made on part of the test set); without it, by position.
    """

    evaluation: RunEvaluation
    recon_paths: list = field(default_factory=list)
    truth_paths: list = field(default_factory=list)
    truth_images: np.ndarray | None = None
    curves: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    stimulus_ids: np.ndarray | None = None

    @property
    def subject(self) -> int:
        return int(self.evaluation.subject)

    @property
    def method(self) -> str:
        return str(self.evaluation.method)


# --------------------------------------------------------------------------- TensorBoard


def read_tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under ``run_dir/tensorboard`` as ``{tag: [(step, value), ...]}``; {} if absent.

    Steps are sorted; when a resumed run logged a step twice, the last value written wins.
    """
    tb_dir = Path(run_dir) / "tensorboard"
    if not tb_dir.is_dir() or not any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir()):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        by_step: dict[int, float] = {}
        for event in acc.Scalars(tag):
            by_step[int(event.step)] = float(event.value)
        out[tag] = sorted(by_step.items())
    return out


# --------------------------------------------------------------------------- figures


def _load_rgb(path) -> np.ndarray:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"report: image {path} does not exist")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _as_rgb_array(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # CHW
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr, 0, 255).astype(np.uint8)
    return arr


def _truth_of(run: ReportRun, rows: list[int]) -> list[np.ndarray] | None:
    if run.truth_paths:
        return [_load_rgb(run.truth_paths[r]) for r in rows if r < len(run.truth_paths)]
    if run.truth_images is not None:
        return [_as_rgb_array(run.truth_images[r]) for r in rows if r < len(run.truth_images)]
    return None


def _grid_rows(runs: Sequence[ReportRun]) -> list[list[int]]:
    """Per run, the rows of its images in the grid's columns: the first images every run holds, matched by NSD id
    when all runs know their ids, else the first rows."""
    if runs and all(r.stimulus_ids is not None for r in runs):
        shared = set.intersection(*(set(np.asarray(r.stimulus_ids).tolist()) for r in runs))
        order = [int(i) for i in runs[0].stimulus_ids if int(i) in shared][:MAX_GRID_IMAGES]
        if order:
            positions = [{int(i): k for k, i in enumerate(r.stimulus_ids)} for r in runs]
            return [[where[i] for i in order] for where in positions]
    return [list(range(min(MAX_GRID_IMAGES, len(r.recon_paths)))) for r in runs]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", facecolor="white")


def _grid_figure(subject: int, runs: Sequence[ReportRun], path: Path) -> int:
    """Ground truth in the first row, one row per method below; returns the number of columns drawn."""
    columns = _grid_rows(runs)
    truth = next((t for t in (_truth_of(r, c) for r, c in zip(runs, columns, strict=True)) if t is not None), None)
    rows: list[tuple[str, list[np.ndarray]]] = []
    if truth is not None:
        rows.append(("ground truth", truth))
    for run, picks in zip(runs, columns, strict=True):
        recons = [_load_rgb(run.recon_paths[r]) for r in picks if r < len(run.recon_paths)]
        rows.append((_method_label(run.method), recons))
    n_cols = max((len(images) for _, images in rows), default=0)
    if n_cols == 0:
        return 0
    plt = _plt()
    tile = 1.35
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 + tile * n_cols, tile * len(rows) + 0.3), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], interpolation="lanczos")
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10,
                              fontweight="bold" if r == 0 and truth is not None else "normal")
            if r == 0:
                ax.set_title(f"#{c + 1}", fontsize=8, color="#555555")
    fig.suptitle(f"Subject {subject}: reconstructions", fontsize=12, x=0.02, ha="left")
    fig.subplots_adjust(wspace=0.04, hspace=0.06)
    _save_figure(fig, path)
    plt.close(fig)
    return n_cols


def _curves_figure(subject: int, runs: Sequence[ReportRun], path: Path) -> bool:
    tags = sorted({tag for run in runs for tag, points in run.curves.items() if len(points)})
    if not tags:
        return False
    plt = _plt()
    n_cols = min(3, len(tags))
    n_rows = math.ceil(len(tags) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 2.9 * n_rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, tag in enumerate(tags):
        ax = axes[k // n_cols][k % n_cols]
        for m, run in enumerate(runs):
            points = run.curves.get(tag)
            if not points:
                continue
            steps, values = zip(*[(float(s), float(v)) for s, v in points], strict=True)
            style = "-" if len(points) > 1 else "o"
            ax.plot(steps, values, style, label=run.method, color=colours[m % len(colours)], lw=1.4, ms=4)
        plotted = [float(v) for run in runs for _, v in run.curves.get(tag, [])]
        finite = [v for v in plotted if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
            ax.set_yscale("log")  # losses that fall by orders of magnitude stay readable
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    for k in range(len(tags), n_rows * n_cols):
        axes[k // n_cols][k % n_cols].set_visible(False)
    fig.suptitle(f"Subject {subject}: training curves", fontsize=12, x=0.02, ha="left")
    # Leave the top strip to the title; tight_layout would otherwise pull the first row's titles under it.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.9 * n_rows)))
    _save_figure(fig, path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f4f5f7;
color:#1d2330}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 6px}
h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #d9dde5;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.header{background:#fff;border:1px solid #d9dde5;border-radius:8px;padding:12px 16px;font-size:14px;line-height:1.5}
.header b{color:#3b4658}
figure{margin:10px 0 18px;background:#fff;border:1px solid #d9dde5;border-radius:8px;padding:10px;overflow-x:auto}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#5a6475;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13.5px;font-variant-numeric:tabular-nums}
table.analysis{display:block;max-width:100%;overflow-x:auto;font-size:12.5px}
th,td{padding:5px 9px;border-bottom:1px solid #e3e6ec;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#e9ecf2;font-weight:600}
td.name,th.name{text-align:left}
.ci{display:block;font-size:10.5px;color:#7a8394}
.unc{color:#b3541e}
tr.mean td{font-weight:600;background:#f7f9fc}
tbody.published td{background:#f3f0fa;color:#4a4060;font-style:italic}
tbody.published tr.block td{background:#ddd5ef;font-style:normal;font-weight:700;text-align:left;color:#3a2f57;
letter-spacing:.02em}
tr.block td{background:#e9ecf2;font-weight:700;text-align:left}
.legend{font-size:12.5px;color:#4a5263;margin:8px 0 0;max-width:1100px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;font-size:13px;background:#fff;
border:1px solid #d9dde5;border-radius:8px;padding:10px 14px;margin:6px 0}
dl.kv dt{font-weight:600;color:#3b4658}
dl.kv dd{margin:0;font-family:ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
.muted{color:#7a8394}
"""

_IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (img) { return !(img.complete && img.naturalWidth > 0); }).length;
  document.title = broken === 0 ? "images-ok" : "images-broken: " + broken;
});
</script>"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _scalar_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _kv(values: Mapping | None) -> str:
    if not values:
        return '<p class="muted">not given</p>'
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_scalar_text(v))}</dd>" for k, v in values.items())
    return f'<dl class="kv">{items}</dl>'


def _summary(values: Mapping | None, keys: Sequence[str]) -> str:
    if not values:
        return "not given"
    picked = [f"{k}: {_scalar_text(values[k])}" for k in keys if k in values and values[k] not in (None, "")]
    if not picked:
        picked = [f"{k}: {_scalar_text(v)}" for k, v in list(values.items())[:4]]
    return " \u00b7 ".join(picked)


def _unique(dicts: Sequence[Mapping | None]) -> list[Mapping]:
    seen, out = set(), []
    for d in dicts:
        if not d:
            continue
        key = json.dumps(d, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _metric_cells(metrics: Mapping, ci95: Mapping | None = None, uncalibrated=()) -> str:
    metrics, ci95 = _canonical_map(metrics), _canonical_map(ci95)
    unc = {canonical_metric(m) for m in uncalibrated}
    cells = []
    for spec in METRIC_TABLE:
        key = spec.key
        text = _e(spec.format(metrics.get(key)))
        if key in unc and key in metrics:
            text = f'<span class="unc" title="uncalibrated">{text}{DAGGER}</span>'
        interval = ci95.get(key)
        if interval is not None and len(interval) == 2 and all(math.isfinite(float(v)) for v in interval):
            text += f'<span class="ci">[{_e(format_interval(key, interval))}]</span>'
        cells.append(f"<td>{text}</td>")
    return "".join(cells)


def _params_text(value) -> str:
    """A parameter count as given (e.g. "0.73B"), or an integer count shown in millions."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return f"{int(value) / 1e6:.1f}M" if value >= 100_000 else str(int(value))
    return str(value or "")


def _header(clip_label: str | None) -> str:
    cells = []
    for spec in METRIC_TABLE:
        note = f'<span class="ci">{_e(clip_label)}</span>' if spec.key == "CLIP" and clip_label else ""
        cells.append(f"<th>{_e(spec.title)}{'&darr;' if spec.lower_is_better else '&uarr;'}{note}</th>")
    return "".join(cells)


def _published_rows(published: Sequence[Mapping], n_cols: int) -> str:
    prow = [f'<tr class="block"><td colspan="{n_cols}">published (paper) &mdash; numbers as reported by '
            "their authors, with their own protocols and test sets</td></tr>"]
    for row in published:
        prow.append(f'<tr><td class="name">{_e(row.get("method", ""))} <small>(published)</small></td>'
                    f'<td>{_e(row.get("subjects", ""))}</td>{_metric_cells(row.get("metrics") or {})}'
                    f'<td>{_e(_params_text(row.get("params")))}</td></tr>')
    return '<tbody class="published">' + "".join(prow) + "</tbody>"


def _paired_table(paired_tests: Mapping) -> str:
    """Paired Wilcoxon tests between methods, folded: one row per subject, pair and metric."""
    rows = [(subject, t) for subject, tests in sorted(paired_tests.items()) for t in tests]
    if not rows:
        return ""
    body = "".join(
        f'<tr><td>{_e(subject[4:].lstrip("0"))}</td><td class="name">{_e(_method_label(t["a"]))}</td>'
        f'<td class="name">{_e(_method_label(t["b"]))}</td><td>{_e(t["metric"])}</td><td>{_e(t.get("n_images", ""))}</td>'
        f'<td>{float(t["median_difference"]):+.4f}</td><td>{float(t["p_value"]):.2g}</td></tr>' for subject, t in rows)
    return ('<details id="paired"><summary>Paired tests between methods (Wilcoxon signed-rank over the images both '
            'hold)</summary><table><thead><tr><th>subject</th><th class="name">a</th><th class="name">b</th>'
            '<th>metric</th><th>images</th><th>median a &minus; b</th><th>p</th></tr></thead>'
            f"<tbody>{body}</tbody></table></details>")


def _metric_table(runs: Sequence[ReportRun], published: Sequence[Mapping], clip_label: str | None = None
                  ) -> tuple[str, bool]:
    """Our rows (and mean rows); published rows below them, or, when our CLIP metric used another network
    (``clip_label``), in a table of their own so that no number of ours sits in a published CLIP column."""
    n_cols = len(METRIC_TABLE) + 3
    rows = [f'<tr class="block"><td colspan="{n_cols}">ours</td></tr>']
    any_unc = False
    most = {s: max(int(r.evaluation.n_images) for r in runs if r.subject == s) for s in {r.subject for r in runs}}
    for run in sorted(runs, key=lambda r: (r.subject, r.method)):
        e = run.evaluation
        any_unc |= bool({canonical_metric(u) for u in e.uncalibrated} & set(_canonical_map(e.metrics)))
        # A run made on part of the test set says so: its means are over fewer (and other) images.
        part = (f'<span class="ci">first {int(e.n_images)} of the test images</span>'
                if 0 < int(e.n_images) < most[run.subject] else "")
        rows.append(f'<tr><td class="name">{_e(_method_label(run.method))}{part}</td><td>{_e(run.subject)}</td>'
                    f'{_metric_cells(e.metrics, e.ci95, e.uncalibrated)}'
                    f'<td>{_e(_params_text(e.parameters))}</td></tr>')
    subjects = sorted({r.subject for r in runs})
    if len(subjects) > 1:
        for method in sorted({r.method for r in runs}):
            members = [r for r in runs if r.method == method]
            maps = [_canonical_map(r.evaluation.metrics) for r in members]
            mean = {s.key: float(np.mean([m[s.key] for m in maps])) for s in METRIC_TABLE
                    if all(s.key in m for m in maps)}
            unc = {canonical_metric(u) for r in members for u in r.evaluation.uncalibrated}
            who = ",".join(str(r.subject) for r in sorted(members, key=lambda r: r.subject))
            rows.append(f'<tr class="mean"><td class="name">{_e(_method_label(method))} (mean)</td><td>{_e(who)}</td>'
                        f'{_metric_cells(mean, None, unc)}<td></td></tr>')
    body = "<tbody>" + "".join(rows) + "</tbody>"
    head = '<thead><tr><th class="name">method</th><th>subject</th>{}<th>params</th></tr></thead>'
    table = f'<table id="metrics">{head.format(_header(clip_label))}{body}'
    if published and not clip_label:
        table += _published_rows(published, n_cols)
    table += "</table>"
    if published and clip_label:
        table += (f'<h3>Published (real NSD, real CLIP ViT-L/14)</h3><table id="published">'
                  f'{head.format(_header(None))}{_published_rows(published, n_cols)}</table>')
    return table, any_unc


_RETRIEVAL_LABELS = {"image": ("image", "decoded image embedding"), "text": ("text", "decoded text embedding")}


def _top1_cell(summary: Mapping | None) -> str:
    if not summary or not math.isfinite(float(summary.get("mean", float("nan")))):
        return "<td>\u2013</td>"
    text = f"{100 * float(summary['mean']):.1f}%"
    low, high = summary.get("ci95_low"), summary.get("ci95_high")
    if low is not None and high is not None and math.isfinite(float(low)) and math.isfinite(float(high)):
        text += f'<span class="ci">[{100 * float(low):.1f}\u2013{100 * float(high):.1f}]</span>'
    return f"<td>{text}</td>"


def _retrieval_table(runs: Sequence[ReportRun]) -> str:
    """Top-1 n-way accuracy in both directions (with the interval) and Recall@K, per decoded embedding."""
    rows = []
    ks: list[int] = []
    for run in sorted(runs, key=lambda r: (r.subject, r.method)):
        for kind, report in run.evaluation.retrieval.items():
            rows.append((run, kind, report))
            ks = ks or list(report.get("recall_at_k", {}).get("ks", []))
    if not rows:
        return ""
    recall_title = "/".join(f"R@{k}" for k in ks)
    head = ('<th class="name">method</th><th>subject</th><th class="name">embedding</th><th>n-way</th>'
            "<th>image retrieval top-1<span class=\"ci\">brain &rarr; image</span></th>"
            "<th>brain retrieval top-1<span class=\"ci\">image &rarr; brain</span></th>"
            f"<th>{recall_title} (%)<span class=\"ci\">brain &rarr; image</span></th>"
            f"<th>{recall_title} (%)<span class=\"ci\">image &rarr; brain</span></th>")
    body = []
    whole = False
    for run, kind, report in rows:
        top1 = report.get("top1_n_way", {})
        recall = report.get("recall_at_k", {})
        whole |= top1.get("n_way") == top1.get("n_items")
        cells = [_top1_cell(top1.get("image_retrieval")), _top1_cell(top1.get("brain_retrieval"))]
        for direction in ("image_retrieval", "brain_retrieval"):
            values = recall.get(direction, {})
            cells.append("<td>" + " / ".join(f"{100 * float(values[f'recall@{k}']):.1f}" if f"recall@{k}" in values
                                             else "\u2013" for k in ks) + "</td>")
        body.append(f'<tr><td class="name">{_e(_method_label(run.method))}</td><td>{_e(run.subject)}</td>'
                    f'<td class="name">{_e(_RETRIEVAL_LABELS.get(kind, (kind,))[0])}</td>'
                    f"<td>{_e(top1.get('n_way', ''))}</td>" + "".join(cells) + "</tr>")
    n_items = rows[0][2].get("n_items", "")
    whole_note = (" Where n-way equals the number of test items every subset is the whole test set, so the interval "
                  "has no width." if whole else "")
    return (f'<h2 id="retrieval">Retrieval</h2><table id="retrieval-table"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table>"
            '<p class="legend"><b>Image retrieval</b> (brain &rarr; image): each decoded embedding ranks the candidate '
            "CLIP embeddings of the test images; <b>brain retrieval</b> (image &rarr; brain): each image's embedding "
            "ranks the decoded embeddings. MindEye1's code names these two directions the other way round (its "
            "similarity matrix is transposed). Top-1: accuracy among n-way random test items (chance 1/n), "
            f"30 random subsets; bracketed: {_e(INTERVAL)} (MindEye's scripts use sd with ddof=0, an interval 1.7% "
            f"narrower).{whole_note} R@K: Recall@K among all {_e(n_items)} test items (BrainCLIP's measure), in "
            "percent. The text row scores the decoded text embedding against the captions' CLIP text embeddings.</p>")


def _scene_table(runs: Sequence[ReportRun]) -> str:
    rows = [r for r in sorted(runs, key=lambda r: (r.subject, r.method)) if r.evaluation.scene_checks]
    if not rows:
        return ""
    body = []
    for r in rows:
        c = r.evaluation.scene_checks
        interval = c.get("ci95")
        ci = (f'<span class="ci">[{100 * interval[0]:.1f}\u2013{100 * interval[1]:.1f}]</span>'
              if interval is not None and len(interval) == 2 else "")
        body.append(f'<tr><td class="name">{_e(_method_label(r.method))}</td><td>{_e(r.subject)}</td>'
                    f'<td>{100 * float(c["category_agreement"]):.1f}%{ci}</td>'
                    f'<td>{100 * float(c["truth_zero_shot"]):.1f}%</td></tr>')
    clip = _e(rows[0].evaluation.scene_checks.get("clip", ""))
    return ('<h2 id="scene-checks">Category agreement with the scenes</h2><table><thead><tr><th class="name">method'
            '</th><th>subject</th><th>reconstructions</th><th>true images</th></tr></thead><tbody>'
            + "".join(body) + "</tbody></table>"
            f'<p class="legend">Simulated data only: the share of images whose zero-shot category ({clip}, prompt '
            "ensembles over the scene world's categories) names one of the largest objects of the scene the subject "
            "saw. &ldquo;True images&rdquo; is the same classifier on the stimuli: the most a reconstruction can "
            "reach with this classifier. Chance is about 12%.</p>")


def _analysis_table(rows: Sequence[Mapping]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_scalar_text(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f'<table class="analysis"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _analyses_html(analyses: Sequence[Mapping]) -> list[str]:
    if not analyses:
        return []
    parts = ['<h2 id="analyses">Analyses</h2>']
    for a in analyses:
        parts.append(f'<h3 id="analysis-{_e(a["analysis"])}">{_e(a["title"])}</h3>')
        if a.get("figure_src"):
            parts.append(f'<figure><img src="{_e(a["figure_src"])}" alt="{_e(a["title"])}">'
                         f"<figcaption>{_e(a.get('caption', ''))}</figcaption></figure>")
        else:
            parts.append(f'<p class="legend">{_e(a.get("caption", ""))}</p>')
        parts.append(_analysis_table(a.get("table") or []))
    return parts


def _render_html(title: str, runs: Sequence[ReportRun], published: Sequence[Mapping], figures: Mapping,
                 debug_image_check: bool, clip_label: str | None = None, notes: Sequence[str] = (),
                 analyses: Sequence[Mapping] = (), paired_tests: Mapping | None = None) -> str:
    protocols = _unique([r.protocol for r in runs])
    datas = _unique([r.data for r in runs])
    subjects = sorted({r.subject for r in runs})
    methods = sorted({r.method for r in runs})
    protocol_line = "; ".join(_e(_summary(p, ("name", "image_size", "clip_model"))) for p in protocols) or "not given"
    data_line = "; ".join(_e(_summary(d, ("test_set", "n_images", "preset", "dataset"))) for d in datas) or "not given"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style>",
        _IMAGE_CHECK_SCRIPT if debug_image_check else "",
        "</head><body><main>",
        f"<h1>{_e(title)}</h1>",
    ]
    if not runs:  # a report of analyses only (e.g. embedding retrieval, zero-shot tables): no reconstructions
        parts += [f'<p class="legend">{_e(note)}</p>' for note in notes]
        parts += _analyses_html(analyses)
        parts.append("</main></body></html>\n")
        return "\n".join(p for p in parts if p)
    parts.append('<div class="header">'
                 f"<div><b>Subjects:</b> {_e(', '.join(map(str, subjects)))} &nbsp; <b>Methods:</b> "
                 f"{_e(', '.join(methods))}</div>"
                 f"<div><b>Protocol:</b> {protocol_line}</div><div><b>Data:</b> {data_line}</div></div>")
    parts += [f'<p class="legend">{_e(note)}</p>' for note in notes]
    table, any_unc = _metric_table(runs, published, clip_label)
    parts += ['<h2 id="metrics-h">Metrics</h2>', table,
              '<p class="legend">&uarr; higher is better, &darr; lower is better. Alex(2), Alex(5), Incep and CLIP are '
              "two-way identification accuracies (percent); PixCorr and SSIM are similarities; Eff and SwAV are "
              "distances. Small bracketed numbers under our values are 95% bootstrap intervals over test images.</p>"]
    if any_unc:
        parts.append(f'<p class="legend" id="dagger-legend"><span class="unc">{DAGGER}</span> uncalibrated: computed '
                     "with a randomly initialised metric network (its weights were not available), so the number "
                     "only compares our own rows and is not comparable with published values.</p>")
    if published:
        parts.append('<p class="legend">Rows in the shaded <i>published (paper)</i> block are copied from the '
                     "papers, not produced by this code; they are for orientation, not a like-for-like comparison."
                     "</p>")
    parts.append(_paired_table(paired_tests or {}))
    parts.append(_retrieval_table(runs))
    parts.append(_scene_table(runs))
    for subject in subjects:
        fig = figures.get(subject, {})
        if not fig:
            continue
        parts.append(f'<h2 id="subject-{subject}">Subject {subject}</h2>')
        if "grid" in fig:
            parts.append(f'<figure><img src="{_e(fig["grid"])}" alt="subject {subject} reconstructions">'
                         f"<figcaption>Top row: ground truth test images; below: each method's reconstructions of "
                         f"the same images (first {fig['n_images']}).</figcaption></figure>")
        if "curves" in fig:
            parts.append(f'<figure><img src="{_e(fig["curves"])}" alt="subject {subject} training curves">'
                         "<figcaption>Training and validation curves (TensorBoard scalars).</figcaption></figure>")
    parts += _analyses_html(analyses)
    parts.append('<h2 id="details">Protocol and data</h2>')
    for k, p in enumerate(protocols):
        parts.append(f"<h3>Protocol{f' {k + 1}' if len(protocols) > 1 else ''}</h3>{_kv(p)}")
    if not protocols:
        parts.append(f"<h3>Protocol</h3>{_kv(None)}")
    for k, d in enumerate(datas):
        parts.append(f"<h3>Data{f' {k + 1}' if len(datas) > 1 else ''}</h3>{_kv(d)}")
    if not datas:
        parts.append(f"<h3>Data</h3>{_kv(None)}")
    parts.append("</main></body></html>\n")
    return "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- entry point


def _validate(runs: Sequence[ReportRun], analyses: Sequence[Mapping] = ()) -> None:
    if not runs and not analyses:
        raise InvalidInputError("write_report: no runs and no analyses given; nothing to show")
    seen = set()
    for k, run in enumerate(runs):
        if not isinstance(run, ReportRun):
            raise InvalidInputError(f"write_report: run {k} is a {type(run).__name__}; expected a ReportRun")
        key = (run.subject, run.method)
        if key in seen:
            raise InvalidInputError(f"write_report: subject {key[0]} method {key[1]!r} given twice")
        seen.add(key)


#: Written into every report folder: says the folder is a report this code wrote, and which files it holds.
REPORT_MARKER = ".brainmclip-report.json"
REPORT_FORMAT = "brainmclip-report/1"
#: Files an operating system's file browser drops into folders it shows; they never make a report "not ours".
_OS_METADATA = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _report_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def check_report_out(out_dir) -> None:
    """Refuse an ``out_dir`` that a report may not replace; return quietly if it is free or a report of ours.

    Free: absent, or an empty folder. Replaceable: a folder holding :data:`REPORT_MARKER` (written by
    :func:`write_report`) and no files besides the ones that marker lists. Anything else (a file, a link,
    an evaluation folder, a report someone added files to) raises :class:`OutputInTheWayError`; nothing is
    moved or deleted.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputInTheWayError(f"--out {out_dir}: exists and is not a folder; a report is a folder "
                                  "(index.html + figures/); choose another --out")
    if not out_dir.exists() or not output_entries(out_dir):
        return
    marker = out_dir / REPORT_MARKER
    try:
        recorded = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("format") != REPORT_FORMAT:
        raise OutputInTheWayError(f"--out {out_dir}: a folder that is not a report written by brainmclip report "
                                  f"(no {REPORT_MARKER}); it is left as it is: choose a new or empty folder")
    ours = {REPORT_MARKER, LOCK_FILE, *recorded.get("files", [])}
    foreign = [f for f in _report_files(out_dir) if f not in ours and Path(f).name not in _OS_METADATA]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputInTheWayError(f"--out {out_dir}: this report folder also holds files brainmclip report did not "
                                  f"write ({shown}); move them or choose another --out")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; a previous report of ours is swapped out, then removed.

    ``final`` is checked again here (it may have changed while the report was built): only an absent or
    empty folder, or a report this code wrote, is replaced.
    """
    check_report_out(final)
    lock = final / LOCK_FILE
    moved_lock = lock.exists()
    if moved_lock:
        # The output lock held on ``final`` moves into the new folder (a rename keeps the locked file).
        os.replace(lock, tmp / LOCK_FILE)
    try:
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()  # an empty folder: renaming onto it is not portable
        if not final.exists():
            os.replace(tmp, final)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old)  # onto the fresh empty folder: POSIX rename replaces an empty directory
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
    except BaseException:
        if moved_lock and (tmp / LOCK_FILE).exists():
            final.mkdir(exist_ok=True)
            os.replace(tmp / LOCK_FILE, lock)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_report(out_dir, runs: Sequence[ReportRun], title: str = "BrainMCLIP reconstruction report",
                 published: Sequence[Mapping] | None = None, debug_image_check: bool = False,
                 clip_label: str | None = None, notes: Sequence[str] = (), analyses: Sequence[Mapping] = (),
                 paired_tests: Mapping | None = None) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/figures/*.png``; return the path of index.html.

    ``analyses`` are summaries of analysis folders (:func:`brainmclip.analysis.common.find_analyses`);
    each gets a section with its figure, caption and table after the per-subject figures.

    ``clip_label`` names the network behind our CLIP column when it is not CLIP ViT-L/14 (e.g. "mini-CLIP");
    published rows then get a table of their own. ``notes`` are sentences shown under the header.
    ``paired_tests``: ``{"subjNN": [{"metric", "a", "b", "median_difference", "p_value", "n_images"}, ...]}`` as
    ``brainmclip evaluate`` writes them; shown in a table below the metrics.

    ``debug_image_check`` adds a tiny script that sets ``document.title`` to ``"images-ok"`` once
    every image has loaded (or ``"images-broken: N"``); for tests only, the default page has no script.
    """
    _validate(runs, analyses)
    published = list(published or [])
    out_dir = Path(out_dir).absolute()
    check_report_out(out_dir)  # before any work: a folder that is not ours is never touched
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "figures").mkdir()
        figures: dict[int, dict] = {}
        for subject in sorted({r.subject for r in runs}):
            members = sorted([r for r in runs if r.subject == subject], key=lambda r: r.method)
            entry: dict = {}
            n = _grid_figure(subject, members, tmp / "figures" / f"subj{subject:02d}_grid.png")
            if n:
                entry.update(grid=f"figures/subj{subject:02d}_grid.png", n_images=n)
            if _curves_figure(subject, members, tmp / "figures" / f"subj{subject:02d}_curves.png"):
                entry["curves"] = f"figures/subj{subject:02d}_curves.png"
            figures[subject] = entry
        shown = []
        for k, a in enumerate(analyses):
            a = dict(a)
            source = Path(a["folder"]) / a.get("figure", "figure.png")
            if source.is_file():
                a["figure_src"] = f"figures/analysis_{k:02d}_{a['analysis']}.png"
                shutil.copyfile(source, tmp / a["figure_src"])
            shown.append(a)
        page = _render_html(title, runs, published, figures, debug_image_check, clip_label, notes, shown,
                            paired_tests or {})
        (tmp / "index.html").write_text(page, encoding="utf-8")
        marker = {"format": REPORT_FORMAT, "title": title, "files": _report_files(tmp), "code_version": __version__}
        (tmp / REPORT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"
