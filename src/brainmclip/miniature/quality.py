"""Quality of the miniature models, measured on held-out scenes (a stream no training and no simulation uses).

* :func:`clip_quality`: zero-shot category accuracy with caption-style prompt ensembles, image -> caption top-1
  among 100, and linear probes per vision layer (what each block carries: category, colour, background, position).
* :func:`vd_quality`: images generated from the *ground-truth* conditions of held-out scenes, scored with mini-CLIP
  2-way identification, zero-shot category agreement and PixCorr.
* :func:`sd_quality`: images generated from held-out captions, scored by zero-shot category agreement and
  caption retrieval.

A category prediction counts as right when it names any of the scene's largest objects
(:func:`brainmclip.miniature.world.scene_labels`).
"""

from __future__ import annotations

import numpy as np
import torch

from brainmclip.errors import InvalidInputError
from brainmclip.features.clip_extractor import ClipFeatureExtractor
from brainmclip.features.clip_models import ClipTowers, load_clip
from brainmclip.miniature.world import SceneBank, build_bank, zero_shot_prompts

__all__ = ["PROBE_LAYERS", "ZeroShotClassifier", "clip_quality", "layer_probes", "scene_category_agreement",
           "sd_quality", "vd_quality", "heldout_bank"]

PROBE_LAYERS = (1, 4, 8, 11, 16, 20, 24)


def _last_layer_extractor(towers: ClipTowers) -> ClipFeatureExtractor:
    last = towers.n_vision_layers
    return ClipFeatureExtractor(towers, detail_layers=(last,), semantic_layer=last)


def heldout_bank(n: int, size: int, seed: int = 0, start: int = 0) -> SceneBank:
    return build_bank(n, seed=seed, stream="heldout", size=size, start=start)


