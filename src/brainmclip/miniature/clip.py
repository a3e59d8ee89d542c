"""mini-CLIP: a ``transformers`` CLIP trained contrastively on the miniature scene world.

The vision tower keeps what the pipeline relies on from ViT-L/14 (24 blocks, so "layers 11-20" and "layer 24"
keep their meaning; a CLS token; projected tokens) at a size a CPU trains in minutes: 64 px images in 8 px patches
(65 tokens), width 64. The text tower reads 32 tokens with a 700-token vocabulary: CLIP's own BPE restricted to the
merges the scene captions need (:func:`brainmclip.features.tokenizer.build_subset_vocab`), so captions split into
the same pieces as in real CLIP.

The exported folder is an ordinary transformers CLIP folder (``config.json``, ``model.safetensors`` in float16,
``vocab.json``, ``merges.txt``) that :func:`brainmclip.features.clip_models.load_clip` reads like real weights.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from brainmclip.config import check_keys, load_config
from brainmclip.errors import InvalidInputError
from brainmclip.features.clip_extractor import CLIP_MEAN, CLIP_STD
from brainmclip.features.tokenizer import (
    EOT_TOKEN,
    SOT_TOKEN,
    build_subset_vocab,
    load_clip_tokenizer,
    save_tokenizer_files,
    tokenize,
)
from brainmclip.miniature.card import write_model_card
from brainmclip.miniature.training import Phase, cosine_with_warmup, run_phase, training_folder
from brainmclip.miniature.world import (
    BACKGROUND_NAMES,
    CATEGORY_NAMES,
    COLOUR_NAMES,
    caption_vocabulary,
    load_or_build_bank,
    swap_category,
)

__all__ = ["MiniClipConfig", "build_mini_clip", "grow_vision_tower", "patch_labels", "pixel_values",
           "train_mini_clip", "load_miniature_config"]

log = logging.getLogger("brainmclip.miniature.clip")


def load_miniature_config(name: str, overrides: list[str] | None = None) -> dict:
    """A miniature config (``configs/<name>.json`` of this package, or a JSON path) with ``--set`` overrides."""
    from importlib import resources

    path = Path(name)
    if not (path.suffix == ".json" and path.is_file()):
        path = Path(str(resources.files(__package__).joinpath("configs").joinpath(f"{name}.json")))
        if not path.is_file():
            raise InvalidInputError(f"Unknown miniature config={name!r}: no such file")
    return load_config([str(path)], overrides)


@dataclass
class MiniClipStage:
    """One training stage: the vision tower has ``vision_layers`` blocks (grown from the previous stage)."""

    vision_layers: int
    steps: int
    lr: float
    warmup_steps: int


@dataclass
class MiniClipTrainConfig:
    """Optimisation and losses. ``hard_negatives``: category-swapped captions per image; ``token_labels`` and
    ``attribute_labels``: weights of the auxiliary per-patch and CLS cross-entropies; ``short_captions``: share of
    steps' captions that are terse ("A red dog.")."""

    stages: list[MiniClipStage]
    batch_size: int = 128
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    max_logit_scale: float = 100.0
    hard_negatives: int = 2
    token_labels: float = 1.0
    attribute_labels: float = 1.0
    short_captions: float = 0.2
    min_patch_cover: float = 0.15

    @classmethod
    def from_dict(cls, d: dict) -> MiniClipTrainConfig:
        d = check_keys(cls, d, "train")
        stages = [MiniClipStage(**check_keys(MiniClipStage, st, "train.stages")) for st in d["stages"]]
        return cls(**{**d, "stages": stages})


@dataclass
class MiniClipConfig:
    """Architecture and training of mini-CLIP (``configs/clip.json``)."""

    seed: int
    bank: dict
    vision: dict
    text: dict
    projection_dim: int
    train: MiniClipTrainConfig
    description: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> MiniClipConfig:
        check_keys(cls, d, "mini-CLIP")
        return cls(**{**d, "train": MiniClipTrainConfig.from_dict(d["train"])})


ATTRIBUTES = {"category": len(CATEGORY_NAMES), "colour": len(COLOUR_NAMES), "background": len(BACKGROUND_NAMES)}


def build_mini_clip(config: MiniClipConfig, vocab: dict[str, int], vision_layers: int | None = None) -> CLIPModel:
    """A randomly initialised CLIPModel with the configured towers and a vocabulary of ``len(vocab)`` tokens."""
    text = {**config.text, "vocab_size": len(vocab), "projection_dim": config.projection_dim,
            "bos_token_id": vocab[SOT_TOKEN], "eos_token_id": vocab[EOT_TOKEN], "pad_token_id": vocab[EOT_TOKEN]}
    vision = {**config.vision, "projection_dim": config.projection_dim}
    if vision_layers is not None:
        vision["num_hidden_layers"] = int(vision_layers)
    torch.manual_seed(config.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim))


