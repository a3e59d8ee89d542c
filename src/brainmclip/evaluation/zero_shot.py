"""BrainCLIP's zero-shot classification of fMRI embeddings by prompting: prompt ensembles and learned context (CoOp).

An fMRI embedding lives in CLIP's projected space, so any text CLIP can embed is a classifier weight: the class
whose text embedding is most cosine-similar to the fMRI embedding is the prediction. Two ways of making the class
weights are supported:

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

Accuracy (:func:`topk_accuracy`) is top-k with ties shared: a row's credit is the chance that its true class
lands in the top k when tied scores are ordered at random, so a classifier that scores every class alike gets
exactly the chance level k/C. The 95% interval is Wilson's score interval for a binomial proportion over rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = [
    "NAME", "HELP", "BRAINCLIP_TEMPLATES", "DEFAULT_LOGIT_SCALE", "RESULT_FILE", "TABLE_FILE", "CONTEXT_FILE",
    "ZeroShotResult", "ZeroShotTable", "LearnedContext",
    "class_prompts", "class_weights", "text_features", "encode_token_embeddings", "context_tokens",
    "context_weights", "train_context", "clip_logit_scale", "zero_shot_scores", "topk_accuracy", "wilson_interval",
    "evaluate_table", "classify", "add_arguments", "run",
]

NAME = "classify"
HELP = "zero-shot classification of fMRI embeddings by prompting (18-template ensemble or learned CoOp context)"

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
RESULT_FILE = "zero_shot.json"
TABLE_FILE = "zero_shot.md"
CONTEXT_FILE = "context.safetensors"
RESULT_FORMAT = "brainmclip-zero-shot/1"
CONTEXT_FORMAT = "brainmclip-coop-context/1"
TIE_RULE = "shared: credit = P(true class in top k) with tied scores ordered at random"
INTERVAL = "Wilson score interval, 95%, binomial over rows"
_Z95 = 1.959963984540054


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


# -- scoring ---------------------------------------------------------------------------------------------------


def zero_shot_scores(embeddings, weights) -> np.ndarray:
    """Cosine similarity ``(n, C)`` float32 of each embedding row to each class weight row."""
    x = np.asarray(embeddings, np.float32)
    w = np.asarray(weights, np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise InvalidInputError(f"embeddings of shape {x.shape} and class weights of shape {w.shape}; expected (n, D) "
                                "and (C, D) in the same space")
    if not (np.isfinite(x).all() and np.isfinite(w).all()):
        raise InvalidInputError("embeddings or class weights hold NaN or inf")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return x @ w.T


def wilson_interval(successes: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (95% for the default ``z``)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict[int, dict]:
    """Top-k accuracy per k: ``{k: {"accuracy", "chance", "correct", "n", "ci95"}}``.

    ``scores`` ``(n, C)`` (higher = more likely), ``labels`` ``(n,)`` true class indices. Ties are shared: a row
    whose true class has ``g`` classes scoring strictly higher and ``t`` others scoring the same gets credit
    ``clip((k - g) / (t + 1), 0, 1)``, its chance of being in the top k under a random order of the ties.
    ``correct`` is the summed credit; ``chance`` is ``min(k / C, 1)``; ``ci95`` is Wilson's 95% interval.
    A k larger than the number of classes is an error.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if s.ndim != 2 or len(s) != len(y):
        raise InvalidInputError(f"scores of shape {s.shape} and {len(y)} labels; expected (n, C) scores, one label a row")
    n, n_classes = s.shape
    if n_classes == 0 or not np.isfinite(s).all():
        raise InvalidInputError("scores are empty or hold NaN; expected finite scores for at least one class")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise InvalidInputError(f"labels span {y.min()}..{y.max()}; expected indices into {n_classes} classes")
    ks = [int(k) for k in ks]
    bad = [k for k in ks if k < 1 or k > n_classes]
    if bad:
        raise InvalidInputError(f"top-{bad[0]} accuracy among {n_classes} classes; expected 1 <= k <= {n_classes}")
    true = s[np.arange(n), y][:, None]
    greater = (s > true).sum(1)
    ties = (s == true).sum(1) - 1
    result = {}
    for k in ks:
        credit = np.clip((k - greater) / (ties + 1), 0.0, 1.0)
        correct = float(credit.sum())
        low, high = wilson_interval(correct, n)
        result[k] = {"accuracy": correct / n if n else float("nan"), "chance": min(k / n_classes, 1.0),
                     "correct": correct, "n": int(n), "ci95": [low, high]}
    return result


