"""The batched photometric augmentation of data.py (photometric="device") against DINO's PIL
pipeline (photometric="pil"): each operation against its PIL counterpart, then the per-view
distributions of the two whole pipelines over a few thousand draws."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision import transforms

import bench
import data
from data import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation


def photo(width=96, height=72, seed=0):
    return bench.natural_image(np.random.default_rng(seed), width, height)


def as_float(img):  # PIL -> (1, 3, H, W) in [0, 1]
    return TF.pil_to_tensor(img).float().unsqueeze(0) / 255


def test_each_operation_matches_pil_to_rounding():
    img = photo()
    x = as_float(img)
    gray = data._gray(x)
    for f, pil_op, ref in ((1.3, TF.adjust_brightness, 0.0), (0.7, TF.adjust_contrast, gray.mean((2, 3), keepdim=True)),
                           (1.2, TF.adjust_saturation, gray)):
        ours = (f * x + (1 - f) * ref).clamp(0, 1)          # the blend color_jitter applies
        assert (ours - as_float(pil_op(img, f))).abs().mean() < 1.0 / 255, pil_op.__name__
    for h in (-0.1, 0.04, 0.1):
        ours = data._shift_hue(x, torch.tensor([h]))
        assert torch.allclose(ours, TF.adjust_hue(x, h), atol=1e-5)          # torchvision's float HSV
        assert (ours - as_float(TF.adjust_hue(img, h))).abs().mean() < 2.0 / 255  # PIL's uint8 HSV
    assert (data._gray(x).expand_as(x) - as_float(img.convert("L").convert("RGB"))).abs().max() < 1.0 / 255
    for radius in (0.5, 1.0, 2.0):  # PIL's radius is the Gaussian's standard deviation (three box passes)
        ours = data.gaussian_blur(x, torch.tensor([radius]))
        diff = (ours - as_float(img.filter(ImageFilter.GaussianBlur(radius)))).abs()
        assert diff.mean() < 1.0 / 255 and diff.mean() < 0.2 * (ours - x).abs().mean(), radius  # close, and not to no blur


def test_color_jitter_draws_per_view_and_skips_views_not_selected():
    torch.manual_seed(0)
    x = as_float(photo()).expand(400, -1, -1, -1) * 0.7                     # no pixel above 0.7: x 1.4 never clips
    apply = torch.arange(400) % 5 != 0                                      # 1 view in 5 left alone
    out = data.color_jitter(x, apply)
    assert torch.equal(out[~apply], x[~apply])
    assert ((out[apply] - x[apply]).flatten(1).abs().amax(1) > 1e-3).all()
    # brightness alone: each view scaled by its own factor ~ U[0.6, 1.4], whatever the order drawn
    out = data.color_jitter(x, torch.ones(400, dtype=torch.bool), brightness=0.4, contrast=0, saturation=0, hue=0)
    f = (out.flatten(1) / x.flatten(1).clamp_min(1e-3)).median(1).values  # (400,)
    assert torch.allclose(out, (f.view(-1, 1, 1, 1) * x).clamp(0, 1), atol=1e-4)
    assert 0.6 <= f.min() < 0.65 and 1.35 < f.max() <= 1.4 and abs(f.mean() - 1) < 0.04


def test_on_device_pil_mode_normalises_exactly_as_to_tensor_and_normalize():
    img = photo()
    aug = MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=2, photometric="pil")
    torch.manual_seed(3)
    crops = aug(img)
    assert all(c.dtype == torch.uint8 for c in crops)
    xg, xl = aug.on_device(torch.stack(crops[:2]).unsqueeze(1), torch.stack(crops[2:]).unsqueeze(1))
    dino = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for out, c in zip([*xg[:, 0], *xl[:, 0]], crops):
        expected = dino(TF.to_tensor(TF.to_pil_image(c)))                   # DINO: ToTensor then Normalize
        assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="uint8"):
        aug.on_device(xg, xl)


def ks_critical(n1, n2, alpha=1e-3):
    """Two-sample Kolmogorov-Smirnov: D above this rejects 'same distribution' at level alpha."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n1 + n2) / (n1 * n2))


def ks_statistic(a, b):
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)
    return np.abs(cdf(a) - cdf(b)).max()


