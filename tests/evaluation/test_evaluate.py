"""Statistics and tables of `brainmclip evaluate`."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from brainmclip.evaluation.evaluate import bootstrap_ci, format_markdown, paired_tests
from brainmclip.evaluation.metric_table import METRICS as METRIC_NAMES
from brainmclip.evaluation.published import PUBLISHED
from brainmclip.evaluation.retrieval import retrieval_report
from brainmclip.types import RunEvaluation


def test_bootstrap_interval_by_hand():
    values = np.random.default_rng(3).normal(0.5, 0.1, 40)
    low, high = bootstrap_ci(values, n_boot=500, seed=1)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 40, (500, 40))
    means = values[idx].mean(1)
    assert (low, high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert low < values.mean() < high


def test_paired_wilcoxon_matches_scipy():
    rng = np.random.default_rng(0)
    a = {m: rng.normal(size=30) for m in METRIC_NAMES}
    b = {m: a[m] + 0.3 + rng.normal(scale=0.1, size=30) for m in METRIC_NAMES}
    tests = paired_tests({"brain_mclip": a, "ridge": b})
    assert len(tests) == len(METRIC_NAMES)
    first = tests[0]
    assert first["a"] == "brain_mclip" and first["b"] == "ridge"
    assert first["p_value"] == stats.wilcoxon(a[first["metric"]], b[first["metric"]]).pvalue < 1e-4
    same = paired_tests({"x": {"SSIM": np.ones(5)}, "y": {"SSIM": np.ones(5)}})
    assert same[0]["p_value"] == 1.0


def test_paired_tests_pair_the_images_both_methods_hold():
    rng = np.random.default_rng(1)
    ids = {"full": np.arange(100, 130), "part": np.array([117, 101, 125, 103, 110, 129, 100, 108])}
    full = {"PixCorr": rng.normal(size=30)}
    part = {"PixCorr": rng.normal(size=8)}
    (test,) = paired_tests({"full": full, "part": part}, ids)
    rows = ids["part"] - 100  # the full run's rows of the part's images, in the part's order
    want = stats.wilcoxon(full["PixCorr"][rows], part["PixCorr"])
    assert test["n_images"] == 8 and test["p_value"] == pytest.approx(want.pvalue, rel=1e-12)
    assert test["median_difference"] == pytest.approx(np.median(full["PixCorr"][rows] - part["PixCorr"]))
    assert paired_tests({"full": full, "part": part}) == []  # without ids, unequal lengths are not paired


def test_markdown_marks_published_and_uncalibrated_rows():
    metrics = {m: 0.5 for m in METRIC_NAMES}
    rng = np.random.default_rng(0)
    true = rng.normal(size=(30, 8))
    retrieval = {"image": retrieval_report(true + rng.normal(size=true.shape), true, n_way=10)}
    report = {"protocol": {"name": "mindeye1"}, "clip_model": "tiny",
              "runs": [RunEvaluation(1, "ridge", metrics, uncalibrated=["SwAV"], parameters=2_000_000,
                                     retrieval=retrieval)],
              "mean_over_subjects": {"ridge": metrics}, "published": PUBLISHED}
    text = format_markdown(report)
    assert "| ridge (ours) | 1 | 0.500 | 0.500 | 50.0% | 50.0% | 50.0% | 50.0% | 0.500 | 0.500† | 2.0M |" in text
    assert "*BrainMCLIP (CLIP only)* (published)" in text and "91.8%" in text
    assert "† uncalibrated" in text and "PixCorr ↑" in text and "SwAV ↓" in text
    # retrieval: both directions named, with the interval definition
    top1 = retrieval["image"]["top1_n_way"]
    image, brain = top1["image_retrieval"], top1["brain_retrieval"]
    row = (f"| ridge | 1 | image | 10 | {100 * image['mean']:.1f}% [{100 * image['ci95_low']:.1f}, "
           f"{100 * image['ci95_high']:.1f}] | {100 * brain['mean']:.1f}% [{100 * brain['ci95_low']:.1f}, "
           f"{100 * brain['ci95_high']:.1f}] |")
    assert row in text
    assert "image retrieval (brain -> image)" in text and "sd(ddof=1)" in text
