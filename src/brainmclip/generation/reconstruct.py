"""``reconstruct``: predicted embeddings (any method) to one PNG per test image with Versatile Diffusion.

Each image gets its own seeded generator (seed, NSD id, sample k), so pixels do not depend on
batching or on which images a resumed run still had to make. A PNG appears under its final
name only once written; a rerun with the same settings makes only the missing ones. With
``samples`` > 1 the candidate whose CLIP image embedding is closest to the predicted Ê_I is
kept (best-of-N); candidates are embedded exactly as the predictions' targets were (the feature
store's layers and merge, and the fused or single-path target the decoder learned), so both
sides of the comparison live in one space. Predictions without Ê_I (a text-only decoder) are
generated from VD's text condition alone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from brainmclip import __version__
from brainmclip.atomic import atomic_path, read_manifest, remove_stale_temporaries, write_json_atomic
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError
from brainmclip.models.predictions import load_predictions
from brainmclip.paths import record_path, resolve_path
from brainmclip.types import GeneratedImages

__all__ = ["ReconstructOptions", "reconstruct", "load_reconstructions", "image_seed"]

log = logging.getLogger("brainmclip.reconstruct")
RECON_FORMAT = "brainmclip-reconstructions/1"


@dataclass(frozen=True)
class ReconstructOptions:
    """Settings of a reconstruction run (saved in its manifest).

    ``generator``: a VD folder or cached hub id, 'mini' (mini-VD, trained on the simulated scene
    world and shipped with the package) or 'tiny' (random test model). ``clip``: the CLIP model
    that embeds the unconditional "" and mid-grey image and scores best-of-N candidates; it must
    be the CLIP the predictions' targets came from ('mini' with 'mini', 'tiny' with 'tiny').
    ``uncond``: 'clip' (VD's own choice) or 'zeros'. ``size``: output side in pixels (default:
    the generator's native size, 512 for VD). ``init_dir``: PNGs named like the outputs (``nsd<id>.png``) to start from
    (img2img at ``strength``), e.g. a low-level reconstruction.
    """

    generator: str = "shi-labs/versatile-diffusion"
    clip: str = "openai/clip-vit-large-patch14"
    steps: int = 20
    guidance_scale: float = 5.0
    text_weight: float = 0.4
    uncond: str = "clip"
    seed: int = 42
    size: int | None = None
    samples: int = 1
    init_dir: str | None = None
    strength: float = 0.85
    batch_size: int = 8

    def __post_init__(self):
        if self.uncond not in ("clip", "zeros"):
            raise InvalidInputError(f"Unknown uncond={self.uncond!r}; choose 'clip' (empty text + grey image) or 'zeros'")
        if self.samples < 1 or self.steps < 1 or self.batch_size < 1:
            raise InvalidInputError("samples, steps and batch_size must be positive")
        if not 0 <= self.text_weight <= 1:
            raise InvalidInputError(f"text_weight={self.text_weight}; expected a share in [0, 1]")


def image_seed(seed: int, nsd_id: int, sample: int) -> int:
    """The seed of one candidate: independent of batch size and of resumption."""
    return (int(seed) * 1_000_003 + int(nsd_id) * 101 + int(sample)) % (2**63 - 1)


def _png_name(nsd_id: int) -> str:
    return f"nsd{int(nsd_id):05d}.png"


def _load_generator(name: str, device, dtype):
    from brainmclip.generation.versatile_diffusion import load_versatile_diffusion, tiny_versatile_diffusion

    if name == "tiny":
        return tiny_versatile_diffusion().to(device=device, dtype=dtype), {"generator": "random:tiny"}
    return load_versatile_diffusion(name, device=device, dtype=dtype), {"generator": name}


def _check_predictions(pred, embed_dim: int, path: Path, image_tokens: int | None, text_tokens: int | None) -> None:
    """Predictions must have the generator's width and, when the CLIP is known, that CLIP's token counts."""
    if pred.image is None and pred.text is None:
        raise InvalidInputError(f"{path}: predictions hold neither an image nor a text embedding")
    for name, value, tokens in (("image", pred.image, image_tokens), ("text", pred.text, text_tokens)):
        if value is None:
            continue
        want = (tokens if tokens is not None else value.shape[1], embed_dim)
        if value.ndim != 3 or value.shape[1:] != want:
            raise InvalidInputError(f"{path}/{name}.npy: shape {tuple(value.shape)}; the generator and CLIP expect "
                             f"(n, {want[0]}, {want[1]})")


def reconstruct(pred_dir, out, options: ReconstructOptions | None = None, force: bool = False,
                progress: bool = True) -> GeneratedImages:
    """Reconstruct every image of a prediction folder into ``out`` (one PNG each, plus a manifest)."""
    from brainmclip.features.clip_extractor import ClipFeatureExtractor
    from brainmclip.features.clip_models import load_clip

    start = time.perf_counter()
    options = options or ReconstructOptions()
    pred_dir, out = Path(pred_dir), Path(out)
    pred = load_predictions(pred_dir)
    if pred.image is None and options.samples > 1:
        raise InvalidInputError(f"{pred_dir}: best-of-N (samples={options.samples}) compares candidates with the predicted "
                         "image embedding, and these text-only predictions have none; use samples=1")
    settings = {"options": asdict(options), "predictions": record_path(pred_dir, out),
                "predictions_manifest": pred.manifest.get("run"), "method": pred.method, "subject": pred.subject}
    manifest_file = out / "manifest.json"
    if manifest_file.exists():
        previous = json.loads(manifest_file.read_text())
        if not _same_settings(previous.get("settings"), settings, out) and not force:
            raise OutputInTheWayError(f"{out} holds reconstructions made with other settings; pass --force or choose "
                                  "another --out")
    elif out.exists() and any(p.suffix == ".png" for p in out.iterdir()) and not force:
        raise OutputInTheWayError(f"{out} holds PNGs without a manifest; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)

    # bf16 on GPU only: bf16 matmuls are very slow on most CPUs.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator, identity = _load_generator(options.generator, device, dtype)
    needs_clip = options.uncond == "clip" or options.samples > 1
    extractor = None
    if needs_clip:
        towers = load_clip(options.clip, device=device)
        last = towers.n_vision_layers  # VD's unconditional image is the last layer's tokens of a grey image
        layers = _target_layers(pred, pred_dir) if options.samples > 1 else {}
        extractor = ClipFeatureExtractor(towers, detail_layers=layers.get("detail_layers", (last,)),
                                         semantic_layer=layers.get("semantic_layer", last),
                                         merge=layers.get("merge", "project-then-average"))
        if towers.embed_dim != generator.embed_dim:
            raise InvalidInputError(f"CLIP {options.clip!r} embeds in {towers.embed_dim} dims but the generator "
                             f"expects {generator.embed_dim}")
    _check_predictions(pred, generator.embed_dim, pred_dir, extractor and extractor.towers.n_image_tokens,
                       extractor and extractor.towers.context_length)
    uncond_image = uncond_text = None
    if options.uncond == "clip":
        size = extractor.image_size
        grey = np.full((1, size, size, 3), 128, np.uint8)
        uncond_image = _last_layer_tokens(extractor, grey)[0]
        uncond_text = extractor.encode_texts([""])[0]
    size = options.size or generator.image_unet.config.sample_size * generator.vae_scale_factor
    previous_images = (json.loads(manifest_file.read_text()).get("images", {}) if manifest_file.exists() else {})
    write_json_atomic(manifest_file, {"format": RECON_FORMAT, "settings": settings, "generator": identity,
                                      "size": size, "complete": False, "images": previous_images,
                                      "code_version": __version__})

    ids = np.asarray(pred.stimulus_ids)
    todo = [i for i, nsd_id in enumerate(ids) if not (out / _png_name(nsd_id)).exists()]
    records = dict(previous_images)
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="reconstruct", unit="img", disable=not progress)
    for b in range(0, len(todo), options.batch_size):
        rows = todo[b:b + options.batch_size]
        image = torch.as_tensor(np.asarray(pred.image[rows], np.float32)).to(device, dtype) \
            if pred.image is not None else None
        text = torch.as_tensor(np.asarray(pred.text[rows], np.float32)).to(device, dtype) if pred.text is not None \
            else None
        init = _init_images(options, ids[rows]) if options.init_dir else None
        candidates = []
        for k in range(options.samples):
            gens = [torch.Generator(device).manual_seed(image_seed(options.seed, ids[r], k)) for r in rows]
            candidates.append(generator.generate(
                image, text, num_inference_steps=options.steps, guidance_scale=options.guidance_scale,
                text_weight=(options.text_weight if image is not None else 1.0) if text is not None else 0.0,
                uncond_image=uncond_image,
                uncond_text=uncond_text if text is not None else None, generator=gens, init_images=init,
                strength=options.strength, height=size, width=size))
        chosen, scores = _choose(candidates, pred.image[rows] if pred.image is not None else None, extractor,
                                 _branches(pred, pred_dir))
        for j, r in enumerate(rows):
            pixels = candidates[chosen[j]][j]
            with atomic_path(out / _png_name(ids[r])) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
            records[str(int(ids[r]))] = {"sample": int(chosen[j]), "scores": [round(float(s), 6) for s in scores[j]],
                                         "seed": image_seed(options.seed, ids[r], int(chosen[j]))}
            bar.update(1)
        write_json_atomic(manifest_file, {"format": RECON_FORMAT, "settings": settings, "generator": identity,
                                          "size": size, "complete": False, "images": records,
                                          "code_version": __version__})
    bar.close()
    write_json_atomic(manifest_file, {"format": RECON_FORMAT, "settings": settings, "generator": identity,
                                      "size": size, "complete": True, "images": records, "n_images": len(ids),
                                      "seconds": round(time.perf_counter() - start, 2), "code_version": __version__})
    log.info("reconstructed %d images (%d new) into %s", len(ids), len(todo), out)
    return load_reconstructions(out)


def _init_images(options: ReconstructOptions, ids) -> np.ndarray:
    folder = Path(options.init_dir)
    images = []
    for nsd_id in ids:
        path = folder / _png_name(nsd_id)
        if not path.is_file():
            raise MissingInputError(f"{path}: missing init image (expected one PNG per NSD id, named like the outputs)")
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB")))
    if len({im.shape for im in images}) > 1:
        raise InvalidInputError(f"{folder}: init images of different sizes")
    return np.stack(images)


def _same_settings(previous: dict | None, settings: dict, out: Path) -> bool:
    """Whether a folder's saved settings are ``settings``, comparing the recorded paths by where they lead.

    Older manifests record the predictions folder (and the run behind it) as absolute paths, newer
    ones relative to the manifest's folder; both name the same folders.
    """
    if previous is None:
        return False
    previous = dict(previous)
    current = json.loads(json.dumps(settings))
    for recorded in (previous, current):
        if recorded.get("predictions") is not None:
            recorded["predictions"] = str(resolve_path(recorded["predictions"], out).resolve())
    pred_base = Path(current["predictions"])
    for recorded in (previous, current):
        if recorded.get("predictions_manifest") is not None:
            recorded["predictions_manifest"] = str(resolve_path(recorded["predictions_manifest"], pred_base).resolve())
    return previous == current


def _run_of(pred, pred_dir: Path) -> tuple[dict, Path | None]:
    """The run.json behind predictions in ``pred_dir`` (empty if unknown) and its run folder."""
    recorded = pred.manifest.get("run")
    run_dir = resolve_path(recorded, pred_dir) if recorded else None
    run_file = run_dir / "run.json" if run_dir else None
    return (json.loads(run_file.read_text()) if run_file and run_file.is_file() else {}), run_dir


def _target_layers(pred, pred_dir: Path) -> dict:
    """The CLIP layers and merge of the feature store the predictions' decoder was trained on."""
    run, run_dir = _run_of(pred, pred_dir)
    features = resolve_path(run["features"], run_dir) if run.get("features") else None
    manifest = features / "manifest.json" if features else None
    if manifest is None or not manifest.is_file():
        raise MissingInputError(f"best-of-N embeds candidates like the decoder's targets, but the feature store "
                                f"behind the run {pred.manifest.get('run')!r} is not available ({features})")
    extractor = json.loads(manifest.read_text()).get("settings", {}).get("extractor", {})
    missing = {"detail_layers", "semantic_layer", "merge"} - set(extractor)
    if missing:
        raise InvalidInputError(f"{manifest}: no extractor settings {sorted(missing)}; not a feature store manifest")
    return {k: extractor[k] for k in ("detail_layers", "semantic_layer", "merge")}


def _branches(pred, pred_dir: Path) -> tuple[str, ...]:
    """Which image targets the decoder learned as Ê_I: both paths (fused) unless its model had only one."""
    branches = _run_of(pred, pred_dir)[0].get("model_config", {}).get("branches")
    return tuple(branches) if branches else ("image_semantic", "image_detail")


def _last_layer_tokens(extractor, images: np.ndarray) -> torch.Tensor:
    """Projected last-layer tokens (VD's image condition) whatever layers the extractor was built for."""
    if extractor.semantic_layer == extractor.towers.n_vision_layers:
        return extractor.encode_images(images)["image_semantic"]
    from brainmclip.features.clip_extractor import ClipFeatureExtractor

    last = extractor.towers.n_vision_layers
    return ClipFeatureExtractor(extractor.towers, (last,), last).encode_images(images)["image_semantic"]


def _choose(candidates: list[np.ndarray], predicted_image, extractor, branches=("image_semantic", "image_detail")
            ) -> tuple[np.ndarray, np.ndarray]:
    """Index of the best candidate per row, and all scores.

    Score: cosine, over the whole flattened token stack, between the predicted Ê_I and the
    candidate's own embedding in the same space (the fused or single-path target the decoder
    learned), as retrieval compares them.
    """
    from brainmclip.models.brain_mclip import image_target

    n = len(candidates[0])
    if len(candidates) == 1:
        return np.zeros(n, int), np.full((n, 1), np.nan)
    target = torch.as_tensor(np.asarray(predicted_image, np.float32)).reshape(n, -1)
    target = target / target.norm(dim=-1, keepdim=True)
    scores = np.empty((n, len(candidates)))
    for k, images in enumerate(candidates):
        emb = image_target(branches, extractor.encode_images(images)).float().reshape(n, -1)
        scores[:, k] = (emb / emb.norm(dim=-1, keepdim=True) * target).sum(-1).numpy()
    return scores.argmax(1), scores


def load_reconstructions(path) -> GeneratedImages:
    root = Path(path)
    manifest = read_manifest(root, RECON_FORMAT, "a reconstruction folder", "reconstruct")
    pred = load_predictions(resolve_path(manifest["settings"]["predictions"], root))
    ids = np.asarray(pred.stimulus_ids)
    return GeneratedImages(root, ids, [root / _png_name(i) for i in ids], manifest)
