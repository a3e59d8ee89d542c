"""The analysis output contract and its section in the report."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from brainmclip.analysis.common import find_analyses, save_figure, write_analysis  # noqa: E402
from brainmclip.evaluation.report import ReportRun, write_report  # noqa: E402
from brainmclip.types import RunEvaluation  # noqa: E402


def _analysis(folder, name, value):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, value])
    save_figure(fig, folder / "figure.png")
    return write_analysis(folder, name, f"Title of {name}", f"Caption of {name}.",
                          table=[{"layer": 1, "r": np.float32(value)}], settings={"seed": np.int64(3)})


def test_written_last_and_found_in_the_package_order(tmp_path):
    with pytest.raises(FileNotFoundError, match="figure"):
        write_analysis(tmp_path / "empty", "rsa", "t", "c")
    _analysis(tmp_path / "b", "rsa", 0.25)
    _analysis(tmp_path / "a", "backproject", 0.5)
    (tmp_path / "unfinished").mkdir()
    found = find_analyses(tmp_path)
    assert [a["analysis"] for a in found] == ["rsa", "backproject"]  # ANALYSES order, not folder order
    assert found[0]["table"] == [{"layer": 1, "r": 0.25}] and found[0]["settings"] == {"seed": 3}
    assert find_analyses(tmp_path / "b")[0]["analysis"] == "rsa"  # a single analysis folder works too
    with pytest.raises(FileNotFoundError, match="no finished analysis"):
        find_analyses(tmp_path / "unfinished")
    with pytest.raises(FileNotFoundError, match="no such"):
        find_analyses(tmp_path / "missing")


def test_report_section(tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    _analysis(tmp_path / "an" / "rsa", "rsa", 0.25)
    out = tmp_path / "r"
    write_report(out, [ReportRun(RunEvaluation(1, "m", {"SSIM": 0.5}), recon_paths=[str(src)])],
                 analyses=find_analyses(tmp_path / "an"))
    html = (out / "index.html").read_text()
    assert 'id="analysis-rsa"' in html and "Caption of rsa." in html and "<td>0.25</td>" in html
    assert (out / "figures" / "analysis_00_rsa.png").is_file()
    assert json.loads((tmp_path / "an" / "rsa" / "manifest.json").read_text())["complete"] is True
