"""Command line: thin wiring over the Python API, one subcommand per stage.

Every error a user can cause (bad arguments, missing or malformed files) ends as one line on
stderr and a non-zero exit; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from brainmclip import __version__
from brainmclip.errors import BrainmclipError, InvalidInputError

__all__ = ["main"]

log = logging.getLogger("brainmclip")


def _subject_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of subject numbers, e.g. 1,2") from None


def _add_simulate(sub) -> None:
    from brainmclip.data.synthetic import list_presets

    p = sub.add_parser("simulate", help="write a simulated NSD tree (official file names and formats)",
                       description="Write a simulated Natural Scenes Dataset with NSD's file layout.")
    p.add_argument("--out", required=True, type=Path, help="output folder (empty or missing)")
    p.add_argument("--preset", default="tiny", choices=list_presets(),
                   help="tiny: tests (seconds); small: the demo; nsd: real NSD sizes (default: tiny)")
    p.add_argument("--subjects", default=[1], type=_subject_list, help="comma-separated NSD subjects 1-8 (default: 1)")
    p.add_argument("--seed", default=0, type=int, help="random seed; same seed, same bytes (default: 0)")
    p.add_argument("--sessions", default=None, type=int,
                   help="write only the first K sessions per subject (a full nsd preset is tens of GB)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args) -> int:
    from brainmclip.data.synthetic import make_synthetic_nsd

    result = make_synthetic_nsd(args.out, preset=args.preset, subjects=args.subjects, seed=args.seed,
                                sessions=args.sessions, force=args.force, progress=not args.quiet)
    print(result.summary())
    return 0


def _session_list(text: str) -> tuple[int, ...]:
    """'1-37', '1,2,5' or '1-3,7' -> sessions."""
    sessions: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                sessions.extend(range(int(a), int(b) + 1))
            elif part.strip():
                sessions.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a session list like 1-37 or 1,2,5") from None
    return tuple(sessions)


def _add_prepare(sub) -> None:
    from brainmclip.data.prepare import NORMALIZATIONS, TEST_SETS

    p = sub.add_parser("prepare", help="NSD files (official or published formats) to a prepared subject dataset",
                       description="Build the prepared dataset every later stage reads: per image (or trial) the "
                                   "nsdgeneral fMRI vector, NSD id, captions, stimulus and trial ids; voxel masks, ROI "
                                   "labels and BrainMCLIP voxel groups.")
    p.add_argument("--nsd-root", type=Path, help="NSD root (official layout; a simulated tree works too)")
    p.add_argument("--subject", required=True, type=int, help="NSD subject 1-8")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--test-set", default=None, choices=TEST_SETS,
                   help="old: sessions 1-37, 982 test images (most papers; default for NSD); new: all sessions, "
                        "1000 (MindEye2; default for --format mindeye2)")
    p.add_argument("--sessions", type=_session_list,
                   help="explicit sessions, e.g. 1-20 (overrides the test set's range)")
    p.add_argument("--betas-version", default="betas_fithrf_GLMdenoise_RR", help="betas folder under func1pt8mm")
    p.add_argument("--normalize", default=None, choices=(*NORMALIZATIONS, "zscore"),
                   help="session: per-session z-score with train trials (default for NSD, leakage-safe); "
                        "brain-diffuser: average, then z-score with every non-test image (train and val, sd ddof=1); "
                        "none: as the files hold them (default for published NSD formats, which their authors "
                        "normalised already); zscore: god only (its default), per voxel with the train and val rows")
    p.add_argument("--single-trial", action="store_true", help="keep repeats as separate rows")
    p.add_argument("--val-size", type=int, help="images held out from the end of train (default: 859/8859 of train)")
    p.add_argument("--detail-voxels", default="roi", choices=("roi", "nsdgeneral"),
                   help="fMRI-Detail: prf-visualrois ∪ floc (roi, default) or all nsdgeneral voxels")
    p.add_argument("--no-images", action="store_true", help="do not copy the stimuli")
    p.add_argument("--captions-file", type=Path, help="COCO_73k_annots_curated.npy instead of COCO caption JSON")
    p.add_argument("--full-hash", action="store_true", help="SHA-256 every input (default: size+mtime above 64 MB)")
    p.add_argument("--force", action="store_true", help="replace an existing prepared dataset with other settings")
    p.add_argument("--keep-work", action="store_true", help="keep the per-session intermediate files")
    p.add_argument("--format", default="nsd", choices=("nsd", "brain-diffuser", "mindeye1", "mindeye2", "god"),
                   help="input format: official NSD tree (default), a published preprocessed NSD format, or the "
                        "Generic Object Decoding dataset's BData files (god)")
    p.add_argument("--input", type=Path, help="folder of the published format (with --format other than nsd; for "
                                              "god: SubjectN.h5 or its folder)")
    p.add_argument("--images", type=Path, help="god: folder of the stimulus images (n01518878_5958.JPEG ...)")
    p.add_argument("--class-names", type=Path, help="god: 'wnid,name' lines (default: the WordNet ids as names)")
    p.add_argument("--image-size", type=int, default=256, help="god: side of the stored square images (default 256)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from brainmclip.data.prepare import PrepareOptions, prepare_subject

    god_only = [flag for flag, value in (("--images", args.images), ("--class-names", args.class_names))
                if value is not None]
    if args.format != "god" and (god_only or args.normalize == "zscore"):
        raise InvalidInputError(f"{', '.join(god_only) or '--normalize zscore'}: for --format god only")
    if args.format == "god":
        from brainmclip.data.god import prepare_god

        if args.input is None:
            raise InvalidInputError("--input is required for --format god (SubjectN.h5 or its folder)")
        if args.normalize not in (None, "zscore", "none"):
            raise InvalidInputError(f"--normalize {args.normalize}: GOD takes zscore (default) or none")
        prepared = prepare_god(args.input, args.subject, args.out, images=args.images, class_names=args.class_names,
                               val_size=args.val_size, force=args.force, progress=not args.quiet,
                               normalize=args.normalize or "zscore", image_size=args.image_size,
                               full_hash=args.full_hash)
    elif args.format == "nsd":
        if args.nsd_root is None:
            raise InvalidInputError("--nsd-root is required for --format nsd")
        options = PrepareOptions(test_set=args.test_set or "old", sessions=args.sessions, betas_version=args.betas_version,
                                 normalize=args.normalize or "session", single_trial=args.single_trial,
                                 val_size=args.val_size,
                                 detail_voxels=args.detail_voxels, images=not args.no_images,
                                 captions_file=str(args.captions_file) if args.captions_file else None,
                                 full_hash=args.full_hash)
        prepared = prepare_subject(args.nsd_root, args.subject, args.out, options, force=args.force,
                                   keep_work=args.keep_work, progress=not args.quiet)
    else:
        from brainmclip.data.published import prepare_published

        if args.input is None:
            raise InvalidInputError(f"--input is required for --format {args.format}")
        prepared = prepare_published(args.format, args.input, args.subject, args.out, nsd_root=args.nsd_root,
                                     normalize=args.normalize or "none", val_size=args.val_size,
                                     detail_voxels=args.detail_voxels, force=args.force, test_set=args.test_set,
                                     images=not args.no_images, single_trial=args.single_trial,
                                     full_hash=args.full_hash)
    print(prepared.summary())
    return 0


def _layer_range(text: str) -> tuple[int, ...]:
    layers = _session_list(text)
    if not layers:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer; expected e.g. 11-20")
    return layers


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="CLIP features of every image of prepared datasets into a feature store",
                       description="Compute e_I,D (mean of projected, CLS-normalised vision layers), e_I,S (final "
                                   "layer) and E_T (caption-averaged projected text tokens) once per NSD image.")
    p.add_argument("--data", required=True, nargs="+", type=Path, help="prepared dataset folder(s)")
    p.add_argument("--model", default="openai/clip-vit-large-patch14",
                   help="local folder or cached hub id of CLIP ViT-L/14 (never downloaded); 'tiny' for the "
                        "random-initialised test model, random:vit_large_patch14 for a full-size random one")
    p.add_argument("--layers", default=tuple(range(11, 21)), type=_layer_range,
                   help="vision blocks averaged into the detail embedding (default 11-20)")
    p.add_argument("--final", default=24, type=int, help="vision block of the semantic embedding (default 24)")
    p.add_argument("--merge", default="project-then-average", choices=("project-then-average", "average-then-project"))
    p.add_argument("--out", type=Path, help="feature store folder (default: features/<model> beside the first dataset)")
    p.add_argument("--batch-size", default=32, type=int)
    p.add_argument("--shard-size", default=256, type=int, help="images per shard file")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.set_defaults(func=_run_extract)


def _run_extract(args) -> int:
    from brainmclip.features.extract import extract_features

    out = args.out
    if out is None:
        slug = args.model.rstrip("/").replace("random:", "random-").split("/")[-1]
        out = args.data[0].resolve().parent.parent / "features" / slug
    result = extract_features(args.data, out, model=args.model, detail_layers=args.layers, semantic_layer=args.final,
                              merge=args.merge, batch_size=args.batch_size, shard_size=args.shard_size, cpu=args.cpu,
                              progress=not args.quiet)
    print(result.summary())
    return 0


def _add_train(sub) -> None:
    from brainmclip.models.registry import METHODS

    methods = "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())
    p = sub.add_parser("train", help="train a decoder (BrainMCLIP, BrainCLIP, ridge, ...) on a prepared dataset + "
                                     "feature store",
                       description=f"Train a decoder. Methods: {methods}. Options a method does not take are refused.")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    p.add_argument("--features", required=True, type=Path, help="CLIP feature store folder")
    p.add_argument("--config", action="append", default=None,
                   help="config name or JSON path; repeat to layer files (default: the method's own, e.g. "
                        "brain_mclip, brainclip_linear_v, ridge). Names: brain_mclip_tiny, ablations/text_only, "
                        "brainclip_vae_vt, ridge_clip_v, ...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5")
    p.add_argument("--method", default="brain_mclip", choices=tuple(METHODS))
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (from its beginning if it has none yet)")
    p.add_argument("--force", action="store_true",
                   help="delete the run (and its predictions) in --out first; files train did not write stay")
    p.add_argument("--stop-after-steps", type=int, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from brainmclip.models.registry import get_method

    method = get_method(args.method)
    given = {"config": args.config, "overrides": args.overrides, "resume": args.resume,
             "stop_after_steps": args.stop_after_steps, "cpu": args.cpu}
    method.check_options(given)
    kwargs = {k: v for k, v in given.items() if k in method.options}
    result = method.train(args.data, args.features, args.out, force=args.force, progress=not args.quiet, **kwargs)
    print(result.summary())
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="a run's predicted embeddings for one split (shared prediction format)")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", type=Path, help="prediction folder (default: RUN/predictions_<split>)")
    p.add_argument("--data", type=Path, help="prepared dataset (default: the one the run was trained on)")
    p.set_defaults(func=_run_predict)


def _run_predict(args) -> int:
    from brainmclip.models.predictions import load_predictions
    from brainmclip.training.predict import predict

    out = predict(args.run, args.split, args.out, args.data)
    pred = load_predictions(out)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k in ("image", "text", "image_semantic", "image_detail")
                       if (v := getattr(pred, k)) is not None)
    print(f"{pred.method} predictions for subject {pred.subject} {pred.split} at {out}: {len(pred)} images; {shapes}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters of a decoder config per module and in total")
    p.add_argument("--config", action="append", default=None, help="as for train (default: brain_mclip)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", type=Path, help="prepared dataset (gives the voxel counts)")
    p.add_argument("--semantic-voxels", type=int, help="without --data: width of F_S")
    p.add_argument("--detail-voxels", type=int, help="without --data: width of F_D")
    p.add_argument("--embed-dim", type=int, default=768)
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from brainmclip.config import load_config
    from brainmclip.models.brain_mclip import BrainMCLIP, BrainMCLIPConfig

    cfg = load_config(args.config or ["brain_mclip"], args.overrides)
    data_cfg = cfg.get("data", {})
    if args.data:
        from brainmclip.data.prepared import load_prepared

        voxels = load_prepared(args.data, images=False).voxels
        n_s = len(voxels.group(data_cfg.get("semantic_group", "semantic")))
        n_d = len(voxels.group(data_cfg.get("detail_group", "detail")))
    elif args.semantic_voxels and args.detail_voxels:
        n_s, n_d = args.semantic_voxels, args.detail_voxels
    else:
        raise InvalidInputError("pass --data PREPARED or both --semantic-voxels and --detail-voxels")
    # Build on the meta device: counts without allocating 3 GB of weights.
    import torch

    with torch.device("meta"):
        model = BrainMCLIP(BrainMCLIPConfig.from_dict({**cfg.get("model", {}), "n_semantic_voxels": n_s,
                                                       "n_detail_voxels": n_d, "embed_dim": args.embed_dim}))
    counts = model.parameter_counts()
    print(f"BrainMCLIP ({' + '.join(args.config or ['brain_mclip'])}): F_S {n_s} voxels, F_D {n_d} voxels, "
          f"hidden {model.config.hidden_dim}, embed {args.embed_dim}")
    for name, value in counts.items():
        print(f"  {name:<24} {value:>14,d}  ({value / 1e6:8.1f}M)")
    print(f"  paper: 0.73B; this config: {counts['total'] / 1e9:.3f}B ({100 * (counts['total'] / 0.73e9 - 1):+.0f}%)")
    return 0


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="images from predicted embeddings with Versatile Diffusion (one PNG each)")
    p.add_argument("--pred", required=True, type=Path, help="prediction folder (brainmclip predict)")
    p.add_argument("--out", required=True, type=Path, help="reconstruction folder")
    p.add_argument("--generator", default="shi-labs/versatile-diffusion",
                   help="VD folder or cached hub id (never downloaded); 'tiny' for the random test model")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14",
                   help="CLIP for the unconditional embeddings and best-of-N ('tiny' with the tiny generator)")
    p.add_argument("--steps", type=int, default=20, help="UniPC steps (default 20)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--text-weight", type=float, default=0.4, help="share of the text condition (image: 1 - this)")
    p.add_argument("--uncond", default="clip", choices=("clip", "zeros"),
                   help="unconditional embeddings: CLIP of '' and a mid-grey image (default) or zeros")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--size", type=int, help="output side in pixels (default: the generator's, 512 for VD)")
    p.add_argument("--samples", type=int, default=1, help="N candidates per image, best by CLIP similarity")
    p.add_argument("--init-dir", type=Path, help="PNGs (nsd<id>.png) to start from, e.g. low-level reconstructions")
    p.add_argument("--strength", type=float, default=0.85, help="img2img strength with --init-dir")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per batch; the same size gives the same PNGs, another may change a few pixels by one "
                        "level (1: every image on its own)")
    p.add_argument("--force", action="store_true",
                   help="delete the PNGs this folder's manifest lists and make every image again (needed when the "
                        "predictions, models or settings changed)")
    p.set_defaults(func=_run_reconstruct)


def _run_reconstruct(args) -> int:
    from brainmclip.generation.reconstruct import ReconstructOptions, reconstruct

    options = ReconstructOptions(generator=args.generator, clip=args.clip, steps=args.steps,
                                 guidance_scale=args.guidance_scale, text_weight=args.text_weight, uncond=args.uncond,
                                 seed=args.seed, size=args.size, samples=args.samples,
                                 init_dir=str(args.init_dir) if args.init_dir else None, strength=args.strength,
                                 batch_size=args.batch_size)
    result = reconstruct(args.pred, args.out, options, force=args.force, progress=not args.quiet)
    print(f"{len(result)} reconstructions of {result.manifest['settings']['method']} predictions (subject "
          f"{result.manifest['settings']['subject']}) at {result.root}, {result.manifest['size']} px, "
          f"{result.manifest['seconds']:.1f} s")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="the field's 8 image metrics, retrieval and statistics for reconstructions; "
                                        "or embedding retrieval (Recall@K) of predictions",
                       description="With --recon: the eight image metrics, 300-way retrieval, intervals and paired "
                                   "tests of reconstruction folders. With --pred: fMRI -> image and fMRI -> text "
                                   "Recall@1/5/10 over all test items in CLIP's embedding space (BrainCLIP's table), "
                                   "shown by brainmclip report --analyses OUT.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--recon", nargs="+", type=Path, help="reconstruction folder(s), any subjects/methods")
    source.add_argument("--pred", nargs="+", type=Path, help="prediction folder(s) (brainmclip predict) for "
                                                             "embedding retrieval")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json/.csv/.md and per_image.npz")
    p.add_argument("--protocol", default="mindeye1", choices=("mindeye1", "brain-diffuser"),
                   help="mindeye1 (default: 256 px first, tensor resizes) or brain-diffuser (its scripts: pixel "
                        "metrics at the ground truth's native size, networks at 224 px PIL)")
    p.add_argument("--ssim", default=None, choices=("gaussian", "columnwise"),
                   help="override the protocol's SSIM (mindeye1: gaussian 2-D; brain-diffuser: columnwise, what "
                        "scikit-image <= 0.19 computed with multichannel=True on grey images)")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP for the CLIP metric ('tiny' for tests)")
    p.add_argument("--weights-dir", type=Path, help="folder with torchvision weight files (else the torch hub cache)")
    p.add_argument("--allow-random-metric-nets", action="store_true",
                   help="use random networks where weights are absent; those columns are marked uncalibrated")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--common-images", action="store_true",
                   help="score every folder only on the images all folders of its subject hold (e.g. beside a method "
                        "made with --limit on part of the test set)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from brainmclip.evaluation.evaluate import evaluate_reconstructions
    from brainmclip.evaluation.image_metrics import MetricProtocol

    _check_bootstrap(args.bootstrap)
    if args.pred:
        from brainmclip.evaluation.embedding_retrieval import evaluate_embedding_retrieval

        evaluate_embedding_retrieval(args.pred, args.out, n_boot=args.bootstrap, progress=not args.quiet)
        print((args.out / "retrieval.md").read_text())
        print(f"wrote {args.out}/retrieval.json, retrieval.md, figure.png (show it with brainmclip report --analyses "
              f"{args.out})")
        return 0
    protocol = MetricProtocol(name=args.protocol, ssim=args.ssim)
    report = evaluate_reconstructions(args.recon, args.out, protocol=protocol, clip_model=args.clip,
                                      weights_dir=args.weights_dir, allow_random=args.allow_random_metric_nets,
                                      n_boot=args.bootstrap, common_images=args.common_images)
    print((args.out / "metrics.md").read_text())
    print(f"wrote {args.out}/metrics.json, metrics.csv, metrics.md ({report['seconds']:.1f} s)")
    return 0


def _check_bootstrap(n: int) -> None:
    if n < 1:
        raise InvalidInputError(f"--bootstrap {n}: expected at least 1 resample for the 95% intervals")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="a static HTML report (grids, metric table, retrieval, curves) of an evaluation")
    p.add_argument("--eval", type=Path, help="folder written by brainmclip evaluate --recon (optional when "
                                             "--analyses give everything to show)")
    p.add_argument("--out", required=True, type=Path,
                   help="report folder (index.html + figures/): new, empty, or an earlier report (replaced)")
    p.add_argument("--title", default="brainmclip reconstructions")
    p.add_argument("--analyses", nargs="+", type=Path, default=[],
                   help="folders of `brainmclip analyze` / `brainmclip ablate` outputs (or folders holding them) "
                        "to show as sections of the report")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from brainmclip.evaluation.evaluate import make_report
    from brainmclip.evaluation.report import check_report_out

    if args.eval is None and not args.analyses:
        raise InvalidInputError("give --eval (an evaluation of reconstructions) and/or --analyses folders")
    check_report_out(args.out)  # refuse a folder that is not a report before reading the evaluation
    print(f"report: {make_report(args.eval, args.out, title=args.title, analyses=args.analyses)}")
    return 0


def _add_miniature(sub) -> None:
    p = sub.add_parser("miniature", help="train or check the miniature models (mini-CLIP, mini-VD, mini-SD)",
                       description="The small CLIP / Versatile Diffusion / Stable Diffusion that ship with brainmclip, "
                                   "trained on the simulated scene world. Each command is seeded and resumable; "
                                   "the shipped weights are what they produce.")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = msub.add_parser("train", help="train one model into --out (exported to OUT/model with a model card)")
    t.add_argument("model", choices=("clip", "vd", "sd"))
    t.add_argument("--out", required=True, type=Path, help="training folder (checkpoints, cache, log, model/)")
    t.add_argument("--clip", default="mini", help="mini-CLIP folder the vd / sd conditions come from (default: "
                                                  "the shipped one)")
    t.add_argument("--vae", default="mini", help="sd only: a mini-VD folder (or a VAE folder) whose VAE mini-SD "
                                                 "shares (default: the shipped mini-VD)")
    t.add_argument("--config", help="config name or JSON file (default: the model's own)")
    t.add_argument("--cache", type=Path, help="folder for rendered scene banks, shareable by the three trainings "
                                              "(default: OUT/cache)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    t.add_argument("--force", action="store_true", help="delete --out and start again")
    t.add_argument("--quality-scenes", type=int, help="held-out scenes for the model card's quality figures "
                                                      "(default: clip 500, vd / sd 100; fewer for a quick check)")
    t.set_defaults(func=_run_miniature_train)
    q = msub.add_parser("quality", help="measure a miniature model on held-out scenes (what its model card records)")
    q.add_argument("model", choices=("clip", "vd", "sd"))
    q.add_argument("--folder", default="mini", help="model folder (default: the shipped one)")
    q.add_argument("--clip", default="mini", help="mini-CLIP used to score vd / sd images")
    q.set_defaults(func=_run_miniature_quality)


def _run_miniature_train(args) -> int:
    import shlex

    command = "brainmclip miniature " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    if args.quality_scenes is not None and args.quality_scenes < 2:
        raise InvalidInputError(f"--quality-scenes {args.quality_scenes}: need at least 2 held-out scenes")
    kw = {"overrides": args.set, "force": args.force, "progress": not args.quiet, "command": command,
          "cache": args.cache, "quality_scenes": args.quality_scenes}
    if args.config:
        kw["config"] = args.config
    if args.model == "clip":
        from brainmclip.miniature.clip import train_mini_clip

        folder = train_mini_clip(args.out, **kw)
    elif args.model == "vd":
        from brainmclip.miniature.vd import train_mini_vd

        folder = train_mini_vd(args.out, clip=args.clip, **kw)
    else:
        from brainmclip.miniature.sd import train_mini_sd

        folder = train_mini_sd(args.out, clip=args.clip, vae=args.vae, **kw)
    from brainmclip.miniature.card import read_model_card

    card = read_model_card(folder)
    print(f"{card['name']} at {folder}: {card['parameters']:,} parameters, "
          f"{card['training']['seconds'] / 60:.1f} min of training")
    for key, value in card["quality"].items():
        if key != "layer_probes":
            print(f"  {key}: {value}")
    return 0


def _run_miniature_quality(args) -> int:
    import json

    from brainmclip.miniature import quality

    folder = args.folder
    if args.model == "clip":
        result = quality.clip_quality(folder)
    elif args.model == "vd":
        result = quality.vd_quality(folder, args.clip)
    else:
        result = quality.sd_quality(folder, args.clip)
    print(json.dumps(result, indent=2))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole chain on simulated data (what `make demo` runs)")
    p.add_argument("--out", default=Path("runs/demo"), type=Path, help="output folder (default: runs/demo)")
    p.add_argument("--tiny", action="store_true", help="a quick smoke run for tests: the tiny preset instead of "
                                                       "small, 10 denoising steps, metric networks at 112 px")
    p.add_argument("--seed", default=0, type=int)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from brainmclip.demo import run_synthetic_demo

    print(run_synthetic_demo(args.out, tiny=args.tiny, seed=args.seed, progress=not args.quiet))
    return 0


def _add_module_command(sub, name: str, module_name: str, help_text: str | None = None) -> None:
    """A subcommand whose arguments and action live in ``module_name`` (``add_arguments`` / ``run``)."""
    import importlib

    module = importlib.import_module(module_name)
    text = help_text or module.HELP
    p = sub.add_parser(name, help=text, description=text)
    module.add_arguments(p)
    p.set_defaults(func=module.run)


def _add_minddiffuser_commands(sub) -> None:
    from brainmclip.generation import minddiffuser

    text = "MindDiffuser: two-stage Stable Diffusion reconstruction from a MindDiffuser run's predictions"
    p = sub.add_parser("reconstruct-minddiffuser", help=text, description=text)
    minddiffuser.add_arguments(p)
    p.set_defaults(func=minddiffuser.run)
    text = ("MindDiffuser's Stage 2 (structural refinement) as a plug-in over any method's reconstructions "
            "(writes <method>+MindDiffuser)")
    p = sub.add_parser("refine", help=text, description=text)
    minddiffuser.add_refine_arguments(p)
    p.set_defaults(func=minddiffuser.run_refine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainmclip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"brainmclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch, MKL and OpenBLAS (default: OMP_NUM_THREADS if set, else every CPU "
                             "this process may use); idle threads spin briefly, then sleep (see brainmclip.threads)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simulate(sub)
    _add_module_command(sub, "simulate-god", "brainmclip.data.synthetic.god",
                        "write a simulated Generic Object Decoding dataset (BData HDF5 files + stimulus images)")
    _add_prepare(sub)
    _add_extract(sub)
    _add_module_command(sub, "extract-minddiffuser", "brainmclip.features.minddiffuser_targets",
                        "MindDiffuser's targets (SD text embedding c, SD VAE latent z, CLIP structural features) of "
                        "every image of prepared datasets into a feature store")
    _add_train(sub)
    _add_predict(sub)
    _add_info(sub)
    _add_reconstruct(sub)
    _add_module_command(sub, "reconstruct-clip", "brainmclip.generation.clip_guided",
                        "BrainCLIP: images of predicted CLIP embeddings by CLIP-guided Stable Diffusion (one PNG each)")
    _add_minddiffuser_commands(sub)
    _add_evaluate(sub)
    _add_module_command(sub, "classify", "brainmclip.evaluation.zero_shot")
    _add_report(sub)
    _add_miniature(sub)
    _add_analyze(sub)
    _add_sweep(sub)
    _add_ablate(sub)
    _add_demo(sub)
    return parser


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train BrainMCLIP over a grid of config values; compare on the validation split",
                       description="One run per grid point (resumable row by row), compared by validation 2-way "
                                   "identification; writes sweep.csv, a figure and a manifest for the report.")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    p.add_argument("--features", required=True, type=Path, help="CLIP feature store folder")
    p.add_argument("--out", required=True, type=Path, help="study folder (rerun to resume)")
    p.add_argument("--config", action="append", default=None, help="base config(s) (default: brain_mclip_tiny)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                   help="a config key and its values, e.g. loss.image.mse=1,10,100; repeat for a product grid")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every row, e.g. --set train.patience=8")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from brainmclip.config import load_config
    from brainmclip.studies.sweep import grid_rows, parse_grid, run_sweep
    from brainmclip.training.loop import check_train_config

    grid, base = parse_grid(args.grid), args.config or ["brain_mclip_tiny"]
    for row in grid_rows(grid):  # every row's settings, before the first row trains
        check_train_config(load_config([*base, *row.configs], [*args.overrides, *row.overrides]))
    results = run_sweep(args.data, args.features, args.out, grid, base, args.overrides, progress=not args.quiet)
    width = max(len(r["row"]) for r in results)
    print(f"{'setting':{width}s}  val 2-way  image  text   epoch  MSE share")
    for r in results:
        fmt = lambda v: f"{v:.4f}" if v is not None else "  -   "  # noqa: E731
        print(f"{r['row']:{width}s}  {r['val_score']:.4f}     {fmt(r['image_two_way'])} {fmt(r['text_two_way'])} "
              f"{r['best_epoch']:5d}  {r['mse_share']:.3f}")
    print(f"wrote {args.out}/sweep.csv and {args.out}/figure.png")
    return 0


def _add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="the BrainMCLIP paper's ablation table 3 (architecture) or 4 (loss) on our data",
                       description="Trains every row of the table, predicts, reconstructs and evaluates the test set "
                                   "per subject (resumable row by row), then writes OUT/table<N>/ (table.md, table.csv, "
                                   "figure.png, manifest.json for the report) with the paper's numbers beside ours.")
    p.add_argument("--data", required=True, action="append", type=Path,
                   help="prepared dataset folder; repeat for several subjects (the table averages them)")
    p.add_argument("--features", required=True, type=Path, help="CLIP feature store folder")
    p.add_argument("--out", required=True, type=Path, help="study folder (rerun to resume; both tables may share it)")
    p.add_argument("--table", type=int, default=3, choices=(3, 4), help="3: architecture, 4: loss (default 3)")
    p.add_argument("--config", action="append", default=None, help="base config(s) (default: brain_mclip)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every row")
    p.add_argument("--generator", default="shi-labs/versatile-diffusion", help="as for reconstruct ('mini' for the "
                                                                              "miniature world)")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14",
                   help="CLIP for reconstruction and the CLIP metric ('mini' with --generator mini)")
    p.add_argument("--steps", type=int, default=20, help="diffusion steps per image")
    p.add_argument("--allow-random-metric-nets", action="store_true",
                   help="use random networks where metric weights are absent; those columns are marked uncalibrated")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--metrics", type=lambda text: [m.strip() for m in text.split(",") if m.strip()], default=None,
                   help="comma-separated subset of the eight metrics, e.g. PixCorr,SSIM,CLIP (default: all)")
    p.set_defaults(func=_run_ablate)


def _run_ablate(args) -> int:
    from brainmclip.config import load_config
    from brainmclip.generation.reconstruct import ReconstructOptions
    from brainmclip.studies.ablate import run_ablation
    from brainmclip.training.loop import check_train_config

    _check_bootstrap(args.bootstrap)
    check_train_config(load_config(args.config or ["brain_mclip"], args.overrides))  # before the first row trains
    options = ReconstructOptions(generator=args.generator, clip=args.clip, steps=args.steps, batch_size=50)
    run_ablation(args.table, args.data, args.features, args.out, args.config or ["brain_mclip"], args.overrides,
                 options, clip_model=args.clip, allow_random=args.allow_random_metric_nets, n_boot=args.bootstrap,
                 metrics=args.metrics, progress=not args.quiet)
    folder = args.out / f"table{args.table}"
    print((folder / "table.md").read_text())
    print(f"wrote {folder}/table.md, table.csv, figure.png (show it with brainmclip report --analyses {folder})")
    return 0


def _add_analyze(sub) -> None:
    import importlib
    import importlib.util

    from brainmclip.analysis import ANALYSES

    p = sub.add_parser("analyze", help="the BrainMCLIP paper's analyses (RSA, layer CKA, layer sweep, ...)",
                       description="Each analysis writes its numbers (npz/csv), a figure and manifest.json into "
                                   "--out; `brainmclip report --analyses` shows them.")
    asub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name in ANALYSES:
        if importlib.util.find_spec(f"brainmclip.analysis.{name}") is None:
            continue
        module = importlib.import_module(f"brainmclip.analysis.{name}")
        a = asub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(a)
        a.set_defaults(func=_run_analysis(module))


def _run_analysis(module):
    def run(args) -> int:
        from brainmclip.atomic import output_lock

        with output_lock(args.out):
            print(module.run(args))
        return 0
    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # The terminal shows `level`; log files that stages attach (train.log, simulate.log) always get INFO.
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=min(level, logging.INFO), handlers=[console], force=True)
    try:
        from brainmclip.threads import apply_thread_policy

        policy = apply_thread_policy(args.threads)  # before any command imports torch
        log.debug("threads: %(threads)d, OpenMP wait: %(wait)s", policy)
        return args.func(args)
    except (BrainmclipError, OSError) as exc:
        # Our own error type says what is wrong with the user's inputs; an operating-system error that names its
        # file (permission denied, disk full) is the user's to fix too. Anything else is a bug: its traceback shows.
        if not isinstance(exc, BrainmclipError) and getattr(exc, "filename", None) is None:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"brainmclip {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"brainmclip {args.command}: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130


# Commands that keep their finished work and pick up where they stopped when run again.
_RESUMABLE = ("simulate", "simulate-god", "prepare", "extract", "extract-minddiffuser", "reconstruct", "reconstruct-clip",
              "reconstruct-minddiffuser", "refine", "sweep", "ablate", "miniature", "demo")


def _after_interrupt(args) -> str:
    """What to run after Ctrl-C, true for the command that was interrupted."""
    if args.command == "train" and args.method in ("brain_mclip", "brainclip"):
        if args.resume:
            return "rerun the same command to continue from the last checkpoint"
        return "rerun it with --resume added to continue from the last checkpoint"
    if args.command in _RESUMABLE and getattr(args, "action", "train") == "train":
        return "rerun the same command to resume"
    return "rerun the same command to start it again"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
