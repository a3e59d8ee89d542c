"""Class weights for zero-shot classification from CLIP's text tower: prompt ensembles and learned context (CoOp).

* **Prompt ensemble** (:func:`class_weights`): each class name is put into the 18 templates BrainCLIP lists
  (:data:`BRAINCLIP_TEMPLATES`, CLIP's ImageNet recipe); each filled template is embedded and unit-normalised,
  the embeddings of one class are averaged and the mean is normalised again.
* **CoOp** (Zhou et al. 2022, "Learning to prompt for vision-language models"; :func:`train_context`):
  ``n_ctx`` context vectors shared by all classes (the unified-context variant) replace the template words.
  The text tower reads ``[SOS] ctx_1 .. ctx_n <class name tokens> . [EOS]`` (then padding); only the
  context vectors are trained, with CLIP frozen, by cross-entropy over the training classes of
  ``logit_scale * cos(embedding, text feature)``. The trained context then makes weights for any class names,
  so classes never seen in training (GOD's test categories) can be classified.

The text tower of transformers' ``CLIPTextModel`` only accepts token ids, so the learned-context path runs its
parts directly (:func:`encode_token_embeddings`): token + position embeddings, the encoder blocks under a causal
mask, the final layer norm, the hidden state at the first end-of-text token, the text projection. The same path
with no context reproduces the model's own output (checked in the tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["BRAINCLIP_TEMPLATES", "CONTEXT_FORMAT", "DEFAULT_LOGIT_SCALE", "LearnedContext", "class_prompts",
           "class_weights", "clip_logit_scale", "context_tokens", "context_weights", "encode_token_embeddings",
           "text_features", "train_context"]

#: The 18 prompt templates BrainCLIP's appendix lists for zero-shot classification, in its order.
BRAINCLIP_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

#: OpenAI's CLIP ends training with its logit scale at the clamp, exp(4.6052) = 100; used when a model has no
#: trained scale on disk (the random test towers).
DEFAULT_LOGIT_SCALE = 100.0
CONTEXT_FORMAT = "brainmclip-coop-context/1"


# -- text side -----------------------------------------------------------------------------------------------


def _text_device(towers) -> torch.device:
    return next(towers.text.parameters()).device


def _text_dtype(towers) -> torch.dtype:
    return next(towers.text.parameters()).dtype


def encode_token_embeddings(towers, token_embeds: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
    """CLIP's projected text feature (not normalised), ``(n, D)``, from token embeddings ``(n, L, width)``.

    Runs the text tower as ``CLIPTextModel`` does, from the token embeddings on: position embeddings added,
    the encoder blocks under a causal mask (position i attends to positions 0..i, as CLIP's text tower was
    trained), the final layer norm, the hidden state at ``eos_index`` and the text projection. Because the
    mask is causal, the state at the end-of-text token does not depend on later positions, so the sequence is
    cut after the last row's end-of-text token (identical result, less work).
    """
    text_model = towers.text.text_model
    n = token_embeds.shape[0]
    eos_index = eos_index.to(token_embeds.device).long()
    length = int(eos_index.max()) + 1 if n else 1
    hidden = text_model.embeddings(inputs_embeds=token_embeds[:, :length])
    blocked = torch.full((length, length), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
    causal = torch.triu(blocked, diagonal=1)[None, None]  # additive: 0 on and below the diagonal
    hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state
    hidden = text_model.final_layer_norm(hidden)
    pooled = hidden[torch.arange(n, device=hidden.device), eos_index]
    return towers.text.text_projection(pooled)


def text_features(towers, texts, batch_size: int = 256) -> np.ndarray:
    """Unit-norm CLIP text embeddings ``(n, D)`` float32 of ``texts`` (projected end-of-text state)."""
    from brainmclip.features.tokenizer import tokenize

    texts = list(texts)
    out = np.empty((len(texts), towers.embed_dim), np.float32)
    device = _text_device(towers)
    embedding = towers.text.text_model.embeddings.token_embedding
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids, eos = tokenize(towers.tokenizer, texts[start:start + batch_size], towers.context_length)
            ids = ids.to(device)
            feats = encode_token_embeddings(towers, embedding(ids), eos).float()
            out[start:start + len(ids)] = torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()
    return out


def class_prompts(class_names, templates=BRAINCLIP_TEMPLATES) -> list[list[str]]:
    """Every template filled with every class name: one list of prompts per class."""
    templates = list(templates)
    if not templates:
        raise InvalidInputError("no prompt templates; expected at least one template with a '{}' for the class name")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise InvalidInputError(f"prompt template {bad[0]!r} has no single '{{}}'; expected one '{{}}' for the class name")
    return [[t.format(name) for t in templates] for name in _check_names(class_names)]


def _check_names(class_names) -> list[str]:
    if isinstance(class_names, str):
        raise TypeError("class_names must be a list of names, not a single string")
    names = [str(n) for n in class_names]
    if not names:
        raise InvalidInputError("no class names; expected at least one candidate class")
    empty = [n for n in names if not n.strip()]
    if empty:
        raise InvalidInputError("a class name is empty; expected names that go into prompts ('dog', 'goldfish')")
    if len(set(names)) != len(names):
        repeated = next(n for n in names if names.count(n) > 1)
        raise InvalidInputError(f"class {repeated!r} is listed twice; expected distinct class names")
    return names


def class_weights(towers, class_names, templates=BRAINCLIP_TEMPLATES, batch_size: int = 256) -> np.ndarray:
    """Prompt-ensemble classifier weights ``(C, D)`` float32, unit norm.

    For each class every template is filled with its name and embedded (unit norm); the class's embeddings
    are averaged and the mean normalised again (CLIP's prompt-ensembling recipe, which BrainCLIP follows).
    """
    prompts = class_prompts(class_names, templates)
    per_class = len(prompts[0])
    flat = text_features(towers, [p for group in prompts for p in group], batch_size)
    mean = flat.reshape(len(prompts), per_class, -1).mean(1)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


# -- learned context (CoOp) ----------------------------------------------------------------------------------


def context_tokens(towers, class_names, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(C, L)`` of ``[SOS] <n_ctx slots> <name tokens> . [EOS] pad`` and each row's end-of-text index.

    The slots (positions 1..n_ctx) hold id 0; :func:`encode_token_embeddings` callers put the context vectors
    there. A name too long to fit beside the context is an error (its end-of-text token would be cut).
    """
    from brainmclip.features.tokenizer import tokenize

    names = _check_names(class_names)
    if n_ctx < 0:
        raise InvalidInputError(f"n_ctx={n_ctx}; expected 0 or more context vectors")
    length = towers.context_length
    ids, eos = tokenize(towers.tokenizer, [f"{name}." for name in names], length)
    shifted = eos + n_ctx
    too_long = torch.nonzero(shifted >= length).ravel()
    if len(too_long):
        name = names[int(too_long[0])]
        raise InvalidInputError(f"class name {name!r} takes {int(eos[too_long[0]]) - 1} tokens; with {n_ctx} context "
                                f"vectors the prompt needs more than the text tower's {length} positions")
    out = torch.full_like(ids, int(towers.tokenizer.eos_token_id))
    out[:, 0] = ids[:, 0]
    out[:, 1:1 + n_ctx] = 0
    out[:, 1 + n_ctx:] = ids[:, 1:length - n_ctx]
    return out, shifted


def _context_features(towers, ids: torch.Tensor, eos: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Projected text features (C, D) of ``ids`` with ``context`` (n_ctx, width) in positions 1..n_ctx."""
    embeds = towers.text.text_model.embeddings.token_embedding(ids)
    n_ctx = context.shape[0]
    if n_ctx:
        embeds = torch.cat([embeds[:, :1], context[None].expand(len(ids), -1, -1).to(embeds.dtype),
                            embeds[:, 1 + n_ctx:]], dim=1)
    return encode_token_embeddings(towers, embeds, eos)


def clip_logit_scale(towers) -> tuple[float, str]:
    """CLIP's trained logit scale ``exp(logit_scale)`` from the model's weights, or 100 when none is on disk.

    Returns the scale and where it came from. The towers loaded by :func:`brainmclip.features.clip_models.load_clip`
    do not keep the scale, so it is read from the model folder's ``*.safetensors`` (key ``logit_scale``).
    """
    from brainmclip.features.clip_models import resolve_model_folder

    name = str(towers.identity.get("model", ""))
    try:
        folder = resolve_model_folder(name) if name else None
    except (InvalidInputError, MissingInputError, OSError):
        folder = None
    if folder is not None:
        from safetensors import safe_open

        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), "pt") as fh:
                if "logit_scale" in fh.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    return float(fh.get_tensor("logit_scale").float().exp()), f"trained logit scale of {name}"
    return DEFAULT_LOGIT_SCALE, "100 (CLIP's final logit scale; the model has no trained scale on disk)"


@dataclass
class LearnedContext:
    """CoOp context vectors ``(n_ctx, width)`` for one CLIP text tower, with how they were learned."""

    vectors: np.ndarray
    settings: dict = field(default_factory=dict)

    @property
    def n_ctx(self) -> int:
        return int(self.vectors.shape[0])

    def check(self, towers) -> None:
        """The context must belong to these towers: same token width and (when recorded) the same CLIP config."""
        width = int(towers.text.config.hidden_size)
        if self.vectors.ndim != 2 or self.vectors.shape[1] != width:
            raise InvalidInputError(f"context vectors of shape {tuple(self.vectors.shape)}; this CLIP's text tower "
                                    f"needs (n_ctx, {width})")
        mine, theirs = self.settings.get("clip_config_sha256"), towers.identity.get("config_sha256")
        if mine and theirs and mine != theirs:
            raise InvalidInputError(f"context learned with CLIP {self.settings.get('clip')!r}, not with "
                                    f"{towers.identity.get('model')!r}; learn it again with this model")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vectors and settings as one safetensors file, atomically."""
        from safetensors.torch import save_file

        from brainmclip.atomic import atomic_path

        path = Path(path)
        meta = {"format": CONTEXT_FORMAT, "settings": json.dumps(self.settings, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file({"context": torch.from_numpy(np.ascontiguousarray(self.vectors, np.float32))}, str(tmp), meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LearnedContext:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"{path}: no such context file (write one with brainmclip classify --train-context)")
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                vectors = fh.get_tensor("context").float().numpy() if "context" in fh.keys() else None  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidInputError(f"{path}: not a readable safetensors file ({exc})") from None
        if meta.get("format") != CONTEXT_FORMAT or vectors is None:
            raise InvalidInputError(f"{path}: not a learned context (expected format {CONTEXT_FORMAT!r} holding "
                                    "'context')")
        return cls(vectors, json.loads(meta.get("settings", "{}")))


def context_weights(towers, class_names, context: LearnedContext, batch_size: int = 256) -> np.ndarray:
    """CoOp classifier weights ``(C, D)`` float32, unit norm: each class name read after the learned context."""
    context.check(towers)
    names = _check_names(class_names)
    out = np.empty((len(names), towers.embed_dim), np.float32)
    device = _text_device(towers)
    vectors = torch.from_numpy(np.asarray(context.vectors, np.float32)).to(device, _text_dtype(towers))
    with torch.no_grad():
        for start in range(0, len(names), batch_size):
            ids, eos = context_tokens(towers, names[start:start + batch_size], context.n_ctx)
            feats = _context_features(towers, ids.to(device), eos.to(device), vectors).float()
            out[start:start + len(ids)] = torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()
    return out


def _initial_context(towers, n_ctx: int, init: str, generator: torch.Generator) -> torch.Tensor:
    width = int(towers.text.config.hidden_size)
    if init == "random":  # CoOp's generic context: N(0, 0.02^2), CLIP's token-embedding initialisation
        return torch.randn(n_ctx, width, generator=generator) * 0.02
    from brainmclip.features.tokenizer import tokenize

    ids, eos = tokenize(towers.tokenizer, [init], towers.context_length)
    n_words = int(eos[0]) - 1
    if n_words != n_ctx:
        raise InvalidInputError(f"context init {init!r} is {n_words} tokens; expected n_ctx={n_ctx} (or 'random')")
    with torch.no_grad():
        embedding = towers.text.text_model.embeddings.token_embedding
        return embedding(ids[0, 1:1 + n_ctx].to(embedding.weight.device)).float().cpu()


def train_context(towers, embeddings, labels, class_names, n_ctx: int = 4, steps: int = 200, lr: float = 2e-3,
                  batch_size: int = 64, seed: int = 0, init: str = "random", logit_scale: float | None = None,
                  source: str = "embeddings", progress: bool = False) -> LearnedContext:
    """Learn CoOp's unified context on ``embeddings`` ``(n, D)`` labelled ``labels`` (indices into ``class_names``).

    CLIP stays frozen; each Adam step embeds every class name after the current context, scores a batch of
    embeddings with ``logit_scale * cosine`` and follows the cross-entropy's gradient into the context only.
    ``logit_scale`` None: CLIP's trained scale (:func:`clip_logit_scale`). ``init``: 'random' (N(0, 0.02^2)) or
    a phrase of exactly ``n_ctx`` tokens ("a photo of a") whose token embeddings start the context. Seeded:
    the same inputs and seed give the same context.
    """
    names = _check_names(class_names)
    x = np.asarray(embeddings, np.float32)
    y = np.asarray(labels).astype(np.int64).ravel()
    if x.ndim != 2 or x.shape[1] != towers.embed_dim:
        raise InvalidInputError(f"training embeddings of shape {x.shape}; this CLIP needs (n, {towers.embed_dim})")
    if len(x) != len(y) or not len(x):
        raise InvalidInputError(f"{len(x)} training embeddings and {len(y)} labels; expected one label per row, "
                                "and at least one row")
    if y.min() < 0 or y.max() >= len(names):
        raise InvalidInputError(f"training labels span {y.min()}..{y.max()}; expected indices into {len(names)} classes")
    if not np.isfinite(x).all():
        raise InvalidInputError("training embeddings hold NaN or inf")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise InvalidInputError(f"steps={steps}, batch_size={batch_size}, lr={lr}; expected positive values")
    scale_source = "given"
    if logit_scale is None:
        logit_scale, scale_source = clip_logit_scale(towers)
    device, dtype = _text_device(towers), _text_dtype(towers)
    generator = torch.Generator().manual_seed(int(seed))
    context = torch.nn.Parameter(_initial_context(towers, n_ctx, init, generator).to(device, dtype))
    ids, eos = context_tokens(towers, names, n_ctx)
    ids, eos = ids.to(device), eos.to(device)
    feats = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).to(device, dtype)
    target = torch.from_numpy(y).to(device)
    optimiser = torch.optim.Adam([context], lr=lr)
    params = list(towers.text.parameters())
    was_trainable = [p.requires_grad for p in params]
    was_training = towers.text.training
    towers.text.eval()  # no dropout: CLIP is frozen, only the context moves
    for p in params:
        p.requires_grad_(False)
    losses = []
    try:
        bar = tqdm(range(steps), desc="CoOp context", unit="step", disable=not progress)
        for _ in bar:
            rows = torch.randperm(len(x), generator=generator)[:batch_size].to(device)
            weights = torch.nn.functional.normalize(_context_features(towers, ids, eos, context).float(), dim=-1)
            logits = logit_scale * feats[rows].float() @ weights.T
            loss = torch.nn.functional.cross_entropy(logits, target[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for p, flag in zip(params, was_trainable, strict=True):
            p.requires_grad_(flag)
        towers.text.train(was_training)
    vectors = context.detach().float().cpu().numpy()
    settings = {"n_ctx": int(n_ctx), "steps": int(steps), "lr": float(lr), "batch_size": int(batch_size),
                "seed": int(seed), "init": init, "optimiser": "Adam", "logit_scale": float(logit_scale),
                "logit_scale_source": scale_source, "train_classes": names, "n_train_rows": int(len(x)),
                "source": source, "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
                "clip": str(towers.identity.get("model")), "clip_config_sha256": towers.identity.get("config_sha256"),
                "prompt": "[SOS] ctx_1..ctx_n <class name> . [EOS]", "variant": "unified context (shared by all classes)"}
    return LearnedContext(vectors, settings)
