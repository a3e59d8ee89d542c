"""Image-reconstruction metrics against independent reference computations (CPU, offline, random nets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import correlation as scipy_correlation
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision.transforms.v2 import functional as TF

from brainmclip.evaluation.image_metrics import (
    METRICS,
    WEIGHT_FILES,
    MetricProtocol,
    correlation_distance,
    evaluate_images,
    load_metric_networks,
    pearson_matrix,
    ssim_columnwise,
    two_way_from_corr,
    two_way_identification,
)

# Small sizes for the network checks (CLIP's tiny towers need their 224 px input).
SMALL = MetricProtocol(first_size=96, pixel_size=80, alexnet_size=96, inception_size=80, effnet_size=64,
                       swav_size=64)


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Distinct smooth colour images: upsampled low-resolution noise plus a gradient."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((n, 3, 6, 6))).float()
    x = TF.resize(low, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
    x = x + torch.linspace(0, 0.3, size)[None, None, :, None]
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def noisy(images: np.ndarray, seed: int, scale: float = 40.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, scale, images.shape), 0, 255).astype(np.uint8)


def reference_resize(images: np.ndarray, *sizes: int) -> torch.Tensor:
    """The MindEye1 resizes via torchvision's functional resize (bilinear, no antialias)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    for size in sizes:
        x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    return x


def brute_two_way(gt: np.ndarray, rec: np.ndarray) -> np.ndarray:
    n = len(gt)
    r = [[float(np.corrcoef(gt[i], rec[j])[0, 1]) for j in range(n)] for i in range(n)]
    return np.array([sum(1 for i in range(n) if i != j and r[i][j] < r[j][j]) / (n - 1) for j in range(n)])


@pytest.fixture(scope="module")
def nets():
    return load_metric_networks(METRICS, clip_model="tiny", allow_random=True)


@pytest.fixture(scope="module")
def pair():
    truths = smooth_images(6, 64, seed=1)
    return noisy(smooth_images(6, 56, seed=1), seed=2), truths


# -- pixel metrics ------------------------------------------------------------------------------------
def test_pixcorr_matches_corrcoef(pair):
    recons, truths = pair
    out = evaluate_images(recons, truths, metrics=["PixCorr"])
    rec, gt = reference_resize(recons, 256, 425), reference_resize(truths, 256, 425)
    ref = [np.corrcoef(gt[i].numpy().ravel(), rec[i].numpy().ravel())[0, 1] for i in range(len(gt))]
    np.testing.assert_allclose(out.per_image["PixCorr"], ref, rtol=0, atol=1e-6)
    assert out.values["PixCorr"] == pytest.approx(np.mean(ref), abs=1e-6)
    assert list(out.values) == ["PixCorr"] and list(out.per_image) == ["PixCorr"] and out.n == len(recons)


def test_ssim_matches_skimage(pair):
    recons, truths = pair
    out = evaluate_images(recons, truths, metrics=["SSIM"])
    rec = rgb2gray(reference_resize(recons, 256, 425).permute(0, 2, 3, 1).double().numpy())
    gt = rgb2gray(reference_resize(truths, 256, 425).permute(0, 2, 3, 1).double().numpy())
    ref = [structural_similarity(g, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0) for g, r in zip(gt, rec, strict=True)]
    np.testing.assert_allclose(out.per_image["SSIM"], ref, rtol=0, atol=1e-6)
    assert list(out.uncalibrated) == []


def test_columnwise_ssim_matches_loop_over_columns(pair):
    recons, truths = pair
    out = evaluate_images(recons, truths, metrics=["SSIM"], protocol=MetricProtocol(ssim="columnwise"))
    rec = rgb2gray(reference_resize(recons, 256, 425).permute(0, 2, 3, 1).double().numpy())
    gt = rgb2gray(reference_resize(truths, 256, 425).permute(0, 2, 3, 1).double().numpy())
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    ref = [np.mean([structural_similarity(g[:, j], r[:, j], **kw) for j in range(g.shape[1])])
           for g, r in zip(gt[:3], rec[:3], strict=True)]
    np.testing.assert_allclose(out.per_image["SSIM"][:3], ref, rtol=0, atol=1e-9)
    # It is a different number from the 2-D SSIM.
    assert not np.allclose(out.per_image["SSIM"], evaluate_images(recons, truths, metrics=["SSIM"])
                           .per_image["SSIM"], atol=1e-3)
    assert ssim_columnwise(gt[0], gt[0]) == pytest.approx(1.0)


