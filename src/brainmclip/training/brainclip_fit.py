"""Training BrainCLIP: an fMRI mapping network aligned contrastively with CLIP image and caption embeddings.

Each epoch draws one caption per training image (its text target for that epoch), shuffles, and takes
AdamW steps on batches of ``train.batch_size``. A batch larger than memory allows is split into
``train.micro_batch`` chunks without changing the result: the embeddings of all chunks are computed
without gradients, the loss over the whole batch gives the gradient with respect to each embedding, and
each chunk is then run again with gradients and back-propagated from that (a gradient cache; InfoNCE
needs every negative of the batch, so plain accumulation would change the loss).

The best epoch is chosen on the validation split by mean recall (Recall@1/5/10 of fMRI -> image when
the image term is trained, else fMRI -> text), never on test. Checkpoints after every epoch make the run
resumable; the VAE mapping's pre-trained embedding VAE is saved once and reused on resume.

Class hold-out (``data.holdout_classes``) removes every train and val row whose image shows a listed class
(as its main object, or anywhere when the labels know every object, as for simulated scenes), so
zero-shot classification of those classes afterwards is a test on classes the mapping never saw.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from brainmclip import __version__
from brainmclip.atomic import atomic_path, output_lock, write_json_atomic
from brainmclip.config import (
    apply_overrides,
    check_float,
    check_int,
    check_keys,
    check_sections,
    load_config,
    merge,
)
from brainmclip.data.prepared import load_prepared
from brainmclip.errors import InvalidInputError, MissingInputError, OutputInTheWayError
from brainmclip.evaluation.retrieval import recall_at_k
from brainmclip.features.feature_store import open_feature_store
from brainmclip.features.pooled import caption_embeddings, clip_name_of, image_embeddings, store_clip, unit
from brainmclip.losses.brainclip_objective import brainclip_loss
from brainmclip.models.brainclip import BrainCLIPConfig, EmbeddingVAE, build_mapping
from brainmclip.paths import record_path
from brainmclip.training.checkpoint import identity_of, load_checkpoint, load_safetensors, save_checkpoint
from brainmclip.training.run_folder import CHECKPOINT_FILE, RUN_FILE, clear_run_folder, read_run_record

__all__ = ["DEFAULT_BRAINCLIP_CONFIG", "BrainCLIPResult", "brainclip_outputs", "check_brainclip_config",
           "load_brainclip", "train_brainclip"]

log = logging.getLogger("brainmclip.train")

BEST_FILE = "model_best.safetensors"
VAE_FILE = "embedding_vae.safetensors"

DEFAULT_BRAINCLIP_CONFIG = {
    "method": "brainclip",
    "data": {"voxels": "all", "holdout_classes": [], "labels": None},
    "model": {"mapping": "linear", "hidden_dim": 1024, "latent_dim": 256, "dropout": 0.0},
    "loss": {"alpha": 1.0, "beta": 0.0, "temperature": 0.07, "kl_weight": 0.001},
    "train": {"epochs": 60, "batch_size": 640, "micro_batch": 0, "lr": 1e-3, "weight_decay": 0.01,
              "betas": [0.9, 0.999], "eps": 1e-8, "seed": 0, "patience": 15},
    "vae": {"bank": "store", "steps": 2000, "batch_size": 512, "lr": 1e-3, "kl_weight": 0.001, "seed": 0},
}
_SECTIONS = tuple(DEFAULT_BRAINCLIP_CONFIG)


def check_brainclip_config(cfg: dict) -> dict:
    """``cfg`` if every value is usable; else one error naming the first bad one."""
    check_sections(cfg, _SECTIONS)
    if cfg["method"] != "brainclip":
        raise InvalidInputError(f"method={cfg['method']!r}: a BrainCLIP config needs method 'brainclip'")
    for section in ("data", "loss", "train", "vae"):
        unknown = set(cfg[section]) - set(DEFAULT_BRAINCLIP_CONFIG[section])
        if unknown:
            raise InvalidInputError(f"Unknown {section} config keys {sorted(unknown)}; known: "
                                    f"{sorted(DEFAULT_BRAINCLIP_CONFIG[section])}")
    check_keys(BrainCLIPConfig, cfg["model"], "model")
    BrainCLIPConfig.from_dict({**cfg["model"], "n_voxels": 1, "embed_dim": 1})
    data, loss, train, vae = cfg["data"], cfg["loss"], cfg["train"], cfg["vae"]
    if not isinstance(data["voxels"], str):
        raise InvalidInputError(f"data.voxels={data['voxels']!r}: expected the name of a voxel group, e.g. 'all'")
    holdout = data["holdout_classes"]
    if not isinstance(holdout, list) or not all(isinstance(c, str) for c in holdout):
        raise InvalidInputError(f"data.holdout_classes={holdout!r}: expected a list of class names")
    if data["labels"] is not None and not isinstance(data["labels"], str):
        raise InvalidInputError(f"data.labels={data['labels']!r}: expected a labels file path or null")
    check_float("loss.alpha", loss["alpha"], 0)
    check_float("loss.beta", loss["beta"], 0)
    if loss["alpha"] + loss["beta"] <= 0:
        raise InvalidInputError("loss.alpha and loss.beta are both 0; expected at least one supervision (V, T or V&T)")
    check_float("loss.temperature", loss["temperature"], 0, low_open=True)
    check_float("loss.kl_weight", loss["kl_weight"], 0)
    check_int("train.epochs", train["epochs"], 1)
    check_int("train.batch_size", train["batch_size"], 2)
    check_int("train.micro_batch", train["micro_batch"], 0)
    check_float("train.lr", train["lr"], 0, low_open=True)
    check_float("train.weight_decay", train["weight_decay"], 0)
    if not (isinstance(train["betas"], list) and len(train["betas"]) == 2):
        raise InvalidInputError(f"train.betas={train['betas']!r}: expected two numbers in [0, 1)")
    for b in train["betas"]:
        check_float("train.betas[]", b, 0, 1, high_open=True)
    check_float("train.eps", train["eps"], 0, low_open=True)
    check_int("train.seed", train["seed"], 0)
    check_int("train.patience", train["patience"], 0)
    if not isinstance(vae["bank"], str) or not vae["bank"]:
        raise InvalidInputError(f"vae.bank={vae['bank']!r}: expected 'store', 'scenes:N' or an image folder")
    if vae["bank"].startswith("scenes:"):
        try:
            check_int("vae.bank scenes", int(vae["bank"][7:]), 2)
        except ValueError:
            raise InvalidInputError(f"vae.bank={vae['bank']!r}: expected scenes:N with N a number of scenes") from None
    check_int("vae.steps", vae["steps"], 1)
    check_int("vae.batch_size", vae["batch_size"], 2)
    check_float("vae.lr", vae["lr"], 0, low_open=True)
    check_float("vae.kl_weight", vae["kl_weight"], 0)
    check_int("vae.seed", vae["seed"], 0)
    return cfg


def resolve_brainclip_config(config, overrides=None) -> dict:
    """Defaults, then config files (names or paths) or a dict, then ``--set`` overrides; checked."""
    given = config if isinstance(config, dict) else load_config(config or ["brainclip_linear_v"])
    cfg = merge(DEFAULT_BRAINCLIP_CONFIG, given)
    return check_brainclip_config(apply_overrides(cfg, overrides or []))


@dataclass(frozen=True)
class BrainCLIPResult:
    run_dir: Path
    best_epoch: int
    epochs_done: int
    val: dict
    parameters: dict
    seconds: float
    finished: bool

    def summary(self) -> str:
        image = self.val.get("image", {}).get("recall@1", float("nan"))
        text = self.val.get("text", {}).get("recall@1", float("nan"))
        return (f"BrainCLIP run at {self.run_dir}: best epoch {self.best_epoch} of {self.epochs_done}; val "
                f"fMRI->image R@1 {image:.3f}, fMRI->text R@1 {text:.3f} (chance {1 / max(self.val.get('n', 1), 1):.3f}); "
                f"{self.parameters['trainable'] / 1e6:.2f}M trainable parameters; {self.seconds:.1f} s"
                + ("" if self.finished else " (stopped early; rerun with --resume to continue)"))


@dataclass
class _Split:
    rows: np.ndarray          # rows of the prepared split
    ids: np.ndarray
    images: np.ndarray        # (n, D) unit CLIP image embeddings
    captions: object          # CaptionEmbeddings


def _fmri(samples, rows: np.ndarray, columns: np.ndarray) -> torch.Tensor:
    order = np.argsort(rows)
    out = np.empty((len(rows), len(columns)), np.float32)
    out[order] = np.asarray(samples.betas[rows[order]])[:, columns]
    return torch.from_numpy(out)


def _split(prepared, name: str, store, holdout_ids: set[int], towers, progress: bool) -> _Split:
    samples = prepared.splits[name]
    ids = samples.stimulus_ids
    rows = np.array([r for r, i in enumerate(ids.tolist()) if i not in holdout_ids], np.int64)
    kept = ids[rows]
    return _Split(rows, kept, image_embeddings(store, kept),
                  caption_embeddings(store, [prepared], kept, towers=towers, progress=progress))


def _bank(cfg: dict, store, prepared, towers, progress: bool) -> np.ndarray:
    """Unpaired CLIP image embeddings for the embedding VAE; never this subject's test images."""
    bank = cfg["vae"]["bank"]
    if bank == "store":
        test = set(prepared.splits["test"].stimulus_ids.tolist())
        ids = np.array([i for i in store.stored_ids().tolist() if i not in test], np.int64)
        return image_embeddings(store, ids)
    from brainmclip.features.clip_extractor import ClipFeatureExtractor

    extractor = ClipFeatureExtractor(towers, (1,), towers.n_vision_layers)
    if bank.startswith("scenes:"):
        from brainmclip.miniature.world import build_bank

        images = build_bank(int(bank[7:]), seed=cfg["vae"]["seed"], stream="train", size=128, progress=progress).images
    else:
        images = _image_folder(Path(bank))
    parts = [extractor.image_embeds(images[i:i + 64]).numpy() for i in range(0, len(images), 64)]
    return unit(np.concatenate(parts))