@dataclass
class ZeroShotTable:
    """One classification: which rows, among which candidate classes, and their top-k accuracies."""

    name: str
    description: str
    classes: list[str]
    n_rows: int
    topk: dict[int, dict]
    per_class: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["topk"] = {str(k): v for k, v in self.topk.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ZeroShotTable:
        return cls(name=data["name"], description=data["description"], classes=list(data["classes"]),
                   n_rows=int(data["n_rows"]), topk={int(k): dict(v) for k, v in data["topk"].items()},
                   per_class={k: dict(v) for k, v in data.get("per_class", {}).items()})


def evaluate_table(name: str, description: str, scores, labels, class_names, ks=(1, 5)) -> ZeroShotTable:
    """:func:`topk_accuracy` of ``scores`` over ``class_names``, with each class's top-1 accuracy and row count."""
    labels = np.asarray(labels, np.int64)
    topk = topk_accuracy(scores, labels, ks)
    top1 = topk_accuracy(scores, labels, (1,))[1] if len(labels) else None
    per_class = {}
    if top1 is not None:
        s = np.asarray(scores, np.float64)
        true = s[np.arange(len(labels)), labels][:, None]
        credit = np.clip((1 - (s > true).sum(1)) / (s == true).sum(1), 0.0, 1.0)
        for c, cname in enumerate(class_names):
            rows = labels == c
            if rows.any():
                per_class[str(cname)] = {"n": int(rows.sum()), "top1": float(credit[rows].mean())}
    return ZeroShotTable(name, description, [str(c) for c in class_names], int(len(labels)), topk, per_class)


@dataclass
class ZeroShotResult:
    """What ``brainmclip classify`` measured: one or more tables, and how the class weights were made."""

    prediction: str
    method: str
    subject: int
    split: str
    clip: str
    prompt: str
    tables: list[ZeroShotTable]
    n_rows: int
    n_unlabelled: int
    labels_source: str
    settings: dict = field(default_factory=dict)

    def table(self, name: str) -> ZeroShotTable:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "tables"}
        data["tables"] = [t.to_dict() for t in self.tables]
        data["format"] = RESULT_FORMAT
        data["tie_rule"] = TIE_RULE
        data["interval"] = INTERVAL
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ZeroShotResult:
        if data.get("format") != RESULT_FORMAT:
            raise InvalidInputError(f"zero-shot result of format {data.get('format')!r}; expected {RESULT_FORMAT!r}")
        return cls(prediction=data["prediction"], method=data["method"], subject=int(data["subject"]),
                   split=data["split"], clip=data["clip"], prompt=data["prompt"],
                   tables=[ZeroShotTable.from_dict(t) for t in data["tables"]], n_rows=int(data["n_rows"]),
                   n_unlabelled=int(data["n_unlabelled"]), labels_source=data["labels_source"],
                   settings=dict(data.get("settings", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ZeroShotResult:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZeroShotResult:
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        if not path.is_file():
            raise MissingInputError(f"{path}: no zero-shot result (run brainmclip classify)")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path}: not a zero-shot result ({type(exc).__name__}: {exc})") from None

    def markdown(self) -> str:
        how = ("18-template prompt ensemble (BrainCLIP's templates)" if self.prompt == "ensemble"
               else f"CoOp learned context ({self.settings.get('context', {}).get('n_ctx', '?')} vectors)")
        lines = [f"# Zero-shot classification: subject {self.subject}, {self.method}, {self.split} split", "",
                 f"Predictions: `{self.prediction}`; CLIP: `{self.clip}`; class weights: {how}.",
                 f"Labels: `{self.labels_source}`; {self.n_rows} labelled rows classified"
                 + (f", {self.n_unlabelled} rows without a label skipped." if self.n_unlabelled else "."), ""]
        for t in self.tables:
            lines += [f"## {t.description}", "", f"{t.n_rows} rows, {len(t.classes)} candidate classes.", "",
                      "| k | accuracy | 95% interval | chance |", "|---|---|---|---|"]
            for k, v in sorted(t.topk.items()):
                lo, hi = v["ci95"]
                lines.append(f"| top-{k} | {100 * v['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | "
                             f"{100 * v['chance']:.1f}% |")
            lines.append("")
        lines += [f"Ties: {TIE_RULE}. Interval: {INTERVAL}.", ""]
        return "\n".join(lines)

    def write(self, out: str | os.PathLike) -> Path:
        """Write ``zero_shot.json``, ``zero_shot.md``, and a figure with an analysis manifest (so ``brainmclip
        report --analyses`` shows it) into ``out``, each atomically (the manifest last)."""
        from brainmclip.analysis.common import write_analysis
        from brainmclip.atomic import write_bytes_atomic

        out = Path(out)
        write_bytes_atomic(out / TABLE_FILE, self.markdown().encode())
        write_bytes_atomic(out / RESULT_FILE, self.to_json().encode())
        self._figure(out / "figure.png")
        how = "18-template prompt ensemble" if self.prompt == "ensemble" else "CoOp learned context"
        rows = []
        for t in self.tables:
            for k, v in sorted(t.topk.items()):
                lo, hi = v["ci95"]
                rows.append({"rows classified": t.description, "n": t.n_rows, "classes": len(t.classes), "k": k,
                             "accuracy %": f"{100 * v['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                             "chance %": f"{100 * v['chance']:.1f}"})
        write_analysis(out, "zero_shot", f"Zero-shot classification ({self.method}, subject {self.subject}, {how})",
                       f"Top-k accuracy of classifying fMRI embeddings by CLIP text embeddings of class prompts; "
                       f"[95% {INTERVAL.split(',')[0].lower()}]; grey ticks mark chance. Labels: "
                       f"{self.labels_source}.", rows, {"prompt": self.prompt, "clip": self.clip})
        return out / RESULT_FILE

    def _figure(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from brainmclip.analysis.common import save_figure

        ks = sorted({k for t in self.tables for k in t.topk})
        fig, ax = plt.subplots(figsize=(8, 0.7 * len(self.tables) * len(ks) + 1.2))
        labels, y = [], 0
        for t in self.tables:
            for k in ks:
                if k not in t.topk:
                    continue
                v = t.topk[k]
                lo, hi = v["ci95"]
                ax.barh(y, 100 * v["accuracy"], xerr=[[100 * (v["accuracy"] - lo)], [100 * (hi - v["accuracy"])]],
                        color="C0" if k == 1 else "C1", capsize=3)
                ax.plot([100 * v["chance"]] * 2, [y - 0.4, y + 0.4], color="grey", lw=2)
                labels.append(f"{t.description}\n({len(t.classes)} classes) top-{k}")
                y += 1
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        save_figure(fig, path)


# -- the classify command ----------------------------------------------------------------------------------------


def _read_run(pred_dir: Path, manifest: dict) -> tuple[Path | None, dict]:
    from brainmclip.paths import resolve_path

    rel = manifest.get("run")
    if not rel:
        return None, {}
    run_dir = resolve_path(rel, pred_dir)
    record = run_dir / "run.json"
    if not record.is_file():
        return run_dir, {}
    try:
        data = json.loads(record.read_text())
    except ValueError:
        raise InvalidInputError(f"{record}: truncated or corrupt JSON; expected the training run's record") from None
    return run_dir, data if isinstance(data, dict) else {}


def _clip_name(clip, manifest: dict, run_dir: Path | None, run: dict) -> str:
    """The CLIP model the embeddings belong to: ``clip``, else the prediction's, else its run's feature store's."""
    if clip:
        return str(clip)
    if manifest.get("clip"):
        return str(manifest["clip"])
    if run_dir is not None and run.get("features"):
        from brainmclip.features.feature_store import open_feature_store
        from brainmclip.features.pooled import clip_name_of
        from brainmclip.paths import resolve_path

        try:
            return clip_name_of(open_feature_store(resolve_path(run["features"], run_dir)))
        except (MissingInputError, InvalidInputError, KeyError, TypeError):
            pass  # no readable store: the user has to name the model
    raise MissingInputError("the prediction does not record its CLIP model; pass clip= (--clip NAME)")


def _labels_for(pred_dir: Path, data, labels_file, run_dir, run):
    """Labels from ``labels_file``, else the ones the run was trained with, on ``data`` or the run's dataset."""
    from brainmclip.data.labels import load_class_labels
    from brainmclip.paths import resolve_path

    if labels_file is None:
        labels_file = run.get("config", {}).get("data", {}).get("labels")
    if data is None and run_dir is not None and run.get("data"):
        data = resolve_path(run["data"], run_dir)
    if labels_file is not None and not str(labels_file).startswith("scene:"):
        return load_class_labels(data or pred_dir, labels_file)
    if data is None:
        raise MissingInputError(f"{pred_dir}: its training run records no prepared dataset; pass data= (--data) "
                                "or labels_file= (--labels)")
    if not Path(data).is_dir():
        raise MissingInputError(f"{data}: no such prepared dataset folder; pass data= (--data) or labels_file= (--labels)")
    return load_class_labels(data, labels_file)


def _labelled_rows(labels, ids) -> tuple[np.ndarray, np.ndarray]:
    """Row indices whose stimulus has a class label, and their class indices."""
    ids = np.asarray(ids, np.int64)
    rows = np.array([i for i, s in enumerate(ids) if int(s) in labels.by_id], np.int64)
    classes = labels.of(ids[rows]) if len(rows) else np.empty(0, np.int64)
    return rows, classes


def _resolve_ks(ks, n_classes: int, explicit: bool) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if explicit:
        return ks
    kept = [k for k in ks if k <= n_classes]
    return kept or [1]


def _check_embedding_space(embeddings: np.ndarray, towers, clip: str) -> None:
    if embeddings.shape[1] != towers.embed_dim:
        raise InvalidInputError(f"the prediction's embeddings have {embeddings.shape[1]} dimensions but CLIP {clip!r} "
                                f"embeds in {towers.embed_dim}; pass the CLIP model the run was trained for (--clip)")


def classify(pred_dir, data=None, clip=None, labels_file=None, classes=None, holdout=None, prompt: str = "ensemble",
             context=None, out=None, *, templates=BRAINCLIP_TEMPLATES, ks=None, train_context_from=None,
             context_source: str = "fmri", n_ctx: int = 4, steps: int = 200, lr: float = 2e-3, batch_size: int = 64,
             seed: int = 0, init: str = "random", logit_scale: float | None = None, towers=None,
             device: str | None = None, progress: bool = False) -> ZeroShotResult:
    """Zero-shot classification of a prediction folder's fMRI embeddings; writes ``out/zero_shot.{json,md}``.

    Parameters
    ----------
    pred_dir : the prediction folder (``brainmclip predict``); its embedding is
        :func:`brainmclip.features.pooled.pooled_prediction`.
    data, labels_file : class labels come from ``labels_file`` if given, else from the prepared dataset ``data``,
        else from the prediction's run's prepared dataset (:func:`brainmclip.data.labels.load_class_labels`).
        Rows whose stimulus has no label are skipped (and counted); none labelled is an error.
    clip : CLIP model name; default: the one the prediction records.
    classes : candidate class names; default: every class among the classified rows. Rows of other classes
        are not classified.
    holdout : class names held out of training. Then two tables: held-out rows among the held-out classes only
        (the GOD-style zero-shot test) and held-out rows among all candidate classes; plus seen rows among all
        candidates when there are any.
    prompt : 'ensemble' (:data:`BRAINCLIP_TEMPLATES` or ``templates``) or 'coop' (learned context: ``context``
        as a :class:`LearnedContext` or a file, or learned here from the prediction folder
        ``train_context_from``, normally ``RUN/predictions_train``; see :func:`train_context`).
    context_source : what CoOp learns from: 'fmri' (the training rows' fMRI embeddings) or 'image' (CLIP image
        embeddings of the training rows' stimuli, from the run's feature store).
    ks : top-k values; default (1, 5), dropping those above a table's class count. Given explicitly, a k
        above a table's class count is an error.
    towers, device : CLIP towers already loaded (else loaded by name on ``device``: a GPU when present).
    """
    arguments = dict(locals())
    if out is None:
        return _classify(**arguments)
    from brainmclip.atomic import output_lock

    with output_lock(out):  # one writer per output folder: the context file and the tables belong together
        return _classify(**arguments)


def _classify(pred_dir, data, clip, labels_file, classes, holdout, prompt, context, out, templates, ks,
              train_context_from, context_source, n_ctx, steps, lr, batch_size, seed, init, logit_scale, towers,
              device, progress) -> ZeroShotResult:
    from brainmclip.features.clip_models import load_clip
    from brainmclip.models.predictions import load_predictions

    if prompt not in ("ensemble", "coop"):
        raise InvalidInputError(f"Unknown prompt={prompt!r}; choose from ['ensemble', 'coop']")
    if context_source not in ("fmri", "image"):
        raise InvalidInputError(f"Unknown context source {context_source!r}; choose from ['fmri', 'image']")
    if prompt == "coop" and context is None and train_context_from is None:
        raise InvalidInputError("prompt 'coop' needs a learned context: pass context= (--context FILE) or learn one "
                                "from the train split's predictions (--train-context)")
    if prompt == "ensemble" and (context is not None or train_context_from is not None):
        raise InvalidInputError("a learned context is only used with prompt 'coop'; pass --prompt coop")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise MissingInputError(f"{pred_dir}: no such prediction folder (run brainmclip predict)")
    pred = load_predictions(pred_dir)
    run_dir, run = _read_run(pred_dir, pred.manifest)
    clip_name = _clip_name(clip, pred.manifest, run_dir, run)
    labels = _labels_for(pred_dir, data, labels_file, run_dir, run)
    rows, y = _labelled_rows(labels, pred.stimulus_ids)
    if not len(rows):
        raise InvalidInputError(f"none of the {len(pred.stimulus_ids)} stimuli of {pred_dir} has a class label in "
                                f"{labels.source or 'the labels'}; expected labels for the classified stimuli")
    n_unlabelled = len(pred.stimulus_ids) - len(rows)

    holdout_idx = labels.index(list(holdout)) if holdout else []
    # Default candidates: every class among the labelled rows (held-out classes included).
    candidates = labels.index(list(classes)) if classes else sorted(set(y.tolist()) | set(holdout_idx))
    missing = [labels.names[h] for h in holdout_idx if h not in candidates]
    if missing:
        raise InvalidInputError(f"held-out class {missing[0]!r} is not among the candidate classes; add it to --classes")
    keep = np.isin(y, candidates)
    rows, y = rows[keep], y[keep]
    if not len(rows):
        raise InvalidInputError("no classified row belongs to the candidate classes "
                                f"{[labels.names[c] for c in candidates]}")
    if holdout_idx and not np.isin(y, holdout_idx).any():
        raise InvalidInputError(f"no classified row belongs to a held-out class {[labels.names[h] for h in holdout_idx]}")

    from brainmclip.features.pooled import pooled_prediction

    embeddings = np.asarray(pooled_prediction(pred), np.float32)[rows]
    if towers is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        towers = load_clip(clip_name, device=device)
    _check_embedding_space(embeddings, towers, clip_name)
    names = [labels.names[c] for c in candidates]

    settings: dict = {"candidates": "given" if classes else "classes of the classified rows",
                      "holdout": [labels.names[h] for h in holdout_idx], "run": str(run_dir) if run_dir else None}
    if prompt == "ensemble":
        weights = class_weights(towers, names, templates)
        settings["templates"] = list(templates)
    else:
        if context is None:
            context = _learn_context(train_context_from, towers, labels, holdout_idx, context_source, run_dir, run,
                                     n_ctx=n_ctx, steps=steps, lr=lr, batch_size=batch_size, seed=seed, init=init,
                                     logit_scale=logit_scale, progress=progress)
            if out is not None:
                context.save(Path(out) / CONTEXT_FILE)
                settings["context_file"] = CONTEXT_FILE
        elif not isinstance(context, LearnedContext):
            settings["context_file"] = str(Path(context).resolve())
            context = LearnedContext.load(context)
        weights = context_weights(towers, names, context)
        settings["context"] = context.settings | {"n_ctx": context.n_ctx}
    scores = zero_shot_scores(embeddings, weights)
    position = {c: j for j, c in enumerate(candidates)}
    local = np.array([position[c] for c in y], np.int64)

    explicit = ks is not None
    ks = list(ks) if explicit else [1, 5]
    tables = []
    if holdout_idx:
        held = np.isin(y, holdout_idx)
        cols = [position[h] for h in holdout_idx]
        held_local = np.array([cols.index(position[c]) for c in y[held]], np.int64)
        held_names = [names[c] for c in cols]
        tables.append(evaluate_table("heldout_among_heldout", "Held-out-class rows among the held-out classes",
                                     scores[held][:, cols], held_local, held_names,
                                     _resolve_ks(ks, len(cols), explicit)))
        tables.append(evaluate_table("heldout_among_all", "Held-out-class rows among all candidate classes",
                                     scores[held], local[held], names, _resolve_ks(ks, len(names), explicit)))
        if (~held).any():
            tables.append(evaluate_table("seen_among_all", "Training-class rows among all candidate classes",
                                         scores[~held], local[~held], names, _resolve_ks(ks, len(names), explicit)))
    else:
        tables.append(evaluate_table("all", "All labelled rows among the candidate classes", scores, local, names,
                                     _resolve_ks(ks, len(names), explicit)))
    result = ZeroShotResult(prediction=str(pred_dir.resolve()), method=str(pred.method), subject=int(pred.subject),
                            split=str(pred.split), clip=str(towers.identity.get("model", clip_name)), prompt=prompt,
                            tables=tables, n_rows=int(len(rows)), n_unlabelled=int(n_unlabelled),
                            labels_source=str(labels.source), settings=settings)
    if out is not None:
        result.write(out)
    return result


def _learn_context(train_pred, towers, labels, holdout_idx, source, run_dir, run, **kwargs) -> LearnedContext:
    """CoOp context learned on the training rows (classes not held out) of the prediction folder ``train_pred``."""
    from brainmclip.features.pooled import pooled_prediction
    from brainmclip.models.predictions import load_predictions

    train_pred = Path(train_pred)
    if not train_pred.is_dir():
        raise MissingInputError(f"{train_pred}: no training-split predictions to learn the context from (run brainmclip "
                                "predict --split train, or pass --train-pred DIR)")
    pred = load_predictions(train_pred)
    rows, y = _labelled_rows(labels, pred.stimulus_ids)
    keep = ~np.isin(y, holdout_idx)
    rows, y = rows[keep], y[keep]
    if not len(rows):
        raise InvalidInputError(f"{train_pred}: no labelled row of a training (not held-out) class to learn the "
                                "context from")
    train_classes = sorted(set(y.tolist()))
    if len(train_classes) < 2:
        raise InvalidInputError(f"{train_pred}: rows of one training class only ({labels.names[train_classes[0]]!r}); "
                                "learning a context needs two or more classes")
    if source == "fmri":
        x = np.asarray(pooled_prediction(pred), np.float32)[rows]
    else:
        from brainmclip.features.feature_store import open_feature_store
        from brainmclip.features.pooled import image_embeddings
        from brainmclip.paths import resolve_path

        if run_dir is None or not run.get("features"):
            raise MissingInputError("context source 'image' needs the run's feature store, and the run records none")
        store = open_feature_store(resolve_path(run["features"], run_dir))
        x = np.asarray(image_embeddings(store, pred.stimulus_ids[rows]), np.float32)
    position = {c: j for j, c in enumerate(train_classes)}
    context = train_context(towers, x, [position[c] for c in y], [labels.names[c] for c in train_classes],
                            source=f"{source} embeddings of {train_pred.resolve()}", **kwargs)
    return context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="prediction folder (brainmclip predict)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for zero_shot.json and zero_shot.md")
    parser.add_argument("--data", type=Path, help="prepared dataset whose labels to use (default: the run's)")
    parser.add_argument("--clip", help="CLIP model of the embedding space (default: the one the prediction records)")
    parser.add_argument("--labels", help="class labels: CSV 'stimulus_id,class', a labels.json, or scene:category / "
                                         "scene:colour / scene:background for a simulated NSD (default: the "
                                         "labels the run was trained with, else the prepared dataset's)")
    parser.add_argument("--classes", nargs="+", metavar="NAME",
                        help="candidate classes (default: every class among the classified rows)")
    parser.add_argument("--holdout", nargs="+", metavar="NAME",
                        help="classes held out of training (names, space- or comma-separated; default: the run's "
                             "data.holdout_classes): report held-out rows among held-out classes and among all")
    parser.add_argument("--prompt", choices=("ensemble", "coop"), default=None,
                        help="class weights from BrainCLIP's 18 templates or a learned CoOp context (default: coop "
                             "when --context or --train-context is given, else ensemble)")
    parser.add_argument("--context", type=Path, help="learned context file (context.safetensors) for --prompt coop")
    parser.add_argument("--train-context", action="store_true",
                        help="learn the CoOp context on the run's train-split predictions (classes not held out); "
                             "saved as OUT/context.safetensors")
    parser.add_argument("--train-pred", type=Path,
                        help="train-split prediction folder for --train-context (default: RUN/predictions_train)")
    parser.add_argument("--context-source", choices=("fmri", "image"), default="fmri",
                        help="learn the context from the training rows' fMRI embeddings (default) or CLIP image "
                             "embeddings")
    parser.add_argument("--n-ctx", type=int, default=4, help="context vectors (default 4)")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps of context learning (default 200)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of context learning (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topk", type=int, nargs="+", metavar="K", help="top-k accuracies (default: 1 5)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _names(values) -> list[str] | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: class names given with spaces or commas."""
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def run(args) -> int:
    from brainmclip.models.predictions import load_predictions

    holdout = _names(args.holdout)
    if holdout is None:  # the classes the run itself was trained without
        _, record = _read_run(Path(args.pred), load_predictions(args.pred).manifest)
        holdout = record.get("config", {}).get("data", {}).get("holdout_classes") or None
    train_from = None
    if args.train_context:
        if args.context is not None:
            raise InvalidInputError("--context and --train-context exclude each other; give one")
        train_from = args.train_pred
        if train_from is None:
            run_dir, _ = _read_run(Path(args.pred), load_predictions(args.pred).manifest)
            if run_dir is None:
                raise MissingInputError(f"{args.pred}: records no training run; pass --train-pred DIR")
            train_from = run_dir / "predictions_train"
    elif args.train_pred is not None:
        raise InvalidInputError("--train-pred is only used with --train-context")
    prompt = args.prompt or ("coop" if args.context is not None or train_from is not None else "ensemble")
    result = classify(args.pred, data=args.data, clip=args.clip, labels_file=args.labels, classes=_names(args.classes),
                      holdout=holdout, prompt=prompt, context=args.context, out=args.out, ks=args.topk,
                      train_context_from=train_from, context_source=args.context_source, n_ctx=args.n_ctx,
                      steps=args.steps, lr=args.lr, seed=args.seed, device="cpu" if args.cpu else None,
                      progress=not (args.no_progress or getattr(args, "quiet", False)))
    print(result.markdown())
    print(f"wrote {Path(args.out) / RESULT_FILE}")
    return 0
