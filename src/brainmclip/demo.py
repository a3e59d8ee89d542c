"""The embedded default: the whole chain on a simulated NSD, on a laptop CPU.

Stages built so far: simulate -> prepare -> extract (tiny random CLIP) -> train BrainMCLIP
and ridge -> predict -> reconstruct (tiny random Versatile Diffusion, 32 px) -> evaluate (the
eight metrics with random-initialised metric networks, marked uncalibrated; retrieval) ->
report (static HTML). Every stage skips or resumes finished work, so
rerunning the demo on the same folder is quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.synthetic import make_synthetic_nsd
from brainmclip.evaluation.evaluate import evaluate_reconstructions, make_report
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


def _retrieval(pred_dir: Path, features: Path) -> tuple[float, float]:
    pred = load_predictions(pred_dir)
    targets = open_feature_store(features).get(pred.stimulus_ids, ("image_semantic", "image_detail"))
    fused = (targets["image_semantic"] + targets["image_detail"]) / 2
    sim = similarity_matrix(np.asarray(pred.image, np.float32), fused)
    top1 = top1_n_way(sim, n_way=300, n_repeats=30)
    return top1["image_retrieval"]["mean"], top1["brain_retrieval"]["mean"]


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
    extract_features([p.root for p in prepared], features_dir, model="tiny", progress=progress)
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
    # 6. The eight metrics and retrieval per subject and method, then the report. No metric
    #    network weights exist here, so their columns are random-initialised and marked.
    recon_dirs = [v for k, v in scores.items() if len(k) == 3]
    evaluation = evaluate_reconstructions(recon_dirs, out / "evaluation", clip_model="tiny", allow_random=True,
                                          n_boot=200)
    report = make_report(out / "evaluation", out / "report", title="brainmclip demo (simulated NSD, tiny models)")
    lines = ["brainmclip demo: simulate -> prepare -> extract -> train -> predict -> reconstruct -> evaluate -> report",
             f"  data: {nsd.preset.name} simulated NSD, subjects {', '.join(map(str, DEMO_SUBJECTS))}, "
             f"{len(prepared[0].train)} train / {len(prepared[0].test)} test images each; tiny random CLIP, VD and "
             "metric networks (metrics check the pipeline, not the methods)"]
    n_test = len(prepared[0].test)
    for method, values in evaluation["mean_over_subjects"].items():
        image, brain = np.mean([scores[(s, method)] for s in DEMO_SUBJECTS], axis=0)
        lines.append(f"  {method:<12} {min(300, n_test)}-way top-1 image / brain retrieval {image:.3f} / {brain:.3f} "
                     f"(chance {1 / min(300, n_test):.3f}); PixCorr {values['PixCorr']:.3f}, "
                     f"SSIM {values['SSIM']:.3f}, CLIP 2-way {100 * values['CLIP']:.1f}%")
    lines.append(f"report: {report}")
    return "\n".join(lines)
