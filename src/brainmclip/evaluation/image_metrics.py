"""The field's eight image-reconstruction metrics (PixCorr, SSIM, AlexNet(2), AlexNet(5),
InceptionV3, CLIP, EffNet-B, SwAV), with the identification as matrix ops.

The networks take the images a few at a time on CPU (``batch_size`` 4) and 32 at a time on a GPU. On
a 2-core x86 CPU their time per image did not fall with the batch: batch 32 took 0.5-0.8x the speed
of one image at a time for AlexNet, InceptionV3, EffNet-B and SwAV (the activations of a large batch
leave the caches), batch 4 0.9-1.2x. What keeps the evaluation from growing quadratically in Python
is the identification: one correlation matrix per network, not a loop over image pairs.

Inputs are uint8 RGB arrays ``(n, H, W, 3)``; reconstruction ``i`` pairs with ground truth ``i``
(the two sets may differ in size). Two protocols:

``mindeye1`` (default; MindEye1's evaluation, re-implemented from its description)
    Both sets are first resized to 256 x 256 (torch bilinear, ``antialias=False``, floats in
    [0, 1], not re-quantised). Every later resize is also torch bilinear without antialiasing to
    a square ``size x size``: PixCorr and SSIM at 425, AlexNet at 256, InceptionV3 at 342, CLIP at
    224, EffNet-B at 255, SwAV at 224.

``brain-diffuser`` (Brain-Diffuser's ``scripts/evaluate_reconstruction.py`` and ``eval_extract_features.py``)
    Pixel metrics keep the ground truth at its native size (425 px on NSD) and resize the
    reconstruction to it with PIL's bicubic filter (``Image.resize``'s default for RGB images),
    both as float64 ``uint8 / 255``; PixCorr is ``np.corrcoef`` of the flattened RGB arrays and
    SSIM is column-wise (what scikit-image 0.17 computed with ``multichannel=True`` on grey
    images, see below). For the networks each image is resized once, from its native size, to
    224 x 224 with PIL's bilinear filter (``torchvision.transforms.functional.resize`` on a PIL
    image, which antialiases when shrinking); no later resize.

Metric definitions:

* PixCorr: Pearson r between the flattened RGB values of recon ``i`` and truth ``i``; mean over i.
* SSIM (``ssim="gaussian"``): ``skimage.color.rgb2gray`` then ``structural_similarity(gt, rec,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)`` on the 2-D grey
  images (float64). ``ssim="columnwise"`` reproduces what scikit-image <= 0.19 computed when called
  with ``multichannel=True`` on 2-D grey images (as MindEye did): the last axis (image columns) was
  taken as channels, so SSIM was a 1-D SSIM down each column (Gaussian window along the rows only,
  2*int(3.5*1.5+0.5)+1 = 11 taps, reflect padding, 5 rows cropped at each end), averaged over
  the columns. Here it is vectorised with ``scipy.ndimage.gaussian_filter1d`` along axis 0; the
  tests check it against ``structural_similarity(gt[:, j], rec[:, j], ...)`` looped over ``j``.
* AlexNet(2) / AlexNet(5): torchvision ``alexnet`` (IMAGENET1K_V1) nodes ``features.4`` /
  ``features.11``; InceptionV3: ``inception_v3`` (IMAGENET1K_V1, ``aux_logits=True``,
  ``transform_input=True`` as torchvision sets for these weights) node ``avgpool``; CLIP: the
  projected image embedding of CLIP ViT-L/14 (``towers.vision(pixel_values=...).image_embeds``,
  CLIP mean/std). All four are scored by 2-way identification: with ``r[i, j]`` the Pearson
  correlation of ground truth ``i``'s features with recon ``j``'s, recon ``j`` scores the share of
  ``i != j`` with ``r[i, j] < r[j, j]`` (strict: ties do not count); the metric is the mean over j.
* EffNet-B: torchvision ``efficientnet_b1`` (IMAGENET1K_V2) node ``avgpool``; SwAV: ResNet-50
  SwAV (a torchvision ``resnet50`` with the ``swav_800ep_pretrain.pth.tar`` state dict, as the
  torch hub entry builds it) node ``avgpool``. Both are the mean over i of the correlation distance
  ``1 - r(feat(gt_i), feat(recon_i))`` (lower is better).
* ImageNet networks normalise with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).

Weights are never downloaded. A network's state dict is read from ``weights_dir/<file>`` or
``torch.hub.get_dir()/checkpoints/<file>`` with the file names torchvision (and the SwAV hub entry)
use. When neither exists, a one-line :class:`FileNotFoundError` names the network and the places
searched, unless ``allow_random=True``: then the network is randomly initialised with a fixed
seed and its metrics are listed under ``"uncalibrated"`` in the result (numbers from such networks
are only good for testing the machinery, never for reporting). CLIP is loaded with
:func:`brainmclip.features.clip_models.load_clip`; a missing CLIP model falls back to the seeded
``tiny`` random towers under ``allow_random``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainmclip.errors import InvalidInputError, MissingInputError
from brainmclip.evaluation.metric_table import (
    DISTANCE_METRICS,
    IDENTIFICATION_METRICS,
    METRICS,
    PIXEL_METRICS,
    check_metrics,
)
from brainmclip.types import MetricReport

__all__ = [
    "METRICS", "IDENTIFICATION_METRICS", "DISTANCE_METRICS", "PIXEL_METRICS", "WEIGHT_FILES",
    "MetricProtocol", "MetricNetwork", "resize_images", "first_resize", "pixcorr", "ssim", "ssim_columnwise",
    "pearson_matrix", "rowwise_pearson", "two_way_from_corr", "two_way_identification",
    "correlation_distance", "load_metric_networks", "network_features", "evaluate_images", "truth_native_pixels",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: State-dict file names, as torchvision (and the SwAV torch hub entry) save them in the hub cache.
WEIGHT_FILES = {
    "AlexNet": "alexnet-owt-7be5be79.pth",
    "InceptionV3": "inception_v3_google-0cc3c7bd.pth",
    "EffNet-B": "efficientnet_b1-c27df63c.pth",
    "SwAV": "swav_800ep_pretrain.pth.tar",
}
# Which network produces which metric, and from which graph node.
_NETWORK_NODES = {
    "AlexNet": {"AlexNet(2)": "features.4", "AlexNet(5)": "features.11"},
    "InceptionV3": {"InceptionV3": "avgpool"},
    "CLIP": {"CLIP": "image_embeds"},
    "EffNet-B": {"EffNet-B": "avgpool"},
    "SwAV": {"SwAV": "avgpool"},
}
_PROTOCOL_DEFAULTS = {
    "mindeye1": dict(ssim="gaussian", pixels="resized", first_size=256, resize="torch", pixel_size=425,
                     alexnet_size=256, inception_size=342, clip_size=224, effnet_size=255, swav_size=224),
    "brain-diffuser": dict(ssim="columnwise", pixels="truth-native", first_size=224, resize="pil", pixel_size=None,
                           alexnet_size=224, inception_size=224, clip_size=224, effnet_size=224, swav_size=224),
}
_RANDOM_SEED = 0


@dataclass(frozen=True)
class MetricProtocol:
    """How images are resized before each metric. Fields left as None take the protocol's defaults.

    ``pixels`` says where the pixel metrics are computed: ``"resized"`` (both images through the
    first resize, then to ``pixel_size``) or ``"truth-native"`` (the ground truth at its own size,
    the reconstruction PIL-bicubic resized to it; ``pixel_size`` unused). ``resize`` is the backend
    of the first resize: ``"torch"`` (bilinear, ``antialias=False``, on float tensors) or ``"pil"``
    (``Image.resize(..., BILINEAR)`` on the uint8 images). All later resizes use torch bilinear
    without antialiasing and are skipped when the size already matches. Every resize goes to a
    square ``size x size`` (the protocols' inputs are square after the first resize anyway).
    """

    name: str = "mindeye1"
    ssim: str | None = None
    pixels: str | None = None
    first_size: int | None = None
    resize: str | None = None
    pixel_size: int | None = None
    alexnet_size: int | None = None
    inception_size: int | None = None
    clip_size: int | None = None
    effnet_size: int | None = None
    swav_size: int | None = None

    def __post_init__(self):
        if self.name not in _PROTOCOL_DEFAULTS:
            raise InvalidInputError(f"Unknown protocol {self.name!r}; choose from {list(_PROTOCOL_DEFAULTS)}")
        for key, value in _PROTOCOL_DEFAULTS[self.name].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.ssim not in ("gaussian", "columnwise"):
            raise InvalidInputError(f"Unknown ssim={self.ssim!r}; choose 'gaussian' or 'columnwise'")
        if self.pixels not in ("resized", "truth-native"):
            raise InvalidInputError(f"Unknown pixels={self.pixels!r}; choose 'resized' or 'truth-native'")
        if self.pixels == "resized" and self.pixel_size is None:
            raise InvalidInputError("pixels='resized' needs a pixel_size")
        if self.resize not in ("torch", "pil"):
            raise InvalidInputError(f"Unknown resize={self.resize!r}; choose 'torch' or 'pil'")

    def network_size(self, network: str) -> int:
        return {"AlexNet": self.alexnet_size, "InceptionV3": self.inception_size, "CLIP": self.clip_size,
                "EffNet-B": self.effnet_size, "SwAV": self.swav_size}[network]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- resizing ---------------------------------------------------------------------------------------
def _check_images(images, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInputError(f"{what}: dtype {images.dtype} and shape {images.shape}; expected uint8 (n, H, W, 3)")
    return images


def resize_images(x: torch.Tensor, size: int | None, antialias: bool = False) -> torch.Tensor:
    """Float images (n, 3, H, W) to (n, 3, size, size): torch bilinear, antialias=False unless asked (no-op if equal)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def first_resize(images: np.ndarray, protocol: MetricProtocol) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float32 (n, 3, S, S) in [0, 1] after the protocol's first resize."""
    if protocol.resize == "pil" and protocol.first_size is not None:
        from PIL import Image

        size = protocol.first_size
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
                           for im in images])
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return resize_images(x, protocol.first_size)


