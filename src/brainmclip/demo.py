"""The embedded default: the whole chain on a simulated NSD, on a laptop CPU, in the miniature world.

simulate -> prepare -> extract (mini-CLIP) -> train BrainMCLIP and ridge -> predict -> reconstruct
(mini-VD, 64 px) -> evaluate (the eight metrics, the CLIP one with mini-CLIP; the ImageNet
networks are random-initialised and marked uncalibrated; retrieval; category agreement with the
scenes) -> report (static HTML). The ground-truth embeddings of the test images go through the
same generation and scoring ("gt_embedding"): the upper bound that shows how much decoding from
fMRI loses. Every stage skips or resumes finished work, so rerunning the demo on the same folder
is quick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainmclip.data.prepare import PrepareOptions, prepare_subject
from brainmclip.data.synthetic import make_synthetic_nsd
from brainmclip.evaluation.evaluate import evaluate_reconstructions, make_report
from brainmclip.features.extract import extract_features
from brainmclip.generation.reconstruct import ReconstructOptions, reconstruct
from brainmclip.training.loop import train_brain_mclip
from brainmclip.training.predict import predict
from brainmclip.training.ridge_fit import train_ridge

__all__ = ["DEMO_SUBJECTS", "run_synthetic_demo"]

DEMO_SUBJECTS = (1, 2)
DEMO_METHODS = ("brain_mclip", "ridge", "gt_embedding")
#: The miniature world's CLIP and Versatile Diffusion, shipped with the package.
DEMO_CLIP = DEMO_GENERATOR = "mini"
#: ``tiny`` (a smoke run of every stage for tests): fewer denoising steps, and the metric networks at 112 px instead
#: of the protocol's 224-425 px (the ImageNet networks dominate the run's time on a CPU). The protocol is recorded
#: with the results, so these numbers are never mistaken for the default protocol's.
TINY_STEPS = 10
TINY_PROTOCOL = {"first_size": 112, "pixel_size": 112, "alexnet_size": 112, "inception_size": 112,
                 "effnet_size": 112, "swav_size": 112}


def _train_and_predict(method: str, data: Path, features: Path, run: Path, progress: bool) -> Path:
    pred = run / "predictions_test"
    if (pred / "manifest.json").exists():
        return pred
    if method == "gt_embedding":
        from brainmclip.training.ground_truth import write_ground_truth_run

        if not (run / "run.json").exists():
            write_ground_truth_run(data, features, run)
    elif method == "ridge":
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


def run_synthetic_demo(out_dir, tiny: bool = False, seed: int = 0, progress: bool = True) -> str:
    """Run the demo into ``out_dir`` and return a short summary of what it wrote."""
    out = Path(out_dir)
    # 1. A simulated NSD tree with the official layout.
    nsd = make_synthetic_nsd(out / "nsd", preset="tiny" if tiny else "small", subjects=DEMO_SUBJECTS, seed=seed,
                             progress=progress)
    # 2. Prepared datasets, exactly as from a real NSD copy (old test set, leakage-safe z-scoring).
    prepared = [prepare_subject(nsd.root, s, out / "prepared" / f"subj{s:02d}", PrepareOptions(), progress=progress)
                for s in DEMO_SUBJECTS]
    # 3. CLIP targets once per NSD image (shared test images are computed once for both subjects),
    #    from mini-CLIP: 24 blocks like ViT-L/14, 65 image and 32 text tokens of width 64.
    features_dir = out / "features" / DEMO_CLIP
    extract_features([p.root for p in prepared], features_dir, model=DEMO_CLIP, progress=progress)
    # 4. BrainMCLIP (toy width), the ridge baseline and the ground-truth embeddings per subject, on the test set.
    recon_dirs = []
    for p in prepared:
        for method in DEMO_METHODS:
            run = out / "runs" / f"subj{p.subject:02d}" / method
            pred = _train_and_predict(method, p.root, features_dir, run, progress)
            # 5. Images from the predictions with mini-VD (real runs: shi-labs/versatile-diffusion at 512 px).
            recon = reconstruct(pred, run / "reconstructions_test",
                                ReconstructOptions(generator=DEMO_GENERATOR, clip=DEMO_CLIP, batch_size=50,
                                                   **({"steps": TINY_STEPS} if tiny else {})),
                                progress=progress)
            recon_dirs.append(recon.root)
    # 6. The eight metrics (CLIP: mini-CLIP; no ImageNet weights exist here, so those networks are
    #    random-initialised and marked), retrieval and category agreement, then the report.
    from brainmclip.evaluation.image_metrics import MetricProtocol

    protocol = MetricProtocol(**(TINY_PROTOCOL if tiny else {}))
    evaluation = evaluate_reconstructions(recon_dirs, out / "evaluation", protocol=protocol, clip_model=DEMO_CLIP,
                                          allow_random=True, n_boot=200)
    report = make_report(out / "evaluation", out / "report", title="brainmclip demo (simulated NSD, miniature world)")
    lines = ["brainmclip demo: simulate -> prepare -> extract -> train -> predict -> reconstruct -> evaluate -> report",
             f"  data: {nsd.preset.name} simulated NSD, subjects {', '.join(map(str, DEMO_SUBJECTS))}, "
             f"{len(prepared[0].train)} train / {len(prepared[0].test)} test images each; miniature world: mini-CLIP "
             "targets and CLIP metric, mini-VD images (ImageNet metric networks random, marked †)"]
    n_test = len(prepared[0].test)
    agreement = _mean_scene_checks(evaluation)
    for method, values in evaluation["mean_over_subjects"].items():
        top1 = [e.retrieval["image"]["top1_n_way"] for e in evaluation["runs"] if e.method == method]
        image = np.mean([t["image_retrieval"]["mean"] for t in top1])
        brain = np.mean([t["brain_retrieval"]["mean"] for t in top1])
        lines.append(f"  {method:<12} {min(300, n_test)}-way top-1 image / brain retrieval {image:.3f} / {brain:.3f} "
                     f"(chance {1 / min(300, n_test):.3f}); PixCorr {values['PixCorr']:.3f}, "
                     f"SSIM {values['SSIM']:.3f}, CLIP 2-way {100 * values['CLIP']:.1f}%, "
                     f"category agreement {100 * agreement.get(method, float('nan')):.1f}%")
    lines.append(f"report: {report}")
    return "\n".join(lines)


def _mean_scene_checks(evaluation: dict) -> dict[str, float]:
    """Mean over subjects of each method's category agreement (reconstruction's zero-shot category vs the scene)."""
    values: dict[str, list[float]] = {}
    for entry in evaluation["runs"]:
        if "category_agreement" in entry.scene_checks:
            values.setdefault(entry.method, []).append(entry.scene_checks["category_agreement"])
    return {m: float(np.mean(v)) for m, v in values.items()}
