"""``reconstruct``: predicted embeddings (any method) to one PNG per test image with Versatile Diffusion.

Each image gets its own seeded generator (seed, NSD id, sample k). Images are made in batches of
``batch_size`` consecutive test images; for a given batch size the pixels are always the same, also
after an interrupted run resumes (a batch that was cut short is made again whole, so each image is
computed in the same company as in an uninterrupted run, and only its missing PNGs are written).
Across batch sizes a few pixels may differ by one intensity level: batched matrix products round
differently from single ones. ``batch_size=1`` makes every image on its own.

The manifest records the identity of everything that decides the pixels: the content of the
prediction arrays, of the generator's and the CLIP's files, every pixel-changing option, init
images, best-of-N targets and the device's number format. A rerun with the same identity makes
only the missing images; a different identity is refused unless ``force``, which first removes the
PNGs the folder's manifest lists (only files this code wrote) and then makes every image again.
Each image's record is written to the manifest before its PNG, and a resumed run keeps only the
records whose PNG exists, so the final manifest lists every image exactly once.

With ``samples`` > 1 the candidate whose CLIP image embedding is closest to the predicted Ê_I is
kept (best-of-N); candidates are embedded exactly as the predictions' targets were (the feature
store's layers and merge, and the fused or single-path target the decoder learned), so both
sides of the comparison live in one space. Predictions without Ê_I (a text-only decoder) are
generated from VD's text condition alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from brainmclip import __version__
from brainmclip.atomic import (
    atomic_path,
    crash_point,
    locks_output,
    read_manifest,
    remove_stale_temporaries,
    write_json_atomic,
)
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError
from brainmclip.models.predictions import load_predictions
from brainmclip.paths import record_path, resolve_path
from brainmclip.types import GeneratedImages

__all__ = ["RECON_FORMAT", "ReconstructOptions", "ReconstructionFolder", "reconstruct", "reconstruction_identity",
           "load_reconstructions", "image_seed", "open_reconstruction_folder", "png_name", "check_finite_predictions",
           "model_file_sha256", "model_folder_identity", "model_identity"]

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
        if not np.isfinite(self.guidance_scale):
            raise InvalidInputError(f"guidance_scale={self.guidance_scale}; expected a finite number")


def image_seed(seed: int, nsd_id: int, sample: int) -> int:
    """The seed of one candidate: independent of batch size and of resumption."""
    return (int(seed) * 1_000_003 + int(nsd_id) * 101 + int(sample)) % (2**63 - 1)


def png_name(nsd_id: int) -> str:
    return f"nsd{int(nsd_id):05d}.png"


def _load_generator(name: str, device, dtype):
    from brainmclip.generation.versatile_diffusion import load_versatile_diffusion, tiny_versatile_diffusion

    if name == "tiny":
        return tiny_versatile_diffusion().to(device=device, dtype=dtype)
    return load_versatile_diffusion(name, device=device, dtype=dtype)


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


def check_finite_predictions(pred, path: Path, rows: int = 256) -> None:
    """NaN or inf in an embedding would become a black or noise image with exit 0: refuse it, naming the row."""
    for name in ("image", "text"):
        value = getattr(pred, name)
        if value is None:
            continue
        for start in range(0, len(value), rows):
            block = np.asarray(value[start:start + rows]).reshape(min(rows, len(value) - start), -1)
            bad = ~np.isfinite(block).all(1)
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                raise InvalidInputError(f"{path}/{name}.npy: row {row} (NSD id {int(pred.stimulus_ids[row])}) holds "
                                        "NaN or inf; expected finite embeddings (predict again from a healthy run)")


@locks_output()
def reconstruct(pred_dir, out, options: ReconstructOptions | None = None, force: bool = False,
                progress: bool = True) -> GeneratedImages:
    """Reconstruct every image of a prediction folder into ``out`` (one PNG each, plus a manifest).

    A folder made with the same identity (see the module's description) is resumed; one made with
    another is refused unless ``force``.
    """
    start = time.perf_counter()
    options = options or ReconstructOptions()
    pred_dir, out = Path(pred_dir), Path(out)
    pred = load_predictions(pred_dir)
    if pred.image is None and options.samples > 1:
        raise InvalidInputError(f"{pred_dir}: best-of-N (samples={options.samples}) compares candidates with the predicted "
                         "image embedding, and these text-only predictions have none; use samples=1")
    ids = np.asarray(pred.stimulus_ids)
    if len(np.unique(ids)) != len(ids):
        raise InvalidInputError(f"{pred_dir}/stimulus_ids.npy: repeated NSD ids; expected one prediction per image "
                                "(their PNGs would overwrite each other)")
    if len(ids) and ids.min() < 0:
        raise InvalidInputError(f"{pred_dir}/stimulus_ids.npy: NSD id {int(ids.min())}; expected ids >= 0 (a "
                                "prediction of an image whose NSD id the source did not record cannot be named)")
    check_finite_predictions(pred, pred_dir)
    # bf16 on GPU only: bf16 matmuls are very slow on most CPUs.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    settings = {"options": asdict(options), "predictions": record_path(pred_dir, out),
                "predictions_manifest": pred.manifest.get("run"), "method": pred.method, "subject": pred.subject}
    identity = reconstruction_identity(pred, pred_dir, options, device, dtype)
    folder = open_reconstruction_folder(out, ids, settings, identity, {"generator": options.generator,
                                                                       "clip": options.clip},
                                        options.batch_size, force)
    if folder.up_to_date():
        log.info("%s: all %d images already made with these inputs and settings", out, len(ids))
        return load_reconstructions(out)  # nothing to do: the folder is left exactly as it is
    size = options.size or (folder.previous or {}).get("size")
    if folder.chunks:
        size = _generate(pred, pred_dir, out, options, ids, folder.chunks, folder.done, folder.records, device, dtype,
                         folder.write_manifest, progress)
    folder.write_manifest(True, size, n_images=len(ids), seconds=round(time.perf_counter() - start, 2),
                          new_images=folder.n_new)
    log.info("reconstructed %d images (%d new) into %s", len(ids), folder.n_new, out)
    return load_reconstructions(out)


@dataclass
class ReconstructionFolder:
    """A reconstruction folder opened for (more) images: what is done, what is left, and its manifest writer.

    ``records`` (per-image entries of the manifest, keyed by NSD id) is filled by the generator as PNGs are
    written; :meth:`write_manifest` writes it with the folder's settings and identity.
    """

    out: Path
    ids: np.ndarray
    settings: dict
    identity: dict
    generator: dict
    previous: dict | None
    records: dict
    done: set
    chunks: list
    n_new: int

    def write_manifest(self, complete: bool, size, **extra) -> None:
        write_json_atomic(self.out / "manifest.json", {
            "format": RECON_FORMAT, "settings": self.settings, "identity": self.identity, "generator": self.generator,
            "size": size, "complete": complete, "images": self.records, "code_version": __version__, **extra})

    def up_to_date(self) -> bool:
        """Every image made before with the same inputs and settings: nothing to do."""
        previous = self.previous
        return (not self.chunks and previous is not None and bool(previous.get("complete"))
                and self.records == previous.get("images")
                and _without_batch_size(previous.get("settings")) == _without_batch_size(self.settings))


def open_reconstruction_folder(out: Path, ids: np.ndarray, settings: dict, identity: dict, generator: dict,
                               batch_size: int, force: bool) -> ReconstructionFolder:
    """Check ``out`` against a run with ``identity`` and open it: a folder made with another identity is refused
    unless ``force`` (which deletes the PNGs its manifest lists); otherwise finished images are kept and the
    batches still to make are listed (a batch with any image missing is made again whole)."""
    previous = _previous_manifest(out)
    records: dict[str, dict] = {}
    if previous is not None and previous.get("identity") != identity and not force:
        raise OutputInTheWayError(f"{out} holds reconstructions made from other inputs or settings (differing: "
                                  f"{', '.join(_differences(previous.get('identity'), identity))}); pass --force to "
                                  "replace them or choose another --out")
    if force:
        _remove_previous(out, previous)
    elif previous is None and out.is_dir() and any(_is_output_png(p) for p in out.iterdir()):
        raise OutputInTheWayError(f"{out} holds PNGs without a reconstruction manifest; choose another --out or pass "
                                  "--force to overwrite them")
    else:
        # Records are written before their PNGs: keep those whose PNG made it to disk.
        wanted = set(ids.tolist())
        records = {key: value for key, value in (previous or {}).get("images", {}).items()
                   if _record_key(key) in wanted and (out / png_name(_record_key(key))).is_file()}
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    done = {int(key) for key in records}
    chunks = [list(range(b, min(b + batch_size, len(ids)))) for b in range(0, len(ids), batch_size)]
    chunks = [rows for rows in chunks if any(int(ids[r]) not in done for r in rows)]
    n_new = sum(int(ids[r]) not in done for rows in chunks for r in rows)
    return ReconstructionFolder(out, ids, settings, identity, generator, previous, records, done, chunks, n_new)


def _generate(pred, pred_dir: Path, out: Path, options: ReconstructOptions, ids: np.ndarray, chunks: list[list[int]],
              done: set[int], records: dict, device, dtype, write_manifest, progress: bool) -> int:
    """Make the images of ``chunks`` (lists of rows), writing the missing ones; returns the output size."""
    from brainmclip.features.clip_extractor import ClipFeatureExtractor
    from brainmclip.features.clip_models import load_clip

    generator = _load_generator(options.generator, device, dtype)
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
        grey = np.full((1, extractor.image_size, extractor.image_size, 3), 128, np.uint8)
        uncond_image = _last_layer_tokens(extractor, grey)[0]
        uncond_text = extractor.encode_texts([""])[0]
    size = options.size or generator.image_unet.config.sample_size * generator.vae_scale_factor
    write_manifest(False, size)

    bar = tqdm(total=len(ids), initial=len(done), desc="reconstruct", unit="img", disable=not progress)
    for rows in chunks:
        # The whole batch is made even when part of it was written before an interruption: batched
        # arithmetic rounds by batch composition, and this keeps every image as an uninterrupted run makes it.
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
        missing = [j for j, r in enumerate(rows) if int(ids[r]) not in done]
        for j in missing:
            records[str(int(ids[rows[j]]))] = {"sample": int(chosen[j]),
                                               "scores": [round(float(s), 6) for s in scores[j]],
                                               "seed": image_seed(options.seed, ids[rows[j]], int(chosen[j])),
                                               "batch_size": options.batch_size}
        write_manifest(False, size)  # records first: a record without its PNG is dropped when resuming
        for j in missing:
            with atomic_path(out / png_name(ids[rows[j]])) as tmp:
                Image.fromarray(candidates[chosen[j]][j]).save(tmp, format="PNG")
            crash_point("reconstruct-image")
            done.add(int(ids[rows[j]]))
            bar.update(1)
    bar.close()
    return size


_PNG_NAME = re.compile(r"nsd\d{5,}\.png")


def _is_output_png(path: Path) -> bool:
    return bool(_PNG_NAME.fullmatch(path.name))


def _record_key(key) -> int | None:
    try:
        return int(key)
    except (TypeError, ValueError):
        return None


def _previous_manifest(out: Path) -> dict | None:
    """The reconstruction manifest already in ``out`` (None if there is none); refuses anything else."""
    if out.exists() and not out.is_dir():
        raise OutputInTheWayError(f"--out {out}: exists and is not a folder; choose another --out")
    manifest_file = out / "manifest.json"
    if not manifest_file.exists():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != RECON_FORMAT:
        kind = manifest.get("format") if isinstance(manifest, dict) else "unreadable"
        raise OutputInTheWayError(f"--out {out}: holds a manifest.json that is not a reconstruction manifest "
                                  f"({kind!r}), so it is some other output; choose another --out")
    return manifest


def _without_batch_size(settings: dict | None) -> dict | None:
    """Settings less the batch size, which each image's record keeps for itself."""
    if not isinstance(settings, dict):
        return None
    return {**settings, "options": {k: v for k, v in settings.get("options", {}).items() if k != "batch_size"}}


def _remove_previous(out: Path, previous: dict | None) -> None:
    """Remove the PNGs a previous manifest lists; the manifest itself is replaced by the next write."""
    for key in (previous or {}).get("images", {}):
        nsd_id = _record_key(key)
        if nsd_id is not None:
            (out / png_name(nsd_id)).unlink(missing_ok=True)


def _differences(previous: dict | None, current: dict) -> list[str]:
    """Names of the identity entries that differ (for the refusal message)."""
    if not isinstance(previous, dict):
        return ["no identity recorded (made by an older brainmclip)"]
    differing = []
    for key in sorted(set(previous) | set(current)):
        a, b = previous.get(key), current.get(key)
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            differing += [name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
        elif a != b:
            differing.append(key)
    return differing or ["identity"]


def model_file_sha256(path: Path) -> str:
    """sha256 of a file; a Hugging Face cache link names its blob by content hash, which is used as it is."""
    from brainmclip.integrity import sha256_file

    target = path.resolve()
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", target.name):
        return target.name
    return sha256_file(target)


_MODEL_FILES = (".json", ".txt", ".safetensors", ".bin", ".model")


def model_folder_identity(folder: Path) -> str:
    """One sha256 over the configuration and weight files under ``folder`` (names relative to it)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.name.endswith(_MODEL_FILES) and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{model_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def model_identity(name: str, kind: str) -> str:
    """What identifies a generator or CLIP ("generator" / "clip"): a random model's name, or its files' content.

    Names and paths are left out: a model folder that moved, or a hub id's local copy, is the same model.
    """
    if kind == "generator":
        if name == "tiny":
            return "random:tiny"
        from brainmclip.generation.versatile_diffusion import VD_COMPONENTS, generator_folder

        root = generator_folder(name)
        digest = hashlib.sha256()
        for component in VD_COMPONENTS:
            if (root / component).is_dir():
                digest.update(f"{component}\0{model_folder_identity(root / component)}\n".encode())
        return digest.hexdigest()
    from brainmclip.features.clip_models import resolve_model_folder

    folder = resolve_model_folder(name)
    return f"random:{name.removeprefix('random:')}" if folder is None else model_folder_identity(folder)


def reconstruction_identity(pred, pred_dir: Path, options: ReconstructOptions, device: str, dtype) -> dict:
    """Everything that decides the pixels of a reconstruction folder, as comparable JSON.

    Predictions count by the content of the arrays generation reads (not by path, so a moved tree
    still matches); the generator and CLIP by the content of their files. ``batch_size`` is not part
    of it (see the module's description), nor are names and paths.
    """
    pixel_options = {k: v for k, v in asdict(options).items() if k not in ("batch_size", "generator", "clip",
                                                                          "init_dir")}
    if options.init_dir is None:
        pixel_options.pop("strength")
    used = ["stimulus_ids"] + [name for name in ("image", "text") if getattr(pred, name) is not None]
    needs_clip = options.uncond == "clip" or options.samples > 1
    return {
        "predictions": {name: model_file_sha256(pred_dir / f"{name}.npy") for name in used},
        "generator": model_identity(options.generator, "generator"),
        "clip": model_identity(options.clip, "clip") if needs_clip else None,
        "options": pixel_options,
        "init_images": _init_identity(options.init_dir, pred.stimulus_ids) if options.init_dir else None,
        "best_of_n": ({"target_layers": _target_layers(pred, pred_dir), "branches": list(_branches(pred, pred_dir))}
                      if options.samples > 1 else None),
        "number_format": {"device": device, "dtype": str(dtype)},
    }


def _init_identity(init_dir, ids) -> str:
    digest = hashlib.sha256()
    for nsd_id in ids:
        path = Path(init_dir) / png_name(nsd_id)
        if not path.is_file():
            raise MissingInputError(f"{path}: missing init image (expected one PNG per NSD id, named like the outputs)")
        digest.update(f"{png_name(nsd_id)}\0{model_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _init_images(options: ReconstructOptions, ids) -> np.ndarray:
    folder = Path(options.init_dir)
    images = []
    for nsd_id in ids:
        path = folder / png_name(nsd_id)
        if not path.is_file():
            raise MissingInputError(f"{path}: missing init image (expected one PNG per NSD id, named like the outputs)")
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB")))
    if len({im.shape for im in images}) > 1:
        raise InvalidInputError(f"{folder}: init images of different sizes")
    return np.stack(images)


def _run_of(pred, pred_dir: Path) -> tuple[dict, Path | None]:
    """The run.json behind predictions in ``pred_dir`` (empty if unknown) and its run folder."""
    from brainmclip.models.predictions import prediction_run

    run_dir, run = prediction_run(pred, pred_dir)
    return run, run_dir


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
    # A run limited to its first N predictions (a costly method on part of the test set) holds only those.
    ids = np.asarray(pred.stimulus_ids)[:manifest["settings"].get("limit")]
    return GeneratedImages(root, ids, [root / png_name(i) for i in ids], manifest)