def grow_vision_tower(model: CLIPModel, layers: int) -> CLIPModel:
    """The same CLIP with ``layers`` vision blocks, computing the same function.

    Trained block k (of n) moves to position ``(k + 1) * layers / n - 1``; the blocks in between start as identity
    maps (the attention output projection and the second MLP layer are zero, so each adds nothing to the residual
    stream) and learn in the next stage. Layer indices keep their relative depth: the old last block is block 24.
    """
    old = model.config.vision_config.num_hidden_layers
    if layers % old:
        raise InvalidInputError(f"cannot grow {old} vision blocks to {layers}: not a multiple")
    config = copy.deepcopy(model.config)
    config.vision_config.num_hidden_layers = layers
    grown = CLIPModel(config)
    state = {k: v for k, v in model.state_dict().items() if ".encoder.layers." not in k or "vision_model" not in k}
    grown.load_state_dict(state, strict=False)
    ratio = layers // old
    blocks_old, blocks_new = model.vision_model.encoder.layers, grown.vision_model.encoder.layers
    for i, block in enumerate(blocks_new):
        if i % ratio == ratio - 1:
            block.load_state_dict(blocks_old[i // ratio].state_dict())
        else:
            with torch.no_grad():
                for linear in (block.self_attn.out_proj, block.mlp.fc2):
                    linear.weight.zero_()
                    linear.bias.zero_()
    return grown


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, S, S, 3) images already at the model's size -> CLIP-normalised float pixels (n, 3, S, S)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def patch_labels(category_maps: np.ndarray, patch: int, min_cover: float) -> torch.Tensor:
    """Per patch: 1 + the category covering most of it (when it covers >= ``min_cover``), else 0 (background)."""
    maps = torch.from_numpy(np.asarray(category_maps)).long() + 1
    n, size = maps.shape[0], maps.shape[1]
    g = size // patch
    cells = maps.reshape(n, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(n, g * g, patch * patch)
    counts = F.one_hot(cells, len(CATEGORY_NAMES) + 1).sum(2)[..., 1:]
    best = counts.argmax(-1) + 1
    return torch.where(counts.max(-1).values >= min_cover * patch * patch, best, 0)


class AuxiliaryHeads(torch.nn.Module):
    """Training-only linear read-outs: the scene's attributes from the pooled CLS, the category under each patch
    from the last layer's patch tokens. They are not part of the exported model."""

    def __init__(self, width: int):
        super().__init__()
        self.attributes = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in ATTRIBUTES.items()})
        self.patches = torch.nn.Linear(width, len(CATEGORY_NAMES) + 1)


def _param_groups(modules, weight_decay: float) -> list[dict]:
    # No decay on biases, norms, embeddings and the temperature: decaying them only fights the contrastive loss.
    decay, rest = [], []
    for module in modules:
        for name, p in module.named_parameters():
            (decay if p.ndim >= 2 and "embedding" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _contrastive_step(model: CLIPModel, heads: AuxiliaryHeads, bank, tokenizer, context: int,
                      t: MiniClipTrainConfig, rng: np.random.Generator) -> dict[str, float]:
    """One step's losses (backward included): CLIP's symmetric InfoNCE with category-swapped captions as extra
    negatives for the images, plus the auxiliary cross-entropies."""
    rows = rng.choice(len(bank), t.batch_size, replace=False)
    captions = []
    for i in rows:
        pool = bank.short_captions[i] if rng.random() < t.short_captions else bank.captions[i]
        captions.append(pool[rng.integers(len(pool))])
    negatives = [swap_category(c, rng) or c for _ in range(t.hard_negatives) for c in captions]
    ids, _ = tokenize(tokenizer, captions + negatives, context)
    vision = model.vision_model(pixel_values=pixel_values(bank.images[rows]))
    image = model.visual_projection(vision.pooler_output)
    text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image @ text.T
    target = torch.arange(len(rows))
    clip_loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :len(rows)].T, target))
    loss = clip_loss
    out = {"clip": clip_loss.item()}
    if t.attribute_labels:
        attr = sum(F.cross_entropy(head(vision.pooler_output), torch.from_numpy(bank.labels[k][rows]).long())
                   for k, head in heads.attributes.items())
        loss = loss + t.attribute_labels * attr
        out["attributes"] = attr.item()
    if t.token_labels:
        patches = heads.patches(model.vision_model.post_layernorm(vision.last_hidden_state[:, 1:]))
        labels = patch_labels(bank.labels["category_map"][rows], model.config.vision_config.patch_size,
                              t.min_patch_cover)
        tok = F.cross_entropy(patches.reshape(-1, patches.shape[-1]), labels.reshape(-1))
        loss = loss + t.token_labels * tok
        out["patches"] = tok.item()
    loss.backward()
    return out