class ZeroShotClassifier:
    """Zero-shot category classifier: cosine to the mean normalised text embedding of each category's prompts."""

    def __init__(self, towers: ClipTowers):
        self.extractor = _last_layer_extractor(towers)
        prompts = zero_shot_prompts()
        text = self.extractor.text_embeds([p for group in prompts for p in group])
        text = text / text.norm(dim=-1, keepdim=True)
        weights = text.reshape(len(prompts), -1, text.shape[-1]).mean(1)
        self.weights = weights / weights.norm(dim=-1, keepdim=True)

    def logits(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        feats = torch.cat([self.extractor.image_embeds(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats @ self.weights.T

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(1).numpy()


def _correct(pred: np.ndarray, bank: SceneBank) -> np.ndarray:
    return bank.labels["main_categories"][np.arange(len(pred)), pred]


def scene_category_agreement(images: np.ndarray, scenes, classifier: ZeroShotClassifier) -> np.ndarray:
    """Per image: does its zero-shot category name one of the largest objects of its scene? bool (n,).

    ``images`` uint8 (n, H, W, 3) of any size (CLIP's preprocessing resizes them); ``scenes`` the matching
    :class:`~brainmclip.data.synthetic.scenes.Scene` objects.
    """
    from brainmclip.miniature.world import scene_labels

    if len(images) != len(scenes):
        raise InvalidInputError(f"{len(images)} images but {len(scenes)} scenes")
    pred = classifier.predict(images)
    return np.array([bool(scene_labels(scene)["main_categories"][p]) for p, scene in zip(pred, scenes, strict=True)])


def caption_retrieval(extractor: ClipFeatureExtractor, images: np.ndarray, captions: list[str],
                      group: int = 100) -> float:
    """Image -> caption top-1 among ``group`` candidates (consecutive groups of held-out scenes), mean over groups."""
    hits = []
    for start in range(0, len(images) - group + 1, group):
        img = extractor.image_embeds(images[start:start + group])
        txt = extractor.text_embeds(captions[start:start + group])
        sim = (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
        hits.append((sim.argmax(1) == torch.arange(group)).float().mean().item())
    return float(np.mean(hits))


@torch.no_grad()
def layer_probes(towers: ClipTowers, bank: SceneBank, layers=PROBE_LAYERS, n_train: int | None = None) -> dict:
    """Linear probes on each vision layer's tokens (all tokens flattened), trained on the first part of ``bank``.

    Returns ``{layer: {"category", "colour", "background": held-out accuracy, "x": held-out R^2 of the main
    object's horizontal position}}``. Features are the layer's hidden states (what ``hidden_states[k]`` holds).
    """
    from sklearn.linear_model import RidgeClassifierCV, RidgeCV

    extractor = _last_layer_extractor(towers)
    n_train = n_train or (2 * len(bank)) // 3
    hidden = []
    for start in range(0, len(bank), 250):
        pixels = extractor.preprocess(bank.images[start:start + 250])
        out = towers.vision.vision_model(pixel_values=pixels, output_hidden_states=True)
        hidden.append(torch.stack([out.hidden_states[k] for k in layers]).float())
    hidden = torch.cat(hidden, 1)
    alphas = np.logspace(-1, 5, 7)
    result = {}
    for i, k in enumerate(layers):
        x = hidden[i].reshape(len(bank), -1).numpy().astype(np.float64)
        x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
        tr, te = slice(0, n_train), slice(n_train, None)
        scores = {}
        for label in ("category", "colour", "background"):
            y = bank.labels[label]
            scores[label] = round(float(RidgeClassifierCV(alphas=alphas).fit(x[tr], y[tr]).score(x[te], y[te])), 3)
        y = bank.labels["x"]
        scores["x"] = round(float(RidgeCV(alphas=alphas).fit(x[tr], y[tr]).score(x[te], y[te])), 3)
        result[int(k)] = scores
    return result


@torch.no_grad()
def clip_quality(clip="mini", n: int = 500, n_probe: int = 1500, seed: int = 0, progress: bool = False) -> dict:
    towers = load_clip(str(clip))
    size = towers.vision.config.image_size
    bank = heldout_bank(max(n, n_probe), size, seed)
    images = bank.images[:n]
    classifier = ZeroShotClassifier(towers)
    pred = classifier.predict(images)
    extractor = classifier.extractor
    first_captions = [c[0] for c in bank.captions[:n]]
    return {
        "heldout_scenes": n,
        "zero_shot_category_accuracy": round(float(_correct(pred, SceneBank(images, [], {k: v[:n] for k, v in
                                                                                        bank.labels.items()}, seed,
                                                                                 "heldout")).mean()), 4),
        f"image_to_caption_top1_of_{min(100, n)}": round(caption_retrieval(extractor, images, first_captions,
                                                                             group=min(100, n)), 4),
        "layer_probes": layer_probes(towers, SceneBank(bank.images[:n_probe], [], {k: v[:n_probe] for k, v in
                                                                                    bank.labels.items()}, seed,
                                                         "heldout")),
    }


def ground_truth_conditions(extractor: ClipFeatureExtractor, bank: SceneBank) -> tuple[torch.Tensor, torch.Tensor]:
    """VD's conditions of each scene as the feature store computes them: last-layer image tokens and E_T."""
    image = extractor.encode_images(bank.images)["image_semantic"]
    text = extractor.encode_captions(bank.captions)
    return image, text


def generation_scores(generated: np.ndarray, bank: SceneBank, towers: ClipTowers) -> dict:
    """mini-CLIP 2-way identification, zero-shot category agreement and PixCorr of generated vs true images."""
    from brainmclip.evaluation.image_metrics import rowwise_pearson, two_way_identification

    classifier = ZeroShotClassifier(towers)
    extractor = classifier.extractor
    two_way, _ = two_way_identification(extractor.image_embeds(bank.images), extractor.image_embeds(generated))
    pred = classifier.predict(generated)
    truth = bank.images
    if truth.shape[1:] != generated.shape[1:]:
        raise InvalidInputError(f"generated images {generated.shape[1:]} and truth {truth.shape[1:]} differ in size")
    pixcorr = rowwise_pearson(torch.from_numpy(generated).float(), torch.from_numpy(truth).float())
    return {"clip_two_way": round(float(two_way), 4),
            "category_agreement": round(float(_correct(pred, bank).mean()), 4),
            "pixcorr": round(float(np.mean(pixcorr)), 4)}


@torch.no_grad()
def vd_quality(vd="mini", clip="mini", n: int = 100, seed: int = 0, steps: int = 20, guidance_scale: float = 5.0,
               text_weight: float = 0.4, progress: bool = False) -> dict:
    """Images from the ground-truth conditions of ``n`` held-out scenes, with reconstruct's default settings."""
    from brainmclip.generation.reconstruct import image_seed
    from brainmclip.generation.versatile_diffusion import load_versatile_diffusion
    from brainmclip.miniature.vd import unconditional_embeddings

    towers = load_clip(str(clip))
    generator = load_versatile_diffusion(str(vd))
    bank = heldout_bank(n, generator.image_unet.config.sample_size * generator.vae_scale_factor, seed,
                        start=_GENERATION_START)
    extractor = _last_layer_extractor(towers)
    image, text = ground_truth_conditions(extractor, bank)
    uncond_image, uncond_text = unconditional_embeddings(extractor)
    images = []
    for start in range(0, n, 50):
        rows = range(start, min(start + 50, n))
        gens = [torch.Generator().manual_seed(image_seed(seed, 10**6 + r, 0)) for r in rows]
        images.append(generator.generate(image[start:start + 50], text[start:start + 50], num_inference_steps=steps,
                                         guidance_scale=guidance_scale, text_weight=text_weight,
                                         uncond_image=uncond_image, uncond_text=uncond_text, generator=gens))
    generated = np.concatenate(images)
    return {"heldout_scenes": n, "settings": {"steps": steps, "guidance_scale": guidance_scale,
                                              "text_weight": text_weight, "conditions": "ground truth"},
            **generation_scores(generated, bank, towers)}


def sd_quality(sd="mini", clip="mini", n: int = 100, seed: int = 0, steps: int = 20, guidance_scale: float = 5.0,
               progress: bool = False) -> dict:
    """Images from the first caption of ``n`` held-out scenes (text only, so no PixCorr bar applies)."""
    from brainmclip.generation.stable_diffusion import load_stable_diffusion

    towers = load_clip(str(clip))
    pipe = load_stable_diffusion(str(sd))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    bank = heldout_bank(n, size, seed, start=_GENERATION_START)
    images = []
    for start in range(0, n, 50):
        rows = range(start, min(start + 50, n))
        gens = [torch.Generator().manual_seed(10**6 + r) for r in rows]
        out = pipe([bank.captions[r][0] for r in rows], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=gens, output_type="np", height=size, width=size)
        images.append((out.images * 255).round().astype(np.uint8))
    generated = np.concatenate(images)
    return {"heldout_scenes": n, "settings": {"steps": steps, "guidance_scale": guidance_scale,
                                              "conditions": "first caption"},
            **generation_scores(generated, bank, towers)}


# Generation checks use held-out scenes after the ones the CLIP checks use, so each figure has its own scenes.
_GENERATION_START = 10_000
