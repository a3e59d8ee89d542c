"""The embedded default: the whole chain on a simulated NSD, on a laptop CPU.

At this stage the chain is its first link (simulate); later stages append themselves here.
"""

from __future__ import annotations

from pathlib import Path

from brainmclip.data.synthetic import make_synthetic_nsd

__all__ = ["run_synthetic_demo"]

DEMO_SUBJECTS = (1, 2)


def run_synthetic_demo(out_dir, tiny: bool = False, seed: int = 0, progress: bool = True) -> str:
    """Run the demo into ``out_dir`` and return a short summary of what it wrote.

    Rerunning on the same folder reuses finished stages (each stage resumes or skips).
    """
    out = Path(out_dir)
    nsd = make_synthetic_nsd(out / "nsd", preset="tiny" if tiny else "small", subjects=DEMO_SUBJECTS, seed=seed,
                             progress=progress)
    return "\n".join([
        "brainmclip demo",
        nsd.summary(),
        f"next stages (prepare, extract, train, reconstruct, evaluate) are not built yet; NSD tree at {nsd.root}",
    ])