def train_mini_clip(out, config: str = "clip", overrides: list[str] | None = None, force: bool = False,
                    cache=None, progress: bool = True, command: str = "", quality_scenes: int | None = None) -> Path:
    """Train mini-CLIP into ``out`` (resumable) and export it to ``out/model``; returns that folder.

    ``quality_scenes``: held-out scenes the model card's quality figures use (default 500, probes on 1,500;
    fewer for a quick check, and the card says how many).

    ``cache``: where rendered scene banks are kept (default ``out/cache``); the three trainings can share one.
    """
    with training_folder(out, force) as out:
        raw = load_miniature_config(config, overrides)
        cfg = MiniClipConfig.from_dict(raw)
        start = time.perf_counter()
        vocab, merges = build_subset_vocab(caption_vocabulary())
        context = int(cfg.text["max_position_embeddings"])
        save_tokenizer_files(out / "tokenizer", vocab, merges, context)
        tokenizer = load_clip_tokenizer(out / "tokenizer", model_max_length=context)
        bank = load_or_build_bank(Path(cache) if cache else out / "cache", cfg.bank["n_scenes"], cfg.seed, "train",
                                  cfg.bank["image_size"], progress=progress)
        t = cfg.train
        final_layers = int(cfg.vision["num_hidden_layers"])
        if t.stages[-1].vision_layers != final_layers:
            raise InvalidInputError(f"the last training stage must have the model's {final_layers} vision blocks")
        model = build_mini_clip(cfg, vocab, t.stages[0].vision_layers)
        heads = AuxiliaryHeads(int(cfg.vision["hidden_size"]))
        torch.manual_seed(cfg.seed + 1)
        heads.apply(lambda m: m.reset_parameters() if isinstance(m, torch.nn.Linear) else None)
        seconds = 0.0
        for k, stage in enumerate(t.stages):
            if model.config.vision_config.num_hidden_layers != stage.vision_layers:
                model = grow_vision_tower(model, stage.vision_layers)
            optimizer = torch.optim.AdamW(_param_groups([model, heads], t.weight_decay), lr=stage.lr,
                                          betas=tuple(t.betas), eps=t.eps)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(stage.steps,
                                                                                       stage.warmup_steps))
            max_scale = math.log(t.max_logit_scale)

            def clamp_scale(model=model, max_scale=max_scale) -> None:
                with torch.no_grad():
                    model.logit_scale.clamp_(0, max_scale)

            def step_fn(step: int, rng: np.random.Generator, model=model) -> dict[str, float]:
                return _contrastive_step(model, heads, bank, tokenizer, context, t, rng)

            phase = Phase(f"clip-stage{k + 1}", {"clip": model, "heads": heads}, optimizer, schedule, stage.steps,
                          step_fn, settings={**raw, "stage": k}, after_step=clamp_scale)
            seconds += run_phase(out, phase, cfg.seed, progress=progress)["seconds"]
        folder = export_mini_clip(model, out / "tokenizer", out / "model")
        from brainmclip.miniature.quality import clip_quality

        sizes = {} if quality_scenes is None else {"n": quality_scenes, "n_probe": 3 * quality_scenes}
        quality = clip_quality(folder, progress=progress, **sizes)
        write_model_card(folder, "mini-CLIP", cfg.description or __doc__.splitlines()[0],
                         command or "brainmclip miniature train clip", cfg.seed, raw,
                         seconds, sum(p.numel() for p in model.parameters()), quality)
        log.info("mini-CLIP exported to %s in %.0f s: %s", folder, time.perf_counter() - start, quality)
        return folder


def export_mini_clip(model: CLIPModel, tokenizer_dir: Path, folder: Path) -> Path:
    """Write the float16 transformers folder with its tokenizer files (replacing an earlier export)."""
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    half = CLIPModel(model.config)
    half.load_state_dict(model.state_dict())
    half.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy2(Path(tokenizer_dir) / name, staging / name)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
