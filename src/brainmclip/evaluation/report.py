"""A static HTML report: reconstructions beside ground truth, the metric table, curves.

:func:`write_report` takes a plain Python structure (so the page does not depend on how the
evaluation computed anything) and writes a self-contained folder::

    out_dir/index.html          inline CSS, no scripts, no external fonts, relative links only
    out_dir/figures/*.png       per-subject reconstruction grids and training curves

The folder is built in a hidden sibling directory and renamed into place, so a reader sees the
old report or the new one, never half of one.

``runs`` is a list of dicts, one per (subject, method)::

    {"subject": 1, "method": "brainmclip",
     "metrics": {"PixCorr": 0.21, "AlexNet(2)": 0.91, ...},   # identification metrics as fractions
     "ci95": {"PixCorr": [0.19, 0.23], ...},                   # optional
     "uncalibrated": ["InceptionV3"],                          # optional; marked with a dagger
     "retrieval": {"image_top1": 0.9, "brain_top1": 0.8, "n_way": 300},   # optional
     "recon_paths": [...png...], "truth_paths": [...png...] or "truth_images": uint8 (n, H, W, 3),
     "curves": {"train/total": [(step, value), ...]},          # optional
     "protocol": {...}, "data": {...}}

``published`` rows ``{"method", "metrics", "params"}`` are shown in their own block, marked
"published (paper)". Metric keys may be the evaluation's names (``AlexNet(2)``, ``InceptionV3``,
``EffNet-B``) or the paper's column titles (``Alex(2)``, ``Incep``, ``Eff``).
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
from pathlib import Path

import numpy as np

__all__ = ["COLUMNS", "write_report", "read_tensorboard_scalars", "format_metric"]

log = logging.getLogger(__name__)

# (canonical key, column title, lower is better, identification metric shown as a percentage)
COLUMNS = (
    ("PixCorr", "PixCorr", False, False),
    ("SSIM", "SSIM", False, False),
    ("AlexNet(2)", "Alex(2)", False, True),
    ("AlexNet(5)", "Alex(5)", False, True),
    ("InceptionV3", "Incep", False, True),
    ("CLIP", "CLIP", False, True),
    ("EffNet-B", "Eff", True, False),
    ("SwAV", "SwAV", True, False),
)
_ALIASES = {
    "pixcorr": "PixCorr", "ssim": "SSIM",
    "alexnet(2)": "AlexNet(2)", "alex(2)": "AlexNet(2)", "alexnet2": "AlexNet(2)", "alex2": "AlexNet(2)",
    "alexnet(5)": "AlexNet(5)", "alex(5)": "AlexNet(5)", "alexnet5": "AlexNet(5)", "alex5": "AlexNet(5)",
    "inceptionv3": "InceptionV3", "incep": "InceptionV3", "inception": "InceptionV3",
    "clip": "CLIP", "effnet-b": "EffNet-B", "eff": "EffNet-B", "effnet": "EffNet-B", "swav": "SwAV",
}
_PERCENT = {key for key, _, _, pct in COLUMNS if pct}
DAGGER = "\u2020"
MAX_GRID_IMAGES = 10


#: How methods are named on the page (others appear as they are called in the runs).
METHOD_LABELS = {"brain_mclip": "BrainMCLIP", "gt_embedding": "GT embedding (upper bound)"}


def _method_label(method) -> str:
    return METHOD_LABELS.get(str(method), str(method))


def _canonical(name: str) -> str:
    return _ALIASES.get(str(name).strip().lower(), str(name))


def _canonical_map(values: Mapping | None) -> dict:
    return {_canonical(k): v for k, v in (values or {}).items()}


def format_metric(key: str, value) -> str:
    """The paper's formatting: identification as a percentage with 1 decimal, the rest with 3 decimals."""
    if value is None:
        return "\u2013"
    value = float(value)
    if not math.isfinite(value):
        return "\u2013"
    return f"{100 * value:.1f}%" if _canonical(key) in _PERCENT else f"{value:.3f}"


