"""The embedded default: the whole chain on a simulated NSD, on a laptop CPU.

Stages built so far: simulate -> prepare -> extract (tiny random CLIP). Later stages append themselves here; every stage
skips or resumes finished work, so rerunning the demo on the same folder is quick.
"""

from __future__ import annotations

from pathlib import Path

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.synthetic import make_synthetic_nsd
from brainmclip.features.extract import extract_features

__all__ = ["run_synthetic_demo", "DEMO_SUBJECTS"]

DEMO_SUBJECTS = (1, 2)


def run_synthetic_demo(out_dir, tiny: bool = False, seed: int = 0, progress: bool = True) -> str:
    """Run the demo into ``out_dir`` and return a short summary of what it wrote."""
    out = Path(out_dir)
    # 1. A simulated NSD tree with the official layout.
    nsd = make_synthetic_nsd(out / "nsd", preset="tiny" if tiny else "small", subjects=DEMO_SUBJECTS, seed=seed,
                             progress=progress)
    # 2. Prepared datasets, exactly as from a real NSD copy (old test set, leakage-safe z-scoring).
    prepared = [prepare_subject(nsd.root, s, out / "prepared" / f"subj{s:02d}", PrepareOptions(), progress=progress)
                for s in DEMO_SUBJECTS]
    # 3. CLIP targets once per NSD image (shared test images are computed once for both subjects).
    #    The tiny random CLIP keeps the 257 x 24-block layout of ViT-L/14 at toy width.
    features = extract_features([p.root for p in prepared], out / "features" / "tiny", model="tiny",
                                progress=progress)
    lines = ["brainmclip demo", nsd.summary()]
    lines += [p.summary() for p in prepared]
    lines.append(features.summary())
    lines.append("next stages (train, reconstruct, evaluate) are not built yet")
    return "\n".join(lines)
