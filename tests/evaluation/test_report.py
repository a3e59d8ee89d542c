"""The HTML report: structure, number formatting, self-contained links, and a real browser render."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainmclip.evaluation.report import ReportRun, format_metric, read_tensorboard_scalars, write_report
from brainmclip.evaluation.retrieval import retrieval_report
from brainmclip.types import RunEvaluation

METHODS = ("brainmclip", "ridge")


class _PageParser(HTMLParser):
    """Collects <img src>, <script>, <link>, the title and the text of every table cell."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.scripts = 0
        self.links: list[dict] = []
        self.title = ""
        self.cells: list[str] = []
        self.tbody_classes: list[str | None] = []
        self._in_title = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "link":
            self.links.append(attrs)
        elif tag == "title":
            self._in_title = True
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "tbody":
            self.tbody_classes.append(attrs.get("class"))

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    return parser


def _png(path: Path, seed: int, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    yy, xx = np.mgrid[0:size, 0:size]
    img = (base[None, None, :] + np.stack([xx * 3, yy * 3, (xx + yy) * 2], axis=-1)) % 256
    Image.fromarray(img.astype(np.uint8)).save(path)
    return path


def _metrics(shift: float) -> dict:
    return {"PixCorr": 0.2123 + shift, "SSIM": 0.3004 + shift, "AlexNet(2)": 0.9183 + shift,
            "AlexNet(5)": 0.9701, "InceptionV3": 0.9456, "CLIP": 0.9518 - shift, "EffNet-B": 0.6431, "SwAV": 0.3544}


def _retrieval(seed: int, noise: float) -> dict:
    """A real retrieval report of noisy copies of random embeddings (n = 40, 20-way)."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(40, 16))
    return {"image": retrieval_report(true + noise * rng.normal(size=true.shape), true, n_way=20, n_repeats=30)}


def synthetic_runs(tmp_path: Path, n_images: int = 9) -> list[ReportRun]:
    src = tmp_path / "inputs"
    src.mkdir()
    runs = []
    for subject in (1, 2):
        truth = [_png(src / f"s{subject}_truth_{i}.png", 1000 * subject + i) for i in range(n_images)]
        truth_images = np.stack([np.asarray(Image.open(p)) for p in truth])
        for m, method in enumerate(METHODS):
            recon = [_png(src / f"s{subject}_{method}_{i}.png", 1000 * subject + i + 100 * (m + 1)) for i in range(n_images)]
            shift = 0.01 * subject + 0.05 * m
            metrics = _metrics(shift)
            evaluation = RunEvaluation(
                subject=subject, method=method, metrics=metrics,
                ci95={k: [v - 0.0123, v + 0.0234] for k, v in metrics.items()},
                uncalibrated=["InceptionV3"] if method == "brainmclip" else [],
                retrieval=_retrieval(subject, 0.8 + m), parameters=12_345_678)
            run = ReportRun(
                evaluation, recon_paths=[str(p) for p in recon],
                protocol={"name": "mindeye1", "image_size": 425, "clip_model": "openai/clip-vit-large-patch14"},
                data={"test_set": "old", "n_images": n_images, "preset": "tiny"})
            # one subject gives ground truth as paths, the other as an array
            if subject == 1:
                run.truth_paths = [str(p) for p in truth]
            else:
                run.truth_images = truth_images
            if method == "brainmclip":
                run.curves = {"train/total": [(s, 2.0 / (1 + s)) for s in range(0, 200, 10)],
                              "val/loss": [(s, 2.2 / (1 + s) + 0.05) for s in range(0, 200, 50)]}
            else:
                run.curves = {"train/total": [(s, 1.8 / (1 + s)) for s in range(0, 200, 10)]}
            runs.append(run)
    return runs


PUBLISHED = [
    {"method": "MindEye1", "metrics": {"PixCorr": 0.309, "SSIM": 0.323, "AlexNet(2)": 0.947, "AlexNet(5)": 0.978,
                                       "InceptionV3": 0.938, "CLIP": 0.941, "EffNet-B": 0.645, "SwAV": 0.367},
     "params": "1.45B"},
    # the paper's column names are accepted as keys too
    {"method": "BrainMCLIP (CLIP only)", "metrics": {"PixCorr": 0.212, "SSIM": 0.263, "Alex(2)": 0.918, "Alex(5)": 0.970,
                                                     "Incep": 0.946, "CLIP": 0.952, "Eff": 0.643, "SwAV": 0.354},
     "params": "0.73B"},
]


@pytest.fixture
def report(tmp_path):
    out = tmp_path / "report"
    index = write_report(out, synthetic_runs(tmp_path), title="Test report", published=PUBLISHED)
    return out, index


def test_format_metric():
    assert format_metric("AlexNet(2)", 0.91834) == "91.8%"
    assert format_metric("Incep", 0.9) == "90.0%"
    assert format_metric("PixCorr", 0.21234) == "0.212"
    assert format_metric("SwAV", 0.3546) == "0.355"
    assert format_metric("SSIM", float("nan")) == "\u2013"


def test_report_structure_and_numbers(report):
    out, index = report
    assert index == out / "index.html" and index.is_file()
    page = index.read_text(encoding="utf-8")
    parsed = parse(page)

    # every image is a relative link to a file inside the folder
    assert len(parsed.images) == 4  # grid + curves for each of the two subjects
    for src in parsed.images:
        assert not src.startswith(("/", "http:", "https:", "file:", "data:")), src
        target = (out / src).resolve()
        assert target.is_file(), src
        assert out.resolve() in target.parents
        with Image.open(target) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 50
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "subj01_curves.png", "subj01_grid.png", "subj02_curves.png", "subj02_grid.png"]

    # self-contained and script-free by default
    assert parsed.scripts == 0 and parsed.links == []
    assert not re.search(r"(src|href)=\"(https?:)?//", page)

    # headers as in the paper's tables
    for header in ("PixCorr↑", "SSIM↑", "Alex(2)↑", "Alex(5)↑", "Incep↑", "CLIP↑", "Eff↓", "SwAV↓"):
        assert header in parsed.cells, header

    # subject 1, brainmclip: shift 0.01
    cells = parsed.cells
    assert any(c.startswith("0.222[0.210–0.246]") for c in cells)  # value with its 95% interval
    assert any(c.startswith("92.8%[91.6–95.2]") for c in cells)  # AlexNet(2) 0.9283 as a percentage
    assert any(c.startswith("94.6%†") for c in cells)  # uncalibrated InceptionV3 of brainmclip is marked
    assert not any(c.startswith("94.6%†") for c in cells[cells.index("ridge") :][:12])  # ridge is calibrated
    assert any(c.startswith("0.643") for c in cells) and any(c.startswith("0.354") for c in cells)

    # published block: separate tbody, labelled, paper-named keys mapped to the same columns
    assert "published" in parsed.tbody_classes
    assert "published (paper)" in page
    pub_start = next(i for i, c in enumerate(cells) if c.startswith("published (paper)"))
    pub = cells[pub_start:]
    assert "MindEye1 (published)" in pub and "1.45B" in pub
    row = pub[pub.index("BrainMCLIP (CLIP only) (published)") :]
    assert row[2:10] == ["0.212", "0.263", "91.8%", "97.0%", "94.6%", "95.2%", "0.643", "0.354"]
    assert "†" not in "".join(pub)

    # dagger legend, retrieval, curves, protocol/data
    assert 'id="dagger-legend"' in page and "uncalibrated" in page
    top1 = _retrieval(1, 0.8)["image"]["top1_n_way"]
    image, brain = top1["image_retrieval"], top1["brain_retrieval"]
    assert image["mean"] != brain["mean"]  # the two directions are told apart
    assert any(c.startswith("image retrieval top-1") and "brain → image" in c for c in cells)
    assert any(c.startswith("brain retrieval top-1") and "image → brain" in c for c in cells)
    row = cells[cells.index("image") - 2:]  # first retrieval row: subject 1, brainmclip
    assert row[:5] == ["brainmclip", "1", "image", "20", f"{100 * image['mean']:.1f}%"
                       f"[{100 * image['ci95_low']:.1f}–{100 * image['ci95_high']:.1f}]"]
    assert row[5].startswith(f"{100 * brain['mean']:.1f}%")
    assert "sd(ddof=1)" in page and "MindEye1's code names these two directions the other way round" in page
    assert "mindeye1" in page and "old" in page and "preset" in page


def test_mean_rows_and_no_leftovers(report):
    out, _ = report
    cells = parse((out / "index.html").read_text()).cells
    assert "brainmclip (mean)" in cells and "ridge (mean)" in cells
    mean_row = cells[cells.index("brainmclip (mean)") :]
    assert mean_row[1] == "1,2" and mean_row[2] == "0.227"  # PixCorr (0.2223 + 0.2323) / 2
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_rewrite_replaces_atomically(tmp_path):
    runs = synthetic_runs(tmp_path)
    out = tmp_path / "r"
    write_report(out, runs)
    assert (out / "figures" / "subj02_grid.png").exists()
    write_report(out, runs[:2], title="second")
    # The first report's figures are gone with it: the folder holds exactly the second report.
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["subj01_curves.png", "subj01_grid.png"]
    assert "second" in (out / "index.html").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_out_that_is_not_a_report_is_refused_untouched(tmp_path):
    runs = synthetic_runs(tmp_path)
    results = tmp_path / "eval"
    results.mkdir()
    (results / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    for out in (results, tmp_path / "notes.txt"):
        before = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
        with pytest.raises(FileExistsError, match="choose"):
            write_report(out, runs)
        assert {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} == before
    # A report someone added a file to is not replaced either: that file is not the report's.
    write_report(tmp_path / "r", runs)
    (tmp_path / "r" / "my_notes.md").write_text("keep me")
    with pytest.raises(FileExistsError, match="my_notes.md"):
        write_report(tmp_path / "r", runs[:2])
    assert (tmp_path / "r" / "my_notes.md").read_text() == "keep me"
    assert (tmp_path / "r" / "figures" / "subj02_grid.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_empty_folder_may_be_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert write_report(out, synthetic_runs(tmp_path)) == out.absolute() / "index.html"
    assert (out / ".brainmclip-report.json").is_file()


def test_failure_leaves_previous_report(tmp_path):
    runs = synthetic_runs(tmp_path)
    out = tmp_path / "r"
    write_report(out, runs)
    before = (out / "index.html").read_text()
    broken = [ReportRun(runs[0].evaluation, recon_paths=[str(tmp_path / "missing.png")])]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(out, broken)
    assert (out / "index.html").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_minimal_run_without_optional_fields(tmp_path):
    src = tmp_path / "a.png"
    _png(src, 0)
    out = tmp_path / "r"
    write_report(out, [ReportRun(RunEvaluation(3, "m", {"SSIM": 0.5}, parameters=12_345_678),
                                 recon_paths=[str(src)])])
    parsed = parse((out / "index.html").read_text())
    assert parsed.images == ["figures/subj03_grid.png"]
    assert "0.500" in parsed.cells and "12.3M" in parsed.cells and "published" not in parsed.tbody_classes
    assert 'id="dagger-legend"' not in (out / "index.html").read_text()
    with pytest.raises(ValueError, match="twice"):
        write_report(out, [ReportRun(RunEvaluation(3, "m", {})), ReportRun(RunEvaluation(3, "m", {}))])
    with pytest.raises(ValueError, match="expected a ReportRun"):
        write_report(out, [{"subject": 3, "method": "m"}])


def test_read_tensorboard_scalars(tmp_path):
    assert read_tensorboard_scalars(tmp_path) == {}
    (tmp_path / "tensorboard").mkdir()
    assert read_tensorboard_scalars(tmp_path) == {}
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in range(5):
        writer.add_scalar("train/total", 1.0 / (step + 1), step)
    writer.add_scalar("val/loss", 0.5, 4)
    writer.close()
    scalars = read_tensorboard_scalars(tmp_path)
    assert set(scalars) == {"train/total", "val/loss"}
    assert [s for s, _ in scalars["train/total"]] == [0, 1, 2, 3, 4]
    assert scalars["train/total"][2][1] == pytest.approx(1 / 3)
    assert scalars["val/loss"] == [(4, 0.5)]


# --------------------------------------------------------------------------- headless browser


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium binary on PATH (run .ci/install-chromium.sh to install Debian's chromium)")
    return binary


def _chromium_args(binary: str, profile: Path) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}"]


@pytest.mark.slow
def test_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    out = tmp_path / "report"
    index = write_report(out, synthetic_runs(tmp_path), title="Browser test", published=PUBLISHED,
                         debug_image_check=True)

    shot = tmp_path / "shot.png"
    run = subprocess.run(_chromium_args(binary, tmp_path / "profile1") +
                         [f"--screenshot={shot}", "--window-size=1280,2000", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {run.returncode}): {run.stderr[-2000:]}"
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 10.0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50

    dom = subprocess.run(_chromium_args(binary, tmp_path / "profile2") +
                         ["--virtual-time-budget=3000", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r"<title>(.*?)</title>", dom.stdout, re.S)
    assert match, f"no title in chromium's DOM dump (rc {dom.returncode}): {dom.stderr[-2000:]}"
    assert match.group(1) == "images-ok", match.group(1)


@pytest.mark.slow
def test_chromium_detects_a_broken_image(tmp_path):
    """The check itself works: delete a figure and the page reports it."""
    binary = _chromium()
    index = write_report(tmp_path / "report", synthetic_runs(tmp_path, n_images=3), debug_image_check=True)
    (tmp_path / "report" / "figures" / "subj02_grid.png").unlink()
    dom = subprocess.run(_chromium_args(binary, tmp_path / "profile") +
                         ["--virtual-time-budget=3000", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "<title>images-broken: 1</title>" in dom.stdout, dom.stderr[-2000:]


def test_grid_lines_runs_up_by_image_and_marks_partial_runs(tmp_path):
    from brainmclip.evaluation.report import _grid_rows

    ids = np.array([40, 10, 30, 20])
    paths = []
    for k in range(4):
        paths.append(tmp_path / f"{k}.png")
        _png(paths[-1], k)
    full = ReportRun(RunEvaluation(1, "brain_mclip", {"SSIM": 0.5}, n_images=4), recon_paths=list(map(str, paths)),
                     stimulus_ids=ids)
    part = ReportRun(RunEvaluation(1, "brain_mclip+MindDiffuser", {"SSIM": 0.6}, n_images=2),
                     recon_paths=list(map(str, paths[:2])), stimulus_ids=np.array([30, 40]))
    # columns: the images both hold, in the first run's order; each run's rows of them
    assert _grid_rows([full, part]) == [[0, 2], [1, 0]]
    assert _grid_rows([full, ReportRun(RunEvaluation(1, "x", {}), recon_paths=[str(paths[0])])]) == [[0, 1, 2, 3], [0]]
    out = tmp_path / "r"
    tests = {"subj01": [{"metric": "SSIM", "a": "brain_mclip", "b": "brain_mclip+MindDiffuser",
                         "median_difference": -0.1, "p_value": 0.031, "n_images": 2}]}
    write_report(out, [full, part], paired_tests=tests)
    html = (out / "index.html").read_text()
    assert "BrainMCLIP + MindDiffuser" in html and "first 2 of the test images" in html
    assert 'id="paired"' in html and "-0.1000" in html and "0.031" in html
