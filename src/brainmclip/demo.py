"""The embedded default: the whole chain on a simulated NSD, on a laptop CPU.

Stages built so far: simulate -> prepare -> extract (tiny random CLIP) -> train BrainMCLIP
and ridge -> predict (test retrieval as the first score) -> reconstruct (tiny random Versatile
Diffusion, 32 px). Later stages (evaluate, report) append themselves here. Every stage skips or resumes finished work, so
rerunning the demo on the same folder is quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.synthetic import make_synthetic_nsd
from brainmclip.evaluation.retrieval import similarity_matrix, top1_n_way
from brainmclip.features.extract import extract_features
from brainmclip.features.feature_store import open_feature_store
from brainmclip.generation.reconstruct import ReconstructOptions, reconstruct
from brainmclip.models.predictions import load_predictions
from brainmclip.training.loop import train_brain_mclip
from brainmclip.training.predict import predict
from brainmclip.training.ridge_fit import train_ridge

__all__ = ["DEMO_SUBJECTS", "run_synthetic_demo"]

DEMO_SUBJECTS = (1, 2)


def _train_and_predict(method: str, data: Path, features: Path, run: Path, progress: bool) -> Path:
    pred = run / "predictions_test"
    if (pred / "manifest.json").exists():
        return pred
    if method == "ridge":
        if not (run / "run.json").exists():
            train_ridge(data, features, run, progress=progress)
    else:
        resume = (run / "checkpoint_last.pt").exists()
        if not resume or not _finished(run):
            train_brain_mclip(data, features, None if resume else ["brain_mclip_tiny"], run, resume=resume,
                              progress=progress)
    return predict(run, "test", pred)


def _finished(run: Path) -> bool:
    from brainmclip.training.checkpoint import load_checkpoint

    return bool(load_checkpoint(run / "checkpoint_last.pt")["progress"]["finished"])


def _retrieval(pred_dir: Path, features: Path) -> float:
    pred = load_predictions(pred_dir)
    targets = open_feature_store(features).get(pred.stimulus_ids, ("image_semantic", "image_detail"))
    fused = (targets["image_semantic"] + targets["image_detail"]) / 2
    sim = similarity_matrix(np.asarray(pred.image, np.float32), fused)
    return top1_n_way(sim, n_way=300, n_repeats=30)["image_retrieval"]["mean"]


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
    features_dir = out / "features" / "tiny"
    features = extract_features([p.root for p in prepared], features_dir, model="tiny", progress=progress)
    # 4. BrainMCLIP (tiny width) and the ridge baseline per subject, predicted on the test set.
    scores = {}
    for p in prepared:
        for method in ("brain_mclip", "ridge"):
            run = out / "runs" / f"subj{p.subject:02d}" / method
            pred = _train_and_predict(method, p.root, features_dir, run, progress)
            scores[(p.subject, method)] = _retrieval(pred, features_dir)
            # 5. Images from the predictions (tiny VD; real runs use shi-labs/versatile-diffusion at 512 px).
            recon = reconstruct(pred, run / "reconstructions_test",
                                ReconstructOptions(generator="tiny", clip="tiny", batch_size=16), progress=progress)
            scores[(p.subject, method, "recon")] = recon.root
    lines = ["brainmclip demo", nsd.summary()]
    lines += [p.summary() for p in prepared]
    lines.append(features.summary())
    n_test = len(prepared[0].test)
    lines.append(f"test image retrieval, {min(300, n_test)}-way top-1 (chance {1 / min(300, n_test):.3f}):")
    for key, value in scores.items():
        if len(key) == 2:
            lines.append(f"  subj{key[0]:02d} {key[1]:<12} {value:.3f}")
    recons = [str(v) for k, v in scores.items() if len(k) == 3]
    lines.append(f"reconstructions (tiny random VD, 32 px): {len(recons)} folders, e.g. {recons[0]}")
    lines.append("next stages (evaluate, report) are not built yet")
    return "\n".join(lines)