def truth_native_pixels(recons: np.ndarray, truths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (n, 3, H, W) in [0, 1]: the truths at their own size, the recons PIL-bicubic resized to it."""
    from PIL import Image

    height, width = truths.shape[1:3]
    if recons.shape[1:3] != (height, width):
        recons = np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.Resampling.BICUBIC))
                           for im in recons])

    def tensor(images):
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0

    return tensor(recons), tensor(truths)


# -- pixel metrics ----------------------------------------------------------------------------------
def rowwise_pearson(a, b) -> np.ndarray:
    """Pearson r between row i of ``a`` and row i of ``b`` (flattened beyond axis 0), float64 (n,)."""
    a = torch.as_tensor(a).reshape(len(a), -1).double()
    b = torch.as_tensor(b).reshape(len(b), -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).cpu().numpy()


def pixcorr(recon: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Per-image PixCorr of float images (n, 3, H, W) already at the protocol's pixel size."""
    return rowwise_pearson(recon, truth)


def _grey(x: torch.Tensor) -> np.ndarray:
    from skimage.color import rgb2gray

    return rgb2gray(x.permute(0, 2, 3, 1).double().cpu().numpy())


def ssim(recon: torch.Tensor, truth: torch.Tensor, mode: str = "gaussian") -> np.ndarray:
    """Per-image SSIM of float images (n, 3, H, W) in [0, 1] (see the module notes for ``mode``)."""
    from skimage.metrics import structural_similarity

    rec, gt = _grey(recon), _grey(truth)
    if mode == "columnwise":
        return np.array([ssim_columnwise(g, r) for g, r in zip(gt, rec, strict=True)])
    if mode != "gaussian":
        raise InvalidInputError(f"Unknown SSIM mode {mode!r}")
    return np.array([structural_similarity(g, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0) for g, r in zip(gt, rec, strict=True)])


def ssim_columnwise(gt: np.ndarray, rec: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> float:
    """Old scikit-image ``multichannel=True`` SSIM of 2-D grey images: mean over columns of 1-D SSIM.

    Same arithmetic as ``structural_similarity(gt[:, j], rec[:, j], gaussian_weights=True,
    sigma=sigma, use_sample_covariance=False, data_range=data_range)`` averaged over ``j``.
    """
    from scipy.ndimage import gaussian_filter1d

    truncate = 3.5
    pad = int(truncate * sigma + 0.5)
    if gt.shape != rec.shape or gt.ndim != 2 or gt.shape[0] < 2 * pad + 1:
        raise InvalidInputError(f"columnwise SSIM needs equal 2-D images with >= {2 * pad + 1} rows; got {gt.shape}")
    x, y = gt.astype(np.float64), rec.astype(np.float64)

    def blur(v):
        return gaussian_filter1d(v, sigma, axis=0, mode="reflect", truncate=truncate)

    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s[pad:s.shape[0] - pad].mean(0).mean())


# -- identification and distances -------------------------------------------------------------------
_CHUNK_ELEMENTS = 2 ** 25  # float64 elements per feature-chunk of both inputs (256 MiB each)


def _flat(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.reshape(len(x), -1)


def pearson_matrix(a, b, device: str | torch.device | None = None) -> torch.Tensor:
    """r[i, j] = Pearson(a[i], b[j]) in float64: rows standardised, then matrix products over feature chunks."""
    a, b = _flat(a), _flat(b)
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    device = torch.device(device) if device is not None else a.device
    d = a.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(len(a), len(b), 1))
    chunks = [slice(s, min(s + step, d)) for s in range(0, d, step)]

    def moments(x):
        mean = sum(x[:, c].to(device, torch.float64).sum(1) for c in chunks) / d
        sq = sum(((x[:, c].to(device, torch.float64) - mean[:, None]) ** 2).sum(1) for c in chunks)
        return mean, sq.sqrt()

    (ma, na), (mb, nb) = moments(a), moments(b)
    r = torch.zeros(len(a), len(b), dtype=torch.float64, device=device)
    for c in chunks:
        r += (a[:, c].to(device, torch.float64) - ma[:, None]) @ (b[:, c].to(device, torch.float64) - mb[:, None]).T
    return (r / na[:, None] / nb[None, :]).cpu()


def two_way_from_corr(r) -> np.ndarray:
    """Per-recon 2-way identification from r (rows: ground truths i, columns: recons j).

    Recon j scores the share of i != j with r[i, j] < r[j, j] (strict; the diagonal never counts).
    """
    r = torch.as_tensor(r)
    n = r.shape[0]
    if r.ndim != 2 or r.shape[1] != n or n < 2:
        raise InvalidInputError(f"need a square correlation matrix of >= 2 items; got {tuple(r.shape)}")
    wins = (r < torch.diagonal(r)[None, :]).sum(0)
    return (wins.double() / (n - 1)).numpy()


def two_way_identification(gt_features, recon_features, device=None) -> tuple[float, np.ndarray]:
    """Mean and per-recon 2-way identification accuracy (fractions in [0, 1])."""
    per = two_way_from_corr(pearson_matrix(gt_features, recon_features, device=device))
    return float(per.mean()), per


def correlation_distance(gt_features, recon_features) -> tuple[float, np.ndarray]:
    """Mean and per-pair correlation distance 1 - r(gt_i, recon_i) (scipy's ``distance.correlation``)."""
    per = 1.0 - rowwise_pearson(gt_features, recon_features)
    return float(per.mean()), per


# -- networks ---------------------------------------------------------------------------------------
@dataclass
class MetricNetwork:
    """A feature network for one or more metrics: ``forward(normalised pixels) -> {metric: features}``."""

    name: str
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    calibrated: bool
    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    input_size: int | None = None  # a size the network needs whatever the protocol says (a CLIP's image size)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(_NETWORK_NODES[self.name])


def _weights_path(network: str, weights_dir) -> tuple[Path | None, list[Path]]:
    filename = WEIGHT_FILES[network]
    places = ([Path(weights_dir) / filename] if weights_dir is not None else [])
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    return next((p for p in places if p.is_file()), None), places


def _build_torchvision(network: str):
    from torchvision import models

    if network == "AlexNet":
        return models.alexnet(weights=None)
    if network == "InceptionV3":
        return models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    if network == "EffNet-B":
        return models.efficientnet_b1(weights=None)
    if network == "SwAV":
        return models.resnet50(weights=None)
    raise InvalidInputError(f"Unknown network {network!r}")


def _load_state_dict(network: str, model: torch.nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if network == "SwAV":
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, _unexpected = model.load_state_dict(state, strict=False)  # projection head/prototypes unused
        backbone_missing = [k for k in missing if not k.startswith("fc.")]
        if backbone_missing:
            raise InvalidInputError(f"SwAV weights {path}: missing backbone tensors, e.g. {backbone_missing[:3]}")
    else:
        model.load_state_dict(state)


def _torchvision_network(network: str, weights_dir, allow_random: bool, device) -> MetricNetwork:
    from torchvision.models.feature_extraction import create_feature_extractor

    path, places = _weights_path(network, weights_dir)
    if path is None and not allow_random:
        raise MissingInputError(f"{network} weights {WEIGHT_FILES[network]} not found in "
                                f"{', '.join(str(p.parent) for p in places)} (nothing is downloaded; "
                                "pass weights_dir, or allow_random=True for uncalibrated test numbers)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        model = _build_torchvision(network)
    if path is not None:
        _load_state_dict(network, model, path)
    model.eval()
    nodes = _NETWORK_NODES[network]
    with warnings.catch_warnings():  # "eval-mode nodes are a subsequence of train-mode nodes": we trace eval
        warnings.simplefilter("ignore", UserWarning)
        extractor = create_feature_extractor(model, return_nodes={node: metric for metric, node in nodes.items()})
    extractor = extractor.eval().to(device)

    def forward(x):
        return {k: v.reshape(len(v), -1) for k, v in extractor(x).items()}

    source = str(path) if path is not None else f"random-initialised (seed {_RANDOM_SEED}, uncalibrated)"
    return MetricNetwork(network, forward, IMAGENET_MEAN, IMAGENET_STD, path is not None, source,
                         torch.device(device))


def _clip_network(clip_model: str, allow_random: bool, device) -> MetricNetwork:
    from brainmclip.features.clip_extractor import CLIP_MEAN, CLIP_STD
    from brainmclip.features.clip_models import load_clip

    try:
        towers = load_clip(clip_model, device=device)
    except FileNotFoundError as err:
        if not allow_random:
            raise MissingInputError(f"CLIP: {str(err).splitlines()[0]}") from None
        towers = load_clip("tiny", device=device)
    vision = towers.vision.eval()

    def forward(x):
        return {"CLIP": vision(pixel_values=x).image_embeds}

    calibrated = not str(towers.identity.get("model", "")).startswith("random:")
    source = str(towers.identity.get("model")) + ("" if calibrated else " (random-initialised, uncalibrated)")
    # ViT-L/14 takes the protocols' 224 px; another CLIP (mini-CLIP: 64 px) takes its own size.
    size = int(vision.config.image_size)
    return MetricNetwork("CLIP", forward, tuple(CLIP_MEAN), tuple(CLIP_STD), calibrated, source,
                         torch.device(device), input_size=size)


def load_metric_networks(metrics: Sequence[str] = METRICS, clip_model: str = "openai/clip-vit-large-patch14",
                         weights_dir=None, allow_random: bool = False,
                         device: str | torch.device = "cpu") -> dict[str, MetricNetwork]:
    """The feature networks the requested metrics need, keyed by network name."""
    metrics = check_metrics(metrics)
    networks = {}
    for network, nodes in _NETWORK_NODES.items():
        if not any(m in metrics for m in nodes):
            continue
        if network == "CLIP":
            networks[network] = _clip_network(clip_model, allow_random, device)
        else:
            networks[network] = _torchvision_network(network, weights_dir, allow_random, device)
    return networks


@torch.no_grad()
def network_features(net: MetricNetwork, x: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Features (float32, CPU, flattened) of float images (n, 3, H, W) in [0, 1]: resize, normalise, forward.

    A network with its own ``input_size`` (a small CLIP) gets an antialiased resize: the protocols' plain bilinear
    resize is their convention for ~224 px inputs, and a 256 -> 64 px shrink without it aliases badly.
    """
    x = resize_images(x, size, antialias=net.input_size is not None and net.input_size < x.shape[-1] / 2)
    mean = torch.tensor(net.mean, dtype=x.dtype)[:, None, None]
    std = torch.tensor(net.std, dtype=x.dtype)[:, None, None]
    out = net.forward(((x - mean) / std).to(net.device))
    return {k: v.float().reshape(len(v), -1).cpu() for k, v in out.items()}


# -- everything ---------------------------------------------------------------------------------------
def default_batch_size(device) -> int:
    """Images per network forward: 4 on CPU (larger batches were slower per image there), 32 on a GPU."""
    return 4 if torch.device(device).type == "cpu" else 32


def evaluate_images(recons, truths, protocol: MetricProtocol | None = None,
                    clip_model: str = "openai/clip-vit-large-patch14", weights_dir=None, allow_random: bool = False,
                    batch_size: int | None = None, device: str | torch.device = "cpu", metrics: Sequence[str] = METRICS,
                    networks: dict[str, MetricNetwork] | None = None, truth_cache: dict | None = None) -> MetricReport:
    """All (or the requested) metrics for paired uint8 images; see the module notes for definitions.

    ``networks`` reuses networks from :func:`load_metric_networks`. ``truth_cache``, a dict the
    caller keeps between calls with the same ``networks``, stores the ground truth's network
    features by content, so methods and subjects scored on the same test images (NSD's shared
    1000) run the networks over them once. ``batch_size`` None: :func:`default_batch_size` for ``device``.
    """
    t0 = time.perf_counter()
    batch_size = batch_size or default_batch_size(device)
    protocol = protocol or MetricProtocol()
    recons, truths = _check_images(recons, "recons"), _check_images(truths, "truths")
    metrics = check_metrics(metrics)
    n = len(recons)
    if len(truths) != n:
        raise InvalidInputError(f"{n} recons but {len(truths)} truths; they must pair one to one")
    if n < 2 and any(m in metrics for m in IDENTIFICATION_METRICS):
        raise InvalidInputError("2-way identification needs at least 2 image pairs")
    if networks is None:
        networks = load_metric_networks(metrics, clip_model, weights_dir, allow_random, device)

    per_pixel: dict[str, list[np.ndarray]] = {m: [] for m in PIXEL_METRICS if m in metrics}
    feats = {m: ([], []) for net in networks.values() for m in net.metrics if m in metrics}
    truth_key = None
    if truth_cache is not None:
        digest = hashlib.sha1(np.ascontiguousarray(truths).data, usedforsecurity=False)
        digest.update(repr((truths.shape, protocol.as_dict(), sorted(feats))).encode())
        truth_key = digest.hexdigest()
    cached = truth_cache.get(truth_key) if truth_key else None
    for start in range(0, n, batch_size):
        batch = slice(start, start + batch_size)
        rec = first_resize(recons[batch], protocol)
        gt = first_resize(truths[batch], protocol)
        if per_pixel:
            if protocol.pixels == "truth-native":
                rec_px, gt_px = truth_native_pixels(recons[batch], truths[batch])
            else:
                rec_px, gt_px = resize_images(rec, protocol.pixel_size), resize_images(gt, protocol.pixel_size)
            if "PixCorr" in per_pixel:
                per_pixel["PixCorr"].append(pixcorr(rec_px, gt_px))
            if "SSIM" in per_pixel:
                per_pixel["SSIM"].append(ssim(rec_px, gt_px, protocol.ssim))
        for name, net in networks.items():
            size = net.input_size or protocol.network_size(name)
            f_rec = network_features(net, rec, size)
            f_gt = None if cached else network_features(net, gt, size)
            for m in net.metrics:
                if m in feats:
                    if f_gt is not None:
                        feats[m][0].append(f_gt[m])
                    feats[m][1].append(f_rec[m])

    truth_feats = cached or {m: torch.cat(f_gt) for m, (f_gt, _) in feats.items()}
    if truth_key and not cached:
        truth_cache[truth_key] = truth_feats
    per_image: dict[str, np.ndarray] = {m: np.concatenate(v) for m, v in per_pixel.items()}
    for m, (_, f_rec) in feats.items():
        f_gt, f_rec = truth_feats[m], torch.cat(f_rec)
        if m in IDENTIFICATION_METRICS:
            per_image[m] = two_way_identification(f_gt, f_rec, device=device)[1]
        else:
            per_image[m] = correlation_distance(f_gt, f_rec)[1]
    missing = [m for m in metrics if m not in per_image]
    if missing:
        raise InvalidInputError(f"no network given for {missing}")
    computed = [m for m in METRICS if m in per_image]
    return MetricReport(
        values={m: float(per_image[m].mean()) for m in computed},
        per_image={m: per_image[m] for m in computed},
        uncalibrated=tuple(m for net in networks.values() if not net.calibrated for m in net.metrics
                           if m in per_image),
        protocol=protocol.as_dict(),
        networks={name: net.source for name, net in networks.items()},
        n=n, seconds=time.perf_counter() - t0)