def _format_interval(key: str, interval) -> str:
    low, high = (float(v) for v in interval)
    if _canonical(key) in _PERCENT:
        return f"{100 * low:.1f}\u2013{100 * high:.1f}"
    return f"{low:.3f}\u2013{high:.3f}"


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
        raise FileNotFoundError(f"report: image {path} does not exist")
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


def _truth_of(run: Mapping) -> list[np.ndarray] | None:
    if run.get("truth_paths"):
        return [_load_rgb(p) for p in run["truth_paths"][:MAX_GRID_IMAGES]]
    if run.get("truth_images") is not None:
        images = run["truth_images"]
        return [_as_rgb_array(images[i]) for i in range(min(len(images), MAX_GRID_IMAGES))]
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", facecolor="white")


def _grid_figure(subject: int, runs: Sequence[Mapping], path: Path) -> int:
    """Ground truth in the first row, one row per method below; returns the number of columns drawn."""
    truth = next((t for t in (_truth_of(r) for r in runs) if t is not None), None)
    rows: list[tuple[str, list[np.ndarray]]] = []
    if truth is not None:
        rows.append(("ground truth", truth))
    for run in runs:
        recons = [_load_rgb(p) for p in (run.get("recon_paths") or [])[:MAX_GRID_IMAGES]]
        rows.append((_method_label(run["method"]), recons))
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


def _curves_figure(subject: int, runs: Sequence[Mapping], path: Path) -> bool:
    tags = sorted({tag for run in runs for tag, points in (run.get("curves") or {}).items() if len(points)})
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
            points = (run.get("curves") or {}).get(tag)
            if not points:
                continue
            steps, values = zip(*[(float(s), float(v)) for s, v in points], strict=True)
            style = "-" if len(points) > 1 else "o"
            ax.plot(steps, values, style, label=str(run["method"]), color=colours[m % len(colours)], lw=1.4, ms=4)
        plotted = [float(v) for run in runs for _, v in (run.get("curves") or {}).get(tag, [])]
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
    unc = {_canonical(m) for m in uncalibrated}
    cells = []
    for key, _, _, _ in COLUMNS:
        text = _e(format_metric(key, metrics.get(key)))
        if key in unc and key in metrics:
            text = f'<span class="unc" title="uncalibrated">{text}{DAGGER}</span>'
        interval = ci95.get(key)
        if interval is not None and len(interval) == 2 and all(math.isfinite(float(v)) for v in interval):
            text += f'<span class="ci">[{_e(_format_interval(key, interval))}]</span>'
        cells.append(f"<td>{text}</td>")
    return "".join(cells)


def _params_text(run: Mapping) -> str:
    """``params`` as given (e.g. "0.73B"), or an integer ``parameters`` count shown in millions."""
    value = run.get("params") or run.get("parameters")
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return f"{int(value) / 1e6:.1f}M" if value >= 100_000 else str(int(value))
    return str(value or "")


def _header(clip_label: str | None) -> str:
    cells = []
    for key, title, lower, _ in COLUMNS:
        note = f'<span class="ci">{_e(clip_label)}</span>' if key == "CLIP" and clip_label else ""
        cells.append(f"<th>{_e(title)}{'&darr;' if lower else '&uarr;'}{note}</th>")
    return "".join(cells)


def _published_rows(published: Sequence[Mapping], n_cols: int) -> str:
    prow = [f'<tr class="block"><td colspan="{n_cols}">published (paper) &mdash; numbers as reported by '
            "their authors, with their own protocols and test sets</td></tr>"]
    for row in published:
        prow.append(f'<tr><td class="name">{_e(row.get("method", ""))} <small>(published)</small></td>'
                    f'<td>{_e(row.get("subjects", ""))}</td>{_metric_cells(row.get("metrics") or {})}'
                    f'<td>{_e(row.get("params") or "")}</td></tr>')
    return '<tbody class="published">' + "".join(prow) + "</tbody>"


