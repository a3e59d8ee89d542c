"""``brainmclip sweep``: train one BrainMCLIP per point of a config grid and compare them on validation.

Only the validation split is used (the score early stopping uses: 2-way identification of the
model's outputs against their own targets), so choosing defaults from a sweep does not peek at
the test set. Writes ``sweep.csv``, a figure and an analysis manifest the report shows.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

from brainmclip.atomic import locks_output, write_bytes_atomic
from brainmclip.errors import InvalidInputError
from brainmclip.studies.rows import Row, row_folder, train_row

__all__ = ["parse_grid", "grid_rows", "run_sweep"]


def parse_grid(items) -> list[tuple[str, list]]:
    """``["loss.image.mse=1,10,100"]`` -> ``[("loss.image.mse", [1, 10, 100])]``; values parse as JSON, else strings."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise InvalidInputError(f"--grid {item!r}: expected key.path=value1,value2,...")
        parsed = []
        for raw in values.split(","):
            try:
                parsed.append(json.loads(raw))
            except json.JSONDecodeError:
                parsed.append(raw)
        grid.append((key, parsed))
    if not grid:
        raise InvalidInputError("a sweep needs at least one --grid key=values")
    return grid


def _short(key: str) -> str:
    return key.removeprefix("loss.").removeprefix("train.").removeprefix("model.")


def grid_rows(grid: list[tuple[str, list]]) -> list[Row]:
    """One row per point of the cartesian product, named by its values."""
    rows = []
    for values in itertools.product(*[v for _, v in grid]):
        pairs = [(key, value) for (key, _), value in zip(grid, values, strict=True)]
        name = " ".join(f"{_short(k)}={json.dumps(v)}" for k, v in pairs)
        rows.append(Row(name=name.replace(" ", "_").replace('"', ""), label=name,
                        overrides=tuple(f"{k}={json.dumps(v)}" for k, v in pairs)))
    return rows


@locks_output()
def run_sweep(data, features, out, grid: list[tuple[str, list]], base_configs=("brain_mclip_tiny",), overrides=(),
              progress: bool = True) -> list[dict]:
    """Train every grid point (resumable row by row) and write the comparison; return one dict per row."""
    from brainmclip.analysis.common import write_analysis

    out = Path(out)
    results = []
    for row in grid_rows(grid):
        summary = train_row(row, data, features, row_folder(out, row), base_configs, overrides, progress)
        val = summary["val"]
        shares = summary["gradient_shares"]
        results.append({
            "row": row.label, "val_score": summary["val_score"],
            "image_two_way": val.get("image_two_way"), "text_two_way": val.get("text_two_way"),
            "image_top1": val.get("image_top1"), "text_top1": val.get("text_top1"),
            "best_epoch": summary["best_epoch"], "val_loss": summary["val_loss"],
            "mse_share": sum(v for k, v in shares.items() if k.endswith("mse")),
            "cka_share": sum(v for k, v in shares.items() if k.endswith("/cka")),
            "sims_share": sum(v for k, v in shares.items() if k.endswith("/sims"))})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results[0]))
    writer.writeheader()
    writer.writerows(results)
    write_bytes_atomic(out / "sweep.csv", buffer.getvalue().encode())
    _figure(results, out / "figure.png")
    best = max(results, key=lambda r: r["val_score"])
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results]
    write_analysis(out, "sweep", "Loss-weight sweep (validation split)",
                   f"One BrainMCLIP per setting, trained until validation stopped improving; the score is validation "
                   f"2-way identification of the model's outputs against their own CLIP targets (chance 0.5). "
                   f"Shares are each loss family's share of the gradient norm on the output heads after the first "
                   f"epoch. Best: {best['row']} ({best['val_score']:.4f}).",
                   table=table, settings={"grid": grid, "base_configs": list(base_configs),
                                          "overrides": list(overrides), "data": str(data), "features": str(features)})
    return results


def _figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainmclip.analysis.common import save_figure

    labels = [r["row"] for r in results]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(results) + 2), 3.6))
    x = range(len(results))
    for key, offset, colour in (("image_two_way", -0.2, "tab:blue"), ("text_two_way", 0.2, "tab:orange")):
        values = [r[key] if r[key] is not None else float("nan") for r in results]
        ax.bar([i + offset for i in x], values, width=0.4, label=key.replace("_", " "), color=colour)
    lows = [min(v for v in (r["image_two_way"], r["text_two_way"]) if v is not None) for r in results]
    ax.set_ylim(max(0.5, min(lows) - 0.02), 1.0)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("validation 2-way identification")
    ax.legend(fontsize=8)
    ax.set_title("Sweep: validation 2-way identification per setting")
    save_figure(fig, path)
