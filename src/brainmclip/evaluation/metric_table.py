"""The eight image-reconstruction metrics as one table: name, column title, kind, how a value is shown.

Every module that lists, orders, names or formats the metrics reads this table, so a metric is added or
renamed in one place. Kinds:

* ``pixel``: similarities of pixels (PixCorr, SSIM), higher is better, shown with 3 decimals;
* ``identification``: 2-way identification accuracies (fractions in [0, 1]), higher is better, shown as
  percentages with 1 decimal, the papers' convention;
* ``distance``: correlation distances of network features, lower is better, shown with 3 decimals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from brainmclip.errors import InvalidInputError

__all__ = ["DISTANCE_METRICS", "IDENTIFICATION_METRICS", "LOWER_IS_BETTER", "METRICS", "METRIC_TABLE",
           "PIXEL_METRICS", "MetricSpec", "canonical_metric", "check_metrics", "format_interval", "format_metric",
           "metric_spec"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: ``key`` is its name in results, ``title`` the papers' column title."""

    key: str
    title: str
    kind: str  # "pixel" | "identification" | "distance"
    aliases: tuple[str, ...] = ()

    @property
    def lower_is_better(self) -> bool:
        return self.kind == "distance"

    @property
    def percent(self) -> bool:
        return self.kind == "identification"

    @property
    def arrow(self) -> str:
        return "\u2193" if self.lower_is_better else "\u2191"

    def format(self, value) -> str:
        """The papers' formatting; an en dash for a missing or non-finite value."""
        if value is None or not math.isfinite(float(value)):
            return "\u2013"
        return f"{100 * float(value):.1f}%" if self.percent else f"{float(value):.3f}"

    def format_interval(self, interval) -> str:
        low, high = (float(v) for v in interval)
        if self.percent:
            return f"{100 * low:.1f}\u2013{100 * high:.1f}"
        return f"{low:.3f}\u2013{high:.3f}"


METRIC_TABLE = (
    MetricSpec("PixCorr", "PixCorr", "pixel"),
    MetricSpec("SSIM", "SSIM", "pixel"),
    MetricSpec("AlexNet(2)", "Alex(2)", "identification", ("alex(2)", "alexnet2", "alex2")),
    MetricSpec("AlexNet(5)", "Alex(5)", "identification", ("alex(5)", "alexnet5", "alex5")),
    MetricSpec("InceptionV3", "Incep", "identification", ("incep", "inception")),
    MetricSpec("CLIP", "CLIP", "identification"),
    MetricSpec("EffNet-B", "Eff", "distance", ("eff", "effnet")),
    MetricSpec("SwAV", "SwAV", "distance"),
)

METRICS = tuple(m.key for m in METRIC_TABLE)
PIXEL_METRICS = tuple(m.key for m in METRIC_TABLE if m.kind == "pixel")
IDENTIFICATION_METRICS = tuple(m.key for m in METRIC_TABLE if m.kind == "identification")
DISTANCE_METRICS = tuple(m.key for m in METRIC_TABLE if m.kind == "distance")
LOWER_IS_BETTER = tuple(m.key for m in METRIC_TABLE if m.lower_is_better)

_BY_NAME = {name.lower(): m for m in METRIC_TABLE for name in (m.key, m.title, *m.aliases)}


def canonical_metric(name: str) -> str:
    """The result key of a metric named by its key, column title or an alias (any case); unknown names unchanged."""
    spec = _BY_NAME.get(str(name).strip().lower())
    return spec.key if spec else str(name)


def metric_spec(name: str) -> MetricSpec:
    spec = _BY_NAME.get(str(name).strip().lower())
    if spec is None:
        raise InvalidInputError(f"Unknown metric {name!r}; choose from {list(METRICS)}")
    return spec


def check_metrics(names) -> tuple[str, ...]:
    """Requested metric names as result keys in table order; a one-line error for an unknown one."""
    wanted = {metric_spec(n).key for n in names}
    return tuple(m for m in METRICS if m in wanted)


def format_metric(name: str, value) -> str:
    spec = _BY_NAME.get(str(name).strip().lower())
    if spec is None:
        return "\u2013" if value is None or not math.isfinite(float(value)) else f"{float(value):.3f}"
    return spec.format(value)


def format_interval(name: str, interval) -> str:
    return metric_spec(name).format_interval(interval)
