"""One metric table: every module lists, names and formats the eight metrics from it."""

from __future__ import annotations

import pytest

from brainmclip.evaluation import image_metrics, metric_table, published
from brainmclip.evaluation.metric_table import METRIC_TABLE, METRICS, canonical_metric, check_metrics, format_metric


def test_the_table_is_the_papers_eight_in_order():
    assert METRICS == ("PixCorr", "SSIM", "AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP", "EffNet-B", "SwAV")
    assert [m.title for m in METRIC_TABLE] == ["PixCorr", "SSIM", "Alex(2)", "Alex(5)", "Incep", "CLIP", "Eff", "SwAV"]
    assert metric_table.LOWER_IS_BETTER == ("EffNet-B", "SwAV")
    assert metric_table.IDENTIFICATION_METRICS == ("AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP")


def test_other_modules_use_the_same_table():
    assert image_metrics.METRICS is METRICS
    assert image_metrics.IDENTIFICATION_METRICS is metric_table.IDENTIFICATION_METRICS
    assert all(tuple(row["metrics"]) == METRICS for row in published.PUBLISHED)
    assert all(len(values) == len(METRICS) for table in published.PUBLISHED_ABLATIONS.values()
               for values in table.values())


def test_names_aliases_and_formatting():
    assert canonical_metric("alex(2)") == canonical_metric("Alex2") == canonical_metric("AlexNet(2)") == "AlexNet(2)"
    assert canonical_metric("Incep") == "InceptionV3" and canonical_metric("eff") == "EffNet-B"
    assert canonical_metric("FID") == "FID"  # unknown names pass through for display
    assert check_metrics(["SwAV", "pixcorr", "CLIP"]) == ("PixCorr", "CLIP", "SwAV")
    with pytest.raises(ValueError, match=r"Unknown metric 'FID'; choose from \['PixCorr'"):
        check_metrics(["FID"])
    assert format_metric("Alex(5)", 0.97) == "97.0%" and format_metric("SwAV", 0.3544) == "0.354"
    assert format_metric("CLIP", None) == "\u2013"