def _image_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    if not folder.is_dir():
        raise MissingInputError(f"vae.bank={str(folder)!r}: not 'store', 'scenes:N' or a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        raise InvalidInputError(f"{folder}: {len(files)} images (PNG/JPEG); the embedding VAE needs a bank of many")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC)) for f in files])


def pretrain_embedding_vae(bank: np.ndarray, model_cfg: BrainCLIPConfig, vae_cfg: dict,
                           progress: bool = True) -> tuple[EmbeddingVAE, dict]:
    """Train a VAE of unit CLIP image embeddings (cosine reconstruction + weighted KL)."""
    from brainmclip.losses.reconstruction import cosine_loss, gaussian_kl

    torch.manual_seed(vae_cfg["seed"])
    vae = EmbeddingVAE(model_cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=vae_cfg["lr"])
    data = torch.from_numpy(bank)
    rng = np.random.default_rng(vae_cfg["seed"])
    bar = tqdm(range(vae_cfg["steps"]), desc="embedding VAE", unit="step", disable=not progress)
    recon = kl = torch.zeros(())
    for _ in bar:
        batch = data[rng.integers(len(data), size=min(vae_cfg["batch_size"], len(data)))]
        out = vae(batch)
        recon, kl = cosine_loss(out.embedding, batch), gaussian_kl(out.mu, out.logvar)
        loss = recon + vae_cfg["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(cos=f"{1 - recon.item():.3f}", kl=f"{kl.item():.1f}")
    vae.eval()
    with torch.no_grad():
        mean_cos = 1 - float(cosine_loss(vae(data[:4096]).embedding, data[:4096]))
    return vae, {"bank_size": len(bank), "reconstruction_cosine": mean_cos, "final_kl": float(kl.detach())}


def _embed(model, fmri: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(fmri[i:i + batch]).embedding for i in range(0, len(fmri), batch)])
    model.train(was)
    return out


def _recalls(embedding: torch.Tensor, split: _Split) -> dict:
    f = unit(embedding.numpy())
    image = recall_at_k(f @ split.images.T)["image_retrieval"]
    text = recall_at_k(f @ split.captions.mean().T)["image_retrieval"]
    return {"image": image, "text": text, "n": len(f)}


def _step(model, opt, fmri: torch.Tensor, image: torch.Tensor, text: torch.Tensor, cfg: dict,
          generator: torch.Generator) -> float:
    loss_cfg = cfg["loss"]
    noise = None
    if cfg["model"]["mapping"] == "vae":
        noise = torch.randn(len(fmri), cfg["model"]["latent_dim"], generator=generator)

    def loss_of(out, rows):
        return brainclip_loss(out.embedding, image[rows], text[rows], loss_cfg["alpha"], loss_cfg["beta"],
                              loss_cfg["temperature"], out.mu, out.logvar, loss_cfg["kl_weight"])

    opt.zero_grad(set_to_none=True)
    micro = cfg["train"]["micro_batch"]
    everything = slice(None)
    if micro == 0 or micro >= len(fmri):
        loss = loss_of(model(fmri, noise), everything).total
        loss.backward()
    else:
        chunks = [slice(i, i + micro) for i in range(0, len(fmri), micro)]
        # Each chunk's second pass must draw the dropout mask of its first, or the cached gradient would
        # belong to other embeddings: remember torch's generator state before each first pass.
        states, outs = [], []
        with torch.no_grad():
            for c in chunks:
                states.append(torch.get_rng_state())
                outs.append(model(fmri[c], None if noise is None else noise[c]))
        after = torch.get_rng_state()
        emb = torch.cat([o.embedding for o in outs]).requires_grad_(True)
        mu = logvar = None
        if noise is not None:
            mu = torch.cat([o.mu for o in outs]).requires_grad_(True)
            logvar = torch.cat([o.logvar for o in outs]).requires_grad_(True)
        whole = brainclip_loss(emb, image, text, loss_cfg["alpha"], loss_cfg["beta"], loss_cfg["temperature"], mu,
                               logvar, loss_cfg["kl_weight"])
        loss = whole.total
        leaves = [emb] + ([mu, logvar] if mu is not None else [])
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for c, rng_state in zip(chunks, states, strict=True):
            torch.set_rng_state(rng_state)
            out = model(fmri[c], None if noise is None else noise[c])
            tensors = [out.embedding] + ([out.mu, out.logvar] if mu is not None else [])
            pairs = [(t, g[c]) for t, g in zip(tensors, grads, strict=True) if g is not None]
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        torch.set_rng_state(after)
    opt.step()
    return float(loss.detach())


def _save_best(path: Path, model, model_cfg: BrainCLIPConfig, extra: dict) -> None:
    import json

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(model_cfg.to_dict()), "extra": json.dumps(extra)})