def _metric_table(runs: Sequence[Mapping], published: Sequence[Mapping], clip_label: str | None = None
                  ) -> tuple[str, bool]:
    """Our rows (and mean rows); published rows below them, or, when our CLIP metric used another network
    (``clip_label``), in a table of their own so that no number of ours sits in a published CLIP column."""
    n_cols = len(COLUMNS) + 3
    rows = [f'<tr class="block"><td colspan="{n_cols}">ours</td></tr>']
    any_unc = False
    for run in sorted(runs, key=lambda r: (int(r["subject"]), str(r["method"]))):
        unc = list(run.get("uncalibrated") or [])
        any_unc |= bool({_canonical(u) for u in unc} & {_canonical(m) for m in (run.get("metrics") or {})})
        rows.append(f'<tr><td class="name">{_e(_method_label(run["method"]))}</td><td>{_e(run["subject"])}</td>'
                    f'{_metric_cells(run.get("metrics") or {}, run.get("ci95"), unc)}'
                    f'<td>{_e(_params_text(run))}</td></tr>')
    subjects = sorted({int(r["subject"]) for r in runs})
    if len(subjects) > 1:
        for method in sorted({str(r["method"]) for r in runs}):
            members = [r for r in runs if str(r["method"]) == method]
            maps = [_canonical_map(r.get("metrics")) for r in members]
            mean = {k: float(np.mean([m[k] for m in maps])) for k, *_ in COLUMNS if all(k in m for m in maps)}
            unc = {_canonical(u) for r in members for u in (r.get("uncalibrated") or [])}
            who = ",".join(str(int(r["subject"])) for r in sorted(members, key=lambda r: int(r["subject"])))
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


def _flatten_numbers(values: Mapping, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for k, v in values.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten_numbers(v, name + " / ")
        elif isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool):
            out.append((name, v))
    return out


def _retrieval_table(runs: Sequence[Mapping]) -> str:
    rows = [r for r in sorted(runs, key=lambda r: (int(r["subject"]), str(r["method"]))) if r.get("retrieval")]
    if not rows:
        return ""
    flat = [dict(_flatten_numbers(r["retrieval"])) for r in rows]
    preferred = ["image_top1", "brain_top1", "n_way"]
    keys = [k for k in preferred if any(k in f for f in flat)]
    keys += sorted({k for f in flat for k in f} - set(keys))

    def cell(key, value):
        if value is None:
            return "<td>\u2013</td>"
        if isinstance(value, int | np.integer) or key.endswith("n_way") or key.endswith("n_repeats"):
            return f"<td>{int(value)}</td>"
        value = float(value)
        return f"<td>{100 * value:.1f}%</td>" if 0.0 <= value <= 1.0 else f"<td>{value:.3f}</td>"

    titles = {"image_top1": "image retrieval top-1", "brain_top1": "brain retrieval top-1", "n_way": "n-way"}
    head = "".join(f"<th>{_e(titles.get(k, k))}</th>" for k in keys)
    body = "".join(f'<tr><td class="name">{_e(_method_label(r["method"]))}</td><td>{_e(r["subject"])}</td>'
                   + "".join(cell(k, f.get(k)) for k in keys) + "</tr>" for r, f in zip(rows, flat, strict=True))
    return (f'<h2 id="retrieval">Retrieval</h2><table><thead><tr><th class="name">method</th><th>subject</th>{head}'
            f"</tr></thead><tbody>{body}</tbody></table>"
            '<p class="legend">Top-1 accuracy among n-way random test items (chance = 1/n). Image retrieval: a brain '
            "embedding searches the images; brain retrieval: an image searches the brain embeddings.</p>")


