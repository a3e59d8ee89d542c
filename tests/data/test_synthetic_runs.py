"""Simulator runs: determinism, refusing to overwrite, atomic files and resuming, the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainmclip.cli import main
from brainmclip.data import nsd_paths
from brainmclip.data.synthetic import make_synthetic_nsd
from brainmclip.data.synthetic import simulate as simulate_module


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "simulate.log"}


def test_same_seed_same_bytes(tmp_path):
    a = make_synthetic_nsd(tmp_path / "a", "tiny", subjects=[1], seed=3, sessions=4, progress=False)
    b = make_synthetic_nsd(tmp_path / "b", "tiny", subjects=[1], seed=3, sessions=4, progress=False)
    digests_a, digests_b = _digests(a.root), _digests(b.root)
    assert len(digests_a) > 20
    assert digests_a == digests_b
    c = make_synthetic_nsd(tmp_path / "c", "tiny", subjects=[1], seed=4, sessions=4, progress=False)
    beta = str(nsd_paths.betas_path(Path("."), 1, 1))
    assert _digests(c.root)[beta] != digests_a[beta]


def test_subject_and_session_choice_do_not_change_the_data(tmp_path, tiny_nsd):
    """Subject 1's first sessions are identical whether or not subject 2 or later sessions are written."""
    small = make_synthetic_nsd(tmp_path / "one", "tiny", subjects=[1], seed=tiny_nsd.seed, sessions=2, progress=False)
    for session in (1, 2):
        a = nsd_paths.betas_path(small.root, 1, session).read_bytes()
        b = nsd_paths.betas_path(tiny_nsd.root, 1, session).read_bytes()
        assert a == b
    assert not nsd_paths.betas_path(small.root, 1, 3).exists()
    for roi in ("nsdgeneral", "floc-faces"):
        ours, theirs = nsd_paths.roi_path(small.root, 1, roi), nsd_paths.roi_path(tiny_nsd.root, 1, roi)
        assert ours.read_bytes() == theirs.read_bytes()


def test_refuses_non_empty_folder_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        make_synthetic_nsd(tmp_path, "tiny", subjects=[1], sessions=1, progress=False)
    make_synthetic_nsd(tmp_path, "tiny", subjects=[1], sessions=1, force=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # --force replaces only what the simulator owns
    with pytest.raises(FileExistsError, match="other settings"):
        make_synthetic_nsd(tmp_path, "tiny", subjects=[1], sessions=2, progress=False)


def test_rerun_of_a_complete_simulation_is_a_no_op(tmp_path):
    first = make_synthetic_nsd(tmp_path, "tiny", subjects=[1], sessions=2, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nii.gz")}
    again = make_synthetic_nsd(tmp_path, "tiny", subjects=[1], sessions=2, progress=False)
    assert again.resumed and again.n_files == first.n_files
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nii.gz")} == mtimes


def test_interrupted_run_leaves_no_partial_file_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    reference = make_synthetic_nsd(tmp_path / "ref", "tiny", subjects=[1], seed=5, sessions=6, progress=False)

    real = simulate_module.NiftiStreamWriter.write_volume
    calls = {"n": 0}

    def dying(self, volume):
        # Die in the middle of session 4 (each tiny session has 18 trials).
        if "session04" in self.path.name:
            calls["n"] += 1
            if calls["n"] == 9:
                raise KeyboardInterrupt
        return real(self, volume)

    monkeypatch.setattr(simulate_module.NiftiStreamWriter, "write_volume", dying)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_nsd(out, "tiny", subjects=[1], seed=5, sessions=6, progress=False)
    betas = sorted(p.name for p in nsd_paths.betas_dir(out, 1).iterdir() if p.name != "ncsnr.nii.gz")
    # Sessions 1-3 are complete and readable; session 4 never appears under its final name.
    assert betas == [f"betas_session{s:02d}.nii.gz" for s in (1, 2, 3)]
    for name in betas:
        assert np.asarray(nib.load(nsd_paths.betas_dir(out, 1) / name).dataobj).shape[-1] == 18
    # A hard kill (no cleanup) leaves a temporary behind; it must not be taken as a session.
    stale = nsd_paths.betas_dir(out, 1) / ".betas_session04.nii.gz.tmp-99999"
    stale.write_bytes(b"half a file")
    monkeypatch.setattr(simulate_module.NiftiStreamWriter, "write_volume", real)
    resumed = make_synthetic_nsd(out, "tiny", subjects=[1], seed=5, sessions=6, progress=False)
    assert resumed.resumed
    assert _digests(out) == _digests(reference.root)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="subject=9"):
        make_synthetic_nsd(tmp_path, "tiny", subjects=[9])
    with pytest.raises(ValueError, match="Unknown preset='huge'"):
        make_synthetic_nsd(tmp_path, "huge")
    with pytest.raises(ValueError, match="sessions=41"):
        make_synthetic_nsd(tmp_path, "tiny", sessions=41)
    with pytest.raises(ValueError, match="seed"):
        make_synthetic_nsd(tmp_path, "tiny", seed=-1)
    assert not any(tmp_path.iterdir())


def test_cli_simulate_and_errors(tmp_path, capsys):
    out = tmp_path / "nsd"
    assert main(["-q", "simulate", "--out", str(out), "--preset", "tiny", "--subjects", "1,3", "--sessions", "2"]) == 0
    printed = capsys.readouterr().out
    assert "subj01: 2, subj03: 2" in printed and "tiny preset" in printed
    assert nsd_paths.betas_path(out, 3, 2).exists()

    assert main(["-q", "simulate", "--out", str(tmp_path / "x"), "--subjects", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "subject=0" in err and "1-8" in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())

    assert main(["-q", "simulate", "--out", str(out), "--sessions", "3"]) == 1
    assert "--force" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--out", str(out), "--preset", "huge"])
    assert exit_info.value.code == 2


def test_cli_version(capsys):
    from brainmclip import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"brainmclip {__version__}"