def load_brainclip(run_dir: Path):
    """The best mapping network of a run, in eval mode."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; the run has not finished an epoch yet (train it, or --resume it)")
    meta, state = load_safetensors(path, ("config",))
    model = build_mapping(BrainCLIPConfig.from_dict(meta["config"]))
    model.load_state_dict(state)
    return model.eval()


def _identities(data: Path, features: Path) -> dict:
    return {"data": identity_of(data / "manifest.json"), "features": identity_of(features / "manifest.json")}


def train_brainclip(data, features, config, out, overrides=None, resume: bool = False, force: bool = False,
                    stop_after_epochs: int | None = None, progress: bool = True) -> BrainCLIPResult:
    """Train BrainCLIP into the run folder ``out`` (resumable; ``force`` first deletes an earlier run there)."""
    start = time.perf_counter()
    data, features, out = Path(data), Path(features), Path(out)
    with output_lock(out):
        prepared = load_prepared(data)
        store = open_feature_store(features)
        identities = _identities(data, features)
        state = None
        ckpt = out / CHECKPOINT_FILE
        if force:
            cfg = resolve_brainclip_config(config, overrides)
        elif resume and ckpt.is_file():
            state = load_checkpoint(ckpt)
            cfg = state["config"]
            from brainmclip.training.checkpoint import same_identities

            if not same_identities(state["identities"], identities):
                raise InvalidInputError(f"{out}: the checkpoint was trained on other data or features; pass --force "
                                        "to start a new run there")
        else:
            record = read_run_record(out)
            if record is not None and not resume:
                raise OutputInTheWayError(f"{out} already holds a run; pass --resume to continue it, --force to start "
                                          "it again, or choose another --out")
            cfg = record["config"] if (resume and record) else resolve_brainclip_config(config, overrides)
        if force:
            clear_run_folder(out, predictions=True)
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            return _train(cfg, prepared, store, data, features, out, identities, state, stop_after_epochs,
                          progress, start)
        finally:
            log.removeHandler(handler)
            handler.close()


def _train(cfg, prepared, store, data, features, out, identities, state, stop_after_epochs, progress, start):
    columns = prepared.voxels.group(cfg["data"]["voxels"])
    if len(columns) == 0:
        raise InvalidInputError(f"{data}: voxel group {cfg['data']['voxels']!r} is empty")
    holdout_ids: set[int] = set()
    if cfg["data"]["holdout_classes"]:
        from brainmclip.data.labels import load_class_labels

        holdout_ids = load_class_labels(data, cfg["data"]["labels"]).showing(cfg["data"]["holdout_classes"])
    towers = store_clip(store)
    embed_dim = towers.embed_dim
    train = _split(prepared, "train", store, holdout_ids, towers, progress)
    val = _split(prepared, "val", store, holdout_ids, towers, progress)
    if len(train.rows) < 2 or len(val.rows) < 2:
        raise InvalidInputError(f"{data}: {len(train.rows)} training and {len(val.rows)} validation rows after the "
                                "class hold-out; expected at least 2 of each")
    for name, split in (("train", train), ("val", val)):
        block = _fmri(prepared.splits[name], split.rows, columns)
        if not torch.isfinite(block).all():
            raise InvalidInputError(f"{data} {name}: fMRI holds NaN or inf; prepare the dataset again from clean inputs")
    model_cfg = BrainCLIPConfig.from_dict({**cfg["model"], "n_voxels": len(columns), "embed_dim": embed_dim})
    torch.manual_seed(cfg["train"]["seed"])
    model = build_mapping(model_cfg)
    vae_info = {}
    if model_cfg.mapping == "vae":
        vae_path = out / VAE_FILE
        if vae_path.is_file():
            meta, vstate = load_safetensors(vae_path, ("info",))
            vae_info = meta["info"]
        else:
            bank = _bank(cfg, store, prepared, towers, progress)
            vae, vae_info = pretrain_embedding_vae(bank, model_cfg, cfg["vae"], progress)
            vstate = {k[len("decoder."):]: v for k, v in vae.state_dict().items() if k.startswith("decoder.")}
            import json

            from safetensors.torch import save_file

            with atomic_path(vae_path) as tmp:
                save_file({k: v.contiguous() for k, v in vstate.items()}, str(tmp),
                          metadata={"info": json.dumps(vae_info)})
            log.info("embedding VAE on %d unpaired CLIP image embeddings: reconstruction cosine %.3f",
                     vae_info["bank_size"], vae_info["reconstruction_cosine"])
        model.load_decoder(vstate)
    tc = cfg["train"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["lr"], betas=tuple(tc["betas"]), eps=tc["eps"],
                            weight_decay=tc["weight_decay"])
    counts = {"trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters())}
    history, best, epoch0 = [], {"score": -1.0, "epoch": 0, "val": {}}, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, best, epoch0 = state["history"], state["best"], state["epoch"]
    record = {"method": "brainclip", "config": cfg, "identities": identities, "data": record_path(data, out),
              "features": record_path(features, out), "subject": prepared.subject, "clip": clip_name_of(store),
              "parameters": counts, "code_version": __version__, "embedding_vae": vae_info,
              "holdout_stimuli": len(holdout_ids)}
    write_json_atomic(out / RUN_FILE, {**record, "complete": False})
    train_fmri = _fmri(prepared.splits["train"], train.rows, columns)
    val_fmri = _fmri(prepared.splits["val"], val.rows, columns)
    images = torch.from_numpy(train.images)
    score_kind = "image" if cfg["loss"]["alpha"] > 0 else "text"
    bar = tqdm(range(epoch0, tc["epochs"]), desc="BrainCLIP", unit="epoch", initial=epoch0, total=tc["epochs"],
               disable=not progress)
    finished = True
    epoch = epoch0
    for epoch in bar:
        rng = np.random.default_rng([tc["seed"], epoch])
        epoch_seed = int(rng.integers(2**31))
        generator = torch.Generator().manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed + 1)  # dropout draws from torch's global generator: same masks after a resume
        text = torch.from_numpy(train.captions.sample(rng))
        order = rng.permutation(len(train.rows))
        model.train()
        losses = []
        for b in range(0, len(order), tc["batch_size"]):
            rows = order[b:b + tc["batch_size"]]
            if len(rows) < 2:
                continue
            losses.append(_step(model, opt, train_fmri[rows], images[rows], text[rows], cfg, generator))
        val_scores = _recalls(_embed(model, val_fmri), val)
        score = val_scores[score_kind]["mean_recall"]
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val": val_scores})
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "val": val_scores}
            _save_best(out / BEST_FILE, model, model_cfg, {"epoch": epoch + 1})
        log.info("epoch %d: train loss %.4f, val fMRI->image R@1 %.3f, fMRI->text R@1 %.3f", epoch + 1,
                 history[-1]["train_loss"], val_scores["image"]["recall@1"], val_scores["text"]["recall@1"])
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val=f"{score:.3f}")
        save_checkpoint(out / CHECKPOINT_FILE, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                "epoch": epoch + 1, "history": history, "best": best,
                                                "config": cfg, "identities": identities})
        if tc["patience"] and epoch + 1 - best["epoch"] >= tc["patience"]:
            log.info("no better val %s mean recall for %d epochs: stopping", score_kind, tc["patience"])
            break
        if stop_after_epochs is not None and epoch + 1 - epoch0 >= stop_after_epochs and epoch + 1 < tc["epochs"]:
            finished = False
            break
    bar.close()
    write_json_atomic(out / RUN_FILE, {**record, "complete": finished, "best_epoch": best["epoch"],
                                         "val": best["val"], "history": history})
    return BrainCLIPResult(out, best["epoch"], len(history), best["val"], counts, time.perf_counter() - start,
                           finished)


def brainclip_outputs(run_dir: Path, run: dict, prepared, split: str) -> dict[str, np.ndarray]:
    """The run's fMRI embedding of every row of ``split``, unit length, as both image and text ``(n, 1, D)``."""
    model = load_brainclip(run_dir)
    columns = prepared.voxels.group(run["config"]["data"]["voxels"])
    if len(columns) != model.config.n_voxels:
        raise InvalidInputError(f"{run_dir} was trained on {model.config.n_voxels} voxels (subject {run.get('subject')})"
                                f"; {prepared.root} has {len(columns)} (subject {prepared.subject}); predict from a "
                                "dataset of the run's subject")
    samples = prepared.splits[split]
    fmri = _fmri(samples, np.arange(len(samples)), columns)
    f = unit(_embed(model, fmri).numpy())[:, None, :]
    return {"image": f, "text": f.copy()}