def brain_diffuser_script(recons: np.ndarray, truths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brain-Diffuser's scripts/evaluate_reconstruction.py pixel steps, transcribed.

    The script opens the reconstruction, ``.resize((425, 425))`` with PIL's default filter, keeps the
    425 px ground truth as it is, divides both by 255, takes ``np.corrcoef`` of the flattened arrays and
    calls ``ssim(rgb2gray(gen), rgb2gray(gt), multichannel=True, ...)``; scikit-image 0.17's
    ``multichannel=True`` is today's ``channel_axis=-1``, which on a 2-D image makes each column a channel.
    """
    pixcorr, ssim = [], []
    for rec, gt in zip(recons, truths, strict=True):
        gen = np.array(Image.fromarray(rec).resize((gt.shape[1], gt.shape[0]))) / 255.0
        gt = gt / 255.0
        pixcorr.append(np.corrcoef(gt.reshape(1, -1), gen.reshape(1, -1))[0, 1])
        ssim.append(structural_similarity(rgb2gray(gen), rgb2gray(gt), channel_axis=-1, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=1.0))
    return np.array(pixcorr), np.array(ssim)


@pytest.mark.parametrize(("truth_size", "recon_size"), [(425, 512), (96, 64), (64, 64)])
def test_brain_diffuser_protocol_matches_its_script(truth_size, recon_size):
    truths = smooth_images(3, truth_size, seed=4)
    recons = noisy(smooth_images(3, recon_size, seed=4), seed=5)
    protocol = MetricProtocol(name="brain-diffuser")
    assert (protocol.pixels, protocol.ssim) == ("truth-native", "columnwise")
    out = evaluate_images(recons, truths, metrics=["PixCorr", "SSIM"], protocol=protocol)
    ref_r, ref_s = brain_diffuser_script(recons, truths)
    np.testing.assert_allclose(out.per_image["PixCorr"], ref_r, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.per_image["SSIM"], ref_s, rtol=0, atol=1e-6)
    assert out.protocol["name"] == "brain-diffuser"


def test_brain_diffuser_network_inputs_match_its_feature_script():
    """eval_extract_features.py: ``T.functional.resize(PIL image, (224, 224))`` then ``to_tensor``, per image."""
    from torchvision.transforms import functional as TV

    from brainmclip.evaluation.image_metrics import first_resize

    images = noisy(smooth_images(2, 425, seed=6), seed=7)
    ours = first_resize(images, MetricProtocol(name="brain-diffuser"))
    ref = torch.stack([TV.to_tensor(TV.resize(Image.fromarray(im), [224, 224])) for im in images])
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=1e-6)


# -- identification and distances ---------------------------------------------------------------------
def test_two_way_matches_brute_force():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(7, 50))
    rec = gt + rng.normal(scale=1.5, size=gt.shape)
    mean, per = two_way_identification(torch.from_numpy(gt).float(), torch.from_numpy(rec).float())
    ref = brute_two_way(gt.astype(np.float32).astype(np.float64), rec.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(per, ref, atol=0)
    assert mean == pytest.approx(ref.mean())
    r = pearson_matrix(gt, rec).numpy()
    np.testing.assert_allclose(r, np.corrcoef(gt, rec)[:7, 7:], atol=1e-12)


def test_two_way_ties_do_not_count():
    # Column j compares the other ground truths r[i, j] with the true pair r[j, j]; equality is no win.
    r = np.array([[0.90, 0.0, 0.0],
                  [0.95, 0.3, 0.0],
                  [0.95, 0.3, 0.1]])  # r[2, 1] == r[1, 1]: a tie, no win for recon 1
    np.testing.assert_array_equal(two_way_from_corr(r), [0.0, 0.5, 1.0])
    # The orientation matters: rows are ground truths, columns recons.
    assert not np.array_equal(two_way_from_corr(r.T), two_way_from_corr(r))
    # A duplicated ground truth makes an exact tie through the whole feature path.
    rng = np.random.default_rng(3)
    gt = rng.normal(size=(5, 30))
    gt[1] = gt[0]
    rec = gt + rng.normal(scale=0.3, size=gt.shape)
    _, per = two_way_identification(gt, rec)
    np.testing.assert_array_equal(per, brute_two_way(gt, rec))
    assert per[0] == pytest.approx(3 / 4) and per[1] == pytest.approx(3 / 4)


def test_correlation_distance_matches_scipy():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(6, 40))
    rec = 0.5 * gt + rng.normal(size=gt.shape)
    mean, per = correlation_distance(gt, rec)
    ref = [scipy_correlation(g, r) for g, r in zip(gt, rec, strict=True)]
    np.testing.assert_allclose(per, ref, atol=1e-12)
    assert mean == pytest.approx(np.mean(ref))
    assert correlation_distance(gt, gt)[0] == pytest.approx(0.0, abs=1e-12)


# -- networks -----------------------------------------------------------------------------------------
def test_identical_images_score_perfectly(nets):
    truths = smooth_images(5, 64, seed=4)
    out = evaluate_images(truths, truths, clip_model="tiny", networks=nets, batch_size=3)
    assert out.values["PixCorr"] == pytest.approx(1.0, abs=1e-9)
    assert out.values["SSIM"] == pytest.approx(1.0, abs=1e-9)
    for metric in ("AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP"):
        assert out.values[metric] == 1.0, metric
        np.testing.assert_array_equal(out.per_image[metric], np.ones(5))
    for metric in ("EffNet-B", "SwAV"):
        assert out.values[metric] == pytest.approx(0.0, abs=1e-9), metric
    assert list(out.values) == list(METRICS) and list(out.per_image) == list(METRICS)
    assert all(out.per_image[m].shape == (5,) for m in METRICS)
    assert sorted(list(out.uncalibrated)) == sorted(METRICS[2:])
    assert out.protocol["name"] == "mindeye1" and out.protocol["pixel_size"] == 425


def test_truth_cache_reuses_ground_truth_features_only_for_the_same_images(nets, pair):
    recons, truths = pair
    cache: dict = {}
    kw = {"clip_model": "tiny", "networks": nets, "batch_size": 4, "protocol": SMALL}
    plain = evaluate_images(recons, truths, **kw)
    first = evaluate_images(recons, truths, **kw, truth_cache=cache)
    other = noisy(smooth_images(6, 56, seed=1), seed=3)
    second = evaluate_images(other, truths, **kw, truth_cache=cache)
    assert len(cache) == 1  # same truths: one entry, reused
    for m in METRICS:
        np.testing.assert_allclose(first.per_image[m], plain.per_image[m], rtol=0, atol=1e-12)
    reference = evaluate_images(other, truths, **kw)
    for m in METRICS:
        np.testing.assert_allclose(second.per_image[m], reference.per_image[m], rtol=0, atol=1e-6)
    # The entry really is what the second call used: spoil it and the network scores change.
    (entry,) = cache.values()
    for m in entry:
        entry[m] = entry[m].flip(0)
    spoiled = evaluate_images(other, truths, **kw, truth_cache=cache)
    assert spoiled.values["EffNet-B"] != pytest.approx(second.values["EffNet-B"])
    # Other truths get their own entry.
    evaluate_images(other, truths[::-1].copy(), **kw, truth_cache=cache)
    assert len(cache) == 2


def test_network_metrics_match_reference_features(nets, pair):
    recons, truths = pair
    out = evaluate_images(recons, truths, protocol=SMALL, networks=nets, batch_size=4,
                          metrics=["AlexNet(2)", "AlexNet(5)", "SwAV"])
    rec, gt = reference_resize(recons, 96), reference_resize(truths, 96)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    from torchvision import models

    torch.manual_seed(0)
    alex = models.alexnet(weights=None).eval()
    torch.manual_seed(0)
    resnet = models.resnet50(weights=None).eval()
    with torch.no_grad():
        for metric, stop in (("AlexNet(2)", 5), ("AlexNet(5)", 12)):
            f = [alex.features[:stop]((x - mean) / std).flatten(1).double().numpy() for x in (gt, rec)]
            np.testing.assert_allclose(out.per_image[metric], brute_two_way(*f), atol=1e-12)

    # SwAV at 64 px from the 96 px floats of the first resize (not re-quantised in between).
    with torch.no_grad():
        body = torch.nn.Sequential(*list(resnet.children())[:-1])
        f = [body((TF.resize(x, [64, 64], antialias=False) - mean) / std).flatten(1).double().numpy()
             for x in (gt, rec)]
    ref = [scipy_correlation(g, r) for g, r in zip(*f, strict=True)]
    np.testing.assert_allclose(out.per_image["SwAV"], ref, atol=1e-5)
    assert list(out.uncalibrated) == ["AlexNet(2)", "AlexNet(5)", "SwAV"]


def test_missing_weights_raise_naming_network(tmp_path, monkeypatch, pair):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    recons, truths = pair
    for metric, network in (("AlexNet(5)", "AlexNet"), ("InceptionV3", "InceptionV3"), ("EffNet-B", "EffNet-B"),
                            ("SwAV", "SwAV")):
        with pytest.raises(FileNotFoundError, match=network) as err:
            evaluate_images(recons, truths, metrics=[metric], weights_dir=tmp_path / "weights")
        assert "\n" not in str(err.value) and str(tmp_path / "weights") in str(err.value)
    with pytest.raises(FileNotFoundError, match="CLIP"):
        evaluate_images(recons, truths, metrics=["CLIP"], clip_model=str(tmp_path / "no-such-clip"))
    out = evaluate_images(recons, truths, metrics=["CLIP"], clip_model=str(tmp_path / "no-such-clip"),
                          allow_random=True)
    assert list(out.uncalibrated) == ["CLIP"]


def test_local_weights_are_loaded_and_calibrated(tmp_path, monkeypatch):
    """A SwAV checkpoint (DataParallel 'module.' keys, with a projection head) in weights_dir is used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from torchvision import models

    torch.manual_seed(123)
    resnet = models.resnet50(weights=None).eval()
    state = {f"module.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / WEIGHT_FILES["SwAV"])
    nets = load_metric_networks(["SwAV"], weights_dir=tmp_path)
    assert nets["SwAV"].calibrated and str(tmp_path) in nets["SwAV"].source
    truths = smooth_images(4, 64, seed=5)
    recons = noisy(truths, seed=6)
    out = evaluate_images(recons, truths, metrics=["SwAV"], networks=nets, protocol=SMALL)
    assert list(out.uncalibrated) == []
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    body = torch.nn.Sequential(*list(resnet.children())[:-1])
    with torch.no_grad():
        f = [body((reference_resize(x, 96, 64) - mean) / std).flatten(1).double().numpy() for x in (truths, recons)]
    ref = [scipy_correlation(g, r) for g, r in zip(*f, strict=True)]
    np.testing.assert_allclose(out.per_image["SwAV"], ref, atol=1e-5)


def test_input_validation(pair):
    recons, truths = pair
    with pytest.raises(ValueError, match="uint8"):
        evaluate_images(recons.astype(np.float32), truths, metrics=["PixCorr"])
    with pytest.raises(ValueError, match="pair"):
        evaluate_images(recons[:3], truths, metrics=["PixCorr"])
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate_images(recons, truths, metrics=["FID"])
    with pytest.raises(ValueError, match="protocol"):
        MetricProtocol(name="mindeye2")