def view_stats(views):
    """(n, 3, H, W) normalised views -> dict of (n,) per-view statistics in [0, 1] pixel units."""
    x = views * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    luma = data._gray(x)[:, 0]                                              # (n, H, W)
    maxc, minc = x.max(1).values, x.min(1).values
    return {"brightness": luma.mean((1, 2)), "contrast": luma.std((1, 2)),
            "saturation": ((maxc - minc) / maxc.clamp_min(1e-3)).mean((1, 2)),
            "sharpness": (luma[:, :, 1:] - luma[:, :, :-1]).abs().mean((1, 2))}   # falls with blur


def draw_views(photometric, n_images, sources):
    """Views of n_images draws, per kind (global 1, global 2, local), with their statistics and
    the scale (area fraction) and aspect (w / h) of every crop, recorded as they are drawn."""
    aug = MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=2,
                                photometric=photometric)
    boxes = []
    get_params = transforms.RandomResizedCrop.get_params

    def recording(img, scale, ratio):
        i, j, h, w = get_params(img, scale, ratio)
        W, H = TF.get_image_size(img)
        boxes.append((h * w / (H * W), w / h))
        return i, j, h, w

    transforms.RandomResizedCrop.get_params = staticmethod(recording)
    try:
        samples = [aug(sources[k % len(sources)]) for k in range(n_images)]
    finally:
        transforms.RandomResizedCrop.get_params = staticmethod(get_params)
    xg = torch.stack([torch.stack(s[:2]) for s in samples], 1)              # (2, n, 3, 32, 32) uint8
    xl = torch.stack([torch.stack(s[2:]) for s in samples], 1)              # (2, n, 3, 16, 16)
    xg, xl = aug.on_device(xg, xl)
    boxes = np.array(boxes).reshape(n_images, 4, 2)                         # crops in call order: g1, g2, l1, l2
    out = {}
    for kind, views, crops in (("global1", xg[0], boxes[:, 0]), ("global2", xg[1], boxes[:, 1]),
                               ("local", xl.flatten(0, 1), boxes[:, 2:].reshape(-1, 2))):
        stats = {k: v.numpy() for k, v in view_stats(views).items()}
        stats["crop scale"], stats["crop aspect"] = crops[:, 0], crops[:, 1]
        out[kind] = stats
    return out


def test_device_photometric_has_the_distribution_of_dinos_pil_pipeline():
    sources = [photo(120, 90, seed) for seed in range(8)]
    n = 2000
    torch.manual_seed(0)
    old = draw_views("pil", n, sources)
    torch.manual_seed(1)
    new = draw_views("device", n, sources)
    for kind in old:
        for stat in old[kind]:
            a, b = old[kind][stat], new[kind][stat]
            d = ks_statistic(a, b)
            assert d < ks_critical(len(a), len(b)), (kind, stat, d, a.mean(), b.mean())
    # the statistics see what they should: global 1 is always blurred, global 2 rarely
    assert new["global1"]["sharpness"].mean() < 0.9 * new["global2"]["sharpness"].mean()
    assert old["global1"]["sharpness"].mean() < 0.9 * old["global2"]["sharpness"].mean()
    assert 0.38 < old["global1"]["crop scale"].min() and old["local"]["crop scale"].max() < 0.42  # integer boxes


def test_distribution_test_detects_a_wrong_blur_or_jitter(monkeypatch):
    # the same comparison fails when the device path's blur is twice as wide or its brightness range halved
    sources = [photo(120, 90, seed) for seed in range(8)]
    torch.manual_seed(0)
    old = draw_views("pil", 1500, sources)
    blur, jitter = data.gaussian_blur, data.color_jitter
    for name, wrong in (("gaussian_blur", lambda x, sigma, max_sigma: blur(x, 2 * sigma, 2 * max_sigma)),
                        ("color_jitter", lambda x, apply: jitter(x, apply, brightness=0.2))):
        with monkeypatch.context() as m:
            m.setattr(data, name, wrong)
            torch.manual_seed(1)
            new = draw_views("device", 1500, sources)
        worst = max(ks_statistic(old[k][s], new[k][s]) / ks_critical(len(old[k][s]), len(new[k][s]))
                    for k in old for s in old[k])
        assert worst > 1, name