def _scene_table(runs: Sequence[Mapping]) -> str:
    rows = [r for r in sorted(runs, key=lambda r: (int(r["subject"]), str(r["method"]))) if r.get("scene_checks")]
    if not rows:
        return ""
    body = []
    for r in rows:
        c = r["scene_checks"]
        interval = c.get("ci95")
        ci = (f'<span class="ci">[{100 * interval[0]:.1f}\u2013{100 * interval[1]:.1f}]</span>'
              if interval is not None and len(interval) == 2 else "")
        body.append(f'<tr><td class="name">{_e(_method_label(r["method"]))}</td><td>{_e(r["subject"])}</td>'
                    f'<td>{100 * float(c["category_agreement"]):.1f}%{ci}</td>'
                    f'<td>{100 * float(c["truth_zero_shot"]):.1f}%</td></tr>')
    clip = _e(rows[0]["scene_checks"].get("clip", ""))
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


def _render_html(title: str, runs: Sequence[Mapping], published: Sequence[Mapping], figures: Mapping,
                 debug_image_check: bool, clip_label: str | None = None, notes: Sequence[str] = (),
                 analyses: Sequence[Mapping] = ()) -> str:
    protocols = _unique([r.get("protocol") for r in runs])
    datas = _unique([r.get("data") for r in runs])
    subjects = sorted({int(r["subject"]) for r in runs})
    methods = sorted({str(r["method"]) for r in runs})
    protocol_line = "; ".join(_e(_summary(p, ("name", "image_size", "clip_model"))) for p in protocols) or "not given"
    data_line = "; ".join(_e(_summary(d, ("test_set", "n_images", "preset", "dataset"))) for d in datas) or "not given"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style>",
        _IMAGE_CHECK_SCRIPT if debug_image_check else "",
        "</head><body><main>",
        f"<h1>{_e(title)}</h1>",
        '<div class="header">'
        f"<div><b>Subjects:</b> {_e(', '.join(map(str, subjects)))} &nbsp; <b>Methods:</b> {_e(', '.join(methods))}</div>"
        f"<div><b>Protocol:</b> {protocol_line}</div><div><b>Data:</b> {data_line}</div></div>",
    ]
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


def _validate(runs: Sequence[Mapping]) -> None:
    if not runs:
        raise ValueError("write_report: no runs given")
    seen = set()
    for k, run in enumerate(runs):
        for field in ("subject", "method"):
            if field not in run:
                raise ValueError(f"write_report: run {k} lacks {field!r}")
        key = (int(run["subject"]), str(run["method"]))
        if key in seen:
            raise ValueError(f"write_report: subject {key[0]} method {key[1]!r} given twice")
        seen.add(key)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; an existing report is swapped out, then removed."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_report(out_dir, runs: Sequence[Mapping], title: str = "BrainMCLIP reconstruction report",
                 published: Sequence[Mapping] | None = None, debug_image_check: bool = False,
                 clip_label: str | None = None, notes: Sequence[str] = (), analyses: Sequence[Mapping] = ()) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/figures/*.png``; return the path of index.html.

    ``analyses`` are summaries of analysis folders (:func:`brainmclip.analysis.common.find_analyses`);
    each gets a section with its figure, caption and table after the per-subject figures.

    ``clip_label`` names the network behind our CLIP column when it is not CLIP ViT-L/14 (e.g. "mini-CLIP");
    published rows then get a table of their own. ``notes`` are sentences shown under the header.

    ``debug_image_check`` adds a tiny script that sets ``document.title`` to ``"images-ok"`` once
    every image has loaded (or ``"images-broken: N"``); for tests only, the default page has no script.
    """
    _validate(runs)
    published = list(published or [])
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "figures").mkdir()
        figures: dict[int, dict] = {}
        for subject in sorted({int(r["subject"]) for r in runs}):
            members = sorted([r for r in runs if int(r["subject"]) == subject], key=lambda r: str(r["method"]))
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
        page = _render_html(title, runs, published, figures, debug_image_check, clip_label, notes, shown)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"
