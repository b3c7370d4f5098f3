"""
The data module shared by dino.py, simdino.py, dinov2.py and simdinov2.py.

- MultiCropAugmentation: DINO's multi-crop views (2 global + M local crops): uint8 crops
  made in the loader workers, then `on_device` in the training process (the photometric
  augmentations batched on the GPU, or DINO's exact PIL pipeline in the workers).
- SyntheticShapes: an embedded 10-class dataset drawn on the fly, the default data
  of every script and of the test suite (no files, no downloads).
- ImageFolderDataset / build_dataset: an ImageFolder-style tree, root/<class>/<image>,
  with unreadable images skipped and counted (or a clean stop); CIFAR10Dataset: the
  CIFAR-10 files as torchvision keeps them (--data cifar10:ROOT, downloaded on first use).
- BlockMaskGenerator / collate_multicrop: the block masks of BEiT/iBOT/DINOv2 and the
  DINOv2 rule that spreads mask ratios over the batch.

Imports only torch, torchvision, PIL, numpy and the standard library, so the file can
be copied on its own. Typical use (DINOv2-style, ViT patch 16):

    aug = MultiCropAugmentation()  # 2 x 224 + 10 x 96
    dataset = build_dataset(args.data, transform=aug)  # "synthetic" or a folder
    collate = functools.partial(collate_multicrop, mask_generator=BlockMaskGenerator(224 // 16))
    loader = DataLoader(dataset, batch_size=64, num_workers=8, collate_fn=collate)
    for batch in loader:  # batch["xg"], batch["xl"] (uint8), batch["labels"], batch["masks"]
        xg, xl = aug.on_device(batch["xg"].to(device), batch["xl"].to(device))  # float, normalised
        ...
"""

import math
import multiprocessing as mp
import os
import pickle
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(Exception):
    """An expected user mistake (bad path, bad image, bad setting). The message is one
    line naming the problem and the fix; the scripts print it and exit non-zero."""

    def __str__(self):
        # raised in a DataLoader worker, it comes back as DataError(the worker's whole
        # traceback): keep the last line, which is the original one-line message
        msg = super().__str__().strip()
        return msg.splitlines()[-1].split("DataError: ", 1)[-1] if "\n" in msg else msg


# -----------------------------------------------------------------------------
# Multi-crop augmentation (DINO, Caron et al. 2021, and SimDINO Table 4)

class RandomGaussianBlur:
    """PIL Gaussian blur with radius ~ U[radius_min, radius_max], applied with prob. p.
    DINO blurs with PIL's radius, not torchvision's kernel-size/sigma GaussianBlur."""

    def __init__(self, p, radius_min=0.1, radius_max=2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        # torch RNG (not `random`) so one torch.manual_seed reproduces every view
        if torch.rand(1).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(1).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"RandomGaussianBlur(p={self.p}, radius=[{self.radius_min}, {self.radius_max}])"


def _check_crop(name, size, scale):
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise DataError(f"{name}_crops_size must be a positive integer, got {size!r}: "
                        f"pass e.g. --{name}_crops_size {224 if name == 'global' else 96}")
    ok = len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1
    if not ok:
        raise DataError(f"{name}_crops_scale must be two numbers 0 < min <= max <= 1, got "
                        f"{tuple(scale)}: pass e.g. --{name}_crops_scale "
                        f"{'0.4 1.0' if name == 'global' else '0.05 0.4'}")


class MultiCropAugmentation:
    """DINO's multi-crop views of one PIL image, split between the loader workers and the
    training process so that each does what it is fast at.

    In the workers, `aug(image)` -> [global crop 1, global crop 2, local crop 1, ..., local
    crop M], uint8 tensors (3, G, G) x 2 then (3, L, L) x M: a quarter of the bytes of
    float32 to send to the training process. In the training process, one call per batch,
    `xg, xl = aug.on_device(xg, xl)` turns the stacked crops into float views normalised
    with the ImageNet statistics.

    The three pipelines differ only in blur probability (1.0 / 0.1 / 0.5) and in the
    solarisation (p=0.2) of global crop 2: the two global views are made asymmetric.

    photometric="device": the workers only crop and flip (PIL, bicubic, as DINO); colour
    jitter, grayscale, Gaussian blur and solarisation run in `on_device`, batched on the
    training device. Same distribution of views as DINO's PIL pipeline (tested), at about
    2.5x the images/s per worker; the differences a careful reader would notice are that
    the arithmetic is float rather than rounded to uint8 after each operation, the blur is
    an exact Gaussian rather than PIL's three box passes, and the random draws come from
    the training process's generator rather than the workers'.
    photometric="pil": DINO's exact PIL pipeline, everything in the workers; `on_device`
    then only normalises, exactly as ToTensor + Normalize do.
    photometric="auto" (the default): "device" when CUDA is available, else "pil": on a CPU
    the batched float operations cost the training process more than PIL costs a worker.
    """

    BLUR_P = (1.0, 0.1, 0.5)      # global crop 1, global crop 2, local crops
    SOLARIZE_P = (0.0, 0.2, 0.0)

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                 local_crops_number=10, global_crops_size=224, local_crops_size=96,
                 photometric="auto", blur_radius=(0.1, 2.0)):
        _check_crop("global", global_crops_size, global_crops_scale)
        if not 0 <= blur_radius[0] <= blur_radius[1]:
            raise DataError(f"blur_radius must be min max with 0 <= min <= max, got {tuple(blur_radius)}: "
                            f"pass e.g. --blur_radius 0.1 2 (DINO's), or 0 0 for no blur")
        if not isinstance(local_crops_number, int) or local_crops_number < 0:
            raise DataError(f"local_crops_number must be an integer >= 0, got "
                            f"{local_crops_number!r}: pass e.g. --local_crops_number 10")
        if local_crops_number > 0:
            _check_crop("local", local_crops_size, local_crops_scale)
        if photometric not in ("auto", "device", "pil"):
            raise DataError(f"photometric must be 'auto', 'device' or 'pil', got {photometric!r}: "
                            f"pass --photometric auto, device or pil")
        if photometric == "auto":
            photometric = "device" if torch.cuda.is_available() else "pil"
        self.local_crops_number, self.photometric = local_crops_number, photometric
        self.blur_radius = tuple(float(r) for r in blur_radius)
        bicubic = transforms.InterpolationMode.BICUBIC

        def pipeline(size, scale, blur_p, solarize_p):
            steps = [transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic),
                     transforms.RandomHorizontalFlip(p=0.5)]
            if photometric == "pil":
                steps += [transforms.RandomApply([transforms.ColorJitter(
                              brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                          transforms.RandomGrayscale(p=0.2),
                          RandomGaussianBlur(blur_p, *self.blur_radius)]
                if solarize_p:
                    steps.append(transforms.RandomSolarize(threshold=128, p=solarize_p))  # PIL ImageOps.solarize
            steps.append(transforms.PILToTensor())  # uint8 HWC -> uint8 CHW, [0, 255]
            return transforms.Compose(steps)

        (b1, b2, bl), (s1, s2, sl) = self.BLUR_P, self.SOLARIZE_P
        self.global_transform1 = pipeline(global_crops_size, global_crops_scale, b1, s1)
        self.global_transform2 = pipeline(global_crops_size, global_crops_scale, b2, s2)
        self.local_transform = pipeline(local_crops_size, local_crops_scale, bl, sl)

    def __call__(self, image):
        if image.mode != "RGB":  # grayscale/RGBA/palette inputs still give 3 channels
            image = image.convert("RGB")
        crops = [self.global_transform1(image), self.global_transform2(image)]
        crops += [self.local_transform(image) for _ in range(self.local_crops_number)]
        return crops

    def on_device(self, xg, xl):
        """xg (2, B, 3, G, G), xl (M_loc, B, 3, L, L) uint8 crops, on the training device ->
        the same shapes in float32, augmented (photometric="device") and normalised."""
        if xg.dtype != torch.uint8 or xl.dtype != torch.uint8:
            raise ValueError(f"on_device takes the uint8 crops of MultiCropAugmentation, got "
                             f"{xg.dtype} and {xl.dtype}")
        xg, xl = xg.float() / 255, xl.float() / 255                         # as ToTensor: [0, 1]
        if self.photometric == "device":
            (b1, b2, bl), (s1, s2, sl) = self.BLUR_P, self.SOLARIZE_P

            def per_view(p1, p2):  # (2B,): p1 for global crop 1, p2 for crop 2, made on the device (no copy, no sync)
                p = torch.full(xg.shape[:2], p1, device=xg.device)
                p[1] = p2
                return p.flatten()
            xg = photometric_augment(xg.flatten(0, 1), per_view(b1, b2), per_view(s1, s2),
                                     *self.blur_radius).view_as(xg)
            xl = photometric_augment(xl.flatten(0, 1), bl, sl, *self.blur_radius).view_as(xl)
        return normalize(xg), normalize(xl)


def normalize(x):
    """(..., 3, H, W) in [0, 1] -> ImageNet-normalised, as transforms.Normalize computes it. The statistics
    are Python numbers: a tensor of them made per call would be a host-to-device copy, which waits for the GPU."""
    return torch.stack([(x[..., c, :, :] - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], -3)


# DINO's photometric augmentations as batched tensor operations: every view of the batch
# draws its own parameters, with the probabilities and ranges of the PIL pipeline above.

def _gray(x):  # (n, 3, H, W) -> (n, 1, H, W), the ITU-R 601-2 luma of PIL's convert("L")
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _per_view(v):  # (n,) -> (n, 1, 1, 1), to broadcast over a view's pixels
    return v.view(-1, 1, 1, 1)


def _shift_hue(x, shift):
    """x (n, 3, H, W) in [0, 1], shift (n,) in turns: RGB -> HSV, hue + shift, -> RGB."""
    maxc, minc = x.max(1).values, x.min(1).values                          # (n, H, W)
    delta = maxc - minc
    sat = delta / maxc.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    r, g, b = x.unbind(1)
    hue = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1.0                           # (n, H, W) in turns
    # HSV -> RGB without branches: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (c + 6 h) mod 6
    c = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)                  # c = 5, 3, 1: R, G, B
    k = (c + 6 * hue.unsqueeze(1)) % 6
    return maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x, apply, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """transforms.ColorJitter on each view where `apply` (n,) is True: the four adjustments
    in a random order per view, each factor drawn per view, the result clipped to [0, 1]
    after each one, as PIL does. Brightness, contrast and saturation are blends
    f x + (1 - f) ref with ref = black, the mean luma, the luma image; so the order is
    (up to three blends, the hue shift, the remaining blends), the hue shifted once."""
    n = x.shape[0]
    f = torch.stack([torch.empty(n, device=x.device).uniform_(1 - brightness, 1 + brightness),
                     torch.empty(n, device=x.device).uniform_(1 - contrast, 1 + contrast),
                     torch.empty(n, device=x.device).uniform_(1 - saturation, 1 + saturation)], 1)  # (n, 3)
    shift = torch.empty(n, device=x.device).uniform_(-hue, hue)            # (n,)
    order = torch.rand(n, 4, device=x.device).argsort(1)                  # (n, 4) a random permutation; 3 = hue
    hue_at = (order == 3).int().argmax(1)                                  # (n,) position of the hue shift
    blends = order.gather(1, (order == 3).int().argsort(dim=1, stable=True))[:, :3]  # (n, 3) the blends, in order

    def blend(x, slot, active):
        op = blends[:, slot]                                               # (n,) 0 brightness, 1 contrast, 2 saturation
        fac = _per_view(torch.where(apply & active, f.gather(1, op[:, None]).squeeze(1), 1.0))
        gray = _gray(x)                                                    # (n, 1, H, W)
        ref = torch.where(_per_view(op == 2), gray,
                          torch.where(_per_view(op == 1), gray.mean((2, 3), keepdim=True), 0.0))
        return (fac * x + (1 - fac) * ref).clamp(0, 1)

    for slot in range(3):
        x = blend(x, slot, slot < hue_at)                                  # the blends before the hue shift
    x = torch.where(_per_view(apply), _shift_hue(x, shift), x)
    for slot in range(3):
        x = blend(x, slot, slot >= hue_at)                                 # and those after it
    return x


def gaussian_blur(x, sigma, max_sigma=2.0):
    """x (n, 3, H, W), sigma (n,) in pixels -> each view blurred by its own Gaussian
    (separable, truncated at 3 max_sigma, edges replicated as PIL's blur does)."""
    n, c, H, W = x.shape
    r = math.ceil(3 * max_sigma)
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)           # (K,)
    sigma = sigma.clamp_min(1e-6)                                          # radius 0: the identity, not 0 / 0
    k = torch.exp(-t.square() / (2 * sigma.view(-1, 1).square()))          # (n, K)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)               # (n c, K) one kernel per channel
    y = F.pad(x.reshape(1, n * c, H, W), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)                 # along rows
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)                 # along columns
    return y.view(n, c, H, W)


def photometric_augment(x, blur_p, solarize_p, radius_min=0.1, radius_max=2.0):
    """x (n, 3, H, W) views in [0, 1] -> DINO's photometric augmentation of each view:
    colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur of radius ~ U[radius_min, radius_max]
    (DINO: 0.1, 2; with probability blur_p; radius 0 leaves a view as it is), solarisation at 128/255
    (probability solarize_p). blur_p and solarize_p: numbers, or (n,) tensors for a probability per view."""
    n = x.shape[0]
    if n == 0:
        return x
    u = lambda: torch.rand(n, device=x.device)
    x = color_jitter(x, u() < 0.8)
    x = torch.where(_per_view(u() < 0.2), _gray(x).expand_as(x), x)
    sigma = radius_min + (radius_max - radius_min) * u()
    x = torch.where(_per_view(u() < blur_p), gaussian_blur(x, sigma, radius_max), x)
    return torch.where(_per_view(u() < solarize_p) & (x >= 128 / 255), 1 - x, x)


# -----------------------------------------------------------------------------
# Embedded synthetic data: 10 classes of shapes and textures

SYNTHETIC_SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "crescent")
SYNTHETIC_TEXTURES = ("stripes", "checker", "dots")
SYNTHETIC_CLASSES = SYNTHETIC_SHAPES + SYNTHETIC_TEXTURES


def _polygon(cx, cy, r, angle, points):
    """points: (k, 2) array in units of r around the origin -> rotated, placed list."""
    c, s = math.cos(angle), math.sin(angle)
    x = cx + r * (c * points[:, 0] - s * points[:, 1])
    y = cy + r * (s * points[:, 0] + c * points[:, 1])
    return list(zip(x.tolist(), y.tolist()))


def _regular(k, radii=(1.0,)):
    """Regular k-gon inscribed in the unit circle, or a k-pointed star when given
    alternating outer/inner radii."""
    n = k * len(radii)
    a = 2 * math.pi * np.arange(n) / n
    rad = np.array(radii * k)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)


_SQUARE, _TRIANGLE, _STAR = _regular(4), _regular(3), _regular(5, (1.0, 0.45))
_CROSS = np.array([(1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3), (-1, .3), (-1, -.3),
                   (-.3, -.3), (-.3, -1), (.3, -1), (.3, -.3), (1, -.3)]) / math.hypot(1, .3)


def _shape_mask(name, T, rng):
    """(T, T) float mask in [0, 1] of one object: `name` decides the outline; position,
    size (diameter 35-70% of the side) and rotation are random."""
    r = rng.uniform(0.35, 0.7) * T / 2
    cx, cy = rng.uniform(r, T - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    canvas = Image.new("L", (T, T), 0)
    draw = ImageDraw.Draw(canvas)

    def disc(x, y, rr, fill):
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)

    if name == "circle":
        disc(cx, cy, r, 255)
    elif name == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif name == "crescent":  # a disc minus a shifted disc: the bite's side is random
        disc(cx, cy, r, 255)
        disc(cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle), 0.85 * r, 0)
    else:
        pts = {"square": _SQUARE, "triangle": _TRIANGLE, "cross": _CROSS, "star": _STAR}[name]
        draw.polygon(_polygon(cx, cy, r, angle, pts), fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255


def _texture_mask(name, S, rng):
    """(S, S) float mask of a full-image periodic texture: random period
    (0.15 to 0.3 of the side), orientation and phase. Edges are anti-aliased from the
    distance to the nearest edge in pixels, rather than by supersampling (4x cheaper)."""
    period = rng.uniform(0.15, 0.3) * S  # pixels
    angle = rng.uniform(0, math.pi)
    c, s = math.cos(angle) / period, math.sin(angle) / period
    x = np.arange(S, dtype=np.float32) + 0.5
    u = c * x[None, :] + s * x[:, None] + rng.uniform(0, 1)  # (S, S), in periods
    v = -s * x[None, :] + c * x[:, None] + rng.uniform(0, 1)
    u, v = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5  # (S, S) in [-0.5, 0.5)
    if name == "dots":  # discs on a square lattice
        d = np.sqrt(u * u + v * v) * period  # distance to the disc centre, pixels
        return np.clip(rng.uniform(0.25, 0.35) * period - d + 0.5, 0, 1)
    su = np.clip((np.abs(u) - 0.25) * period + 0.5, 0, 1)  # square wave in u, soft edges
    if name == "stripes":
        return su
    sv = np.clip((np.abs(v) - 0.25) * period + 0.5, 0, 1)
    return su * sv + (1 - su) * (1 - sv)  # checker: XNOR of two square waves


def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _two_colours(rng, min_contrast=80.0):
    """Background and foreground RGB, independent of the class, whose luminances
    differ by >= min_contrast (out of 255) so the shape survives RandomGrayscale."""
    bg = rng.uniform(0, 255, 3)
    for _ in range(20):
        fg = rng.uniform(0, 255, 3)
        if abs(_luma(fg) - _luma(bg)) >= min_contrast:
            return bg, fg
    return bg, np.full(3, 0.0 if _luma(bg) > 127.5 else 255.0)


def synthetic_image(label, size, rng, with_mask=False):
    """An RGB PIL image (size x size) of class `label`, every nuisance drawn from `rng`
    (a numpy Generator); with_mask: also its (size, size) float foreground mask in [0, 1]
    (the dense evaluations' tests label pixels with it)."""
    name = SYNTHETIC_CLASSES[label]
    if name in SYNTHETIC_TEXTURES:
        m = _texture_mask(name, size, rng)  # (S, S)
    else:  # shapes: drawn at 2x, box-downsampled for anti-aliased edges
        m = _shape_mask(name, 2 * size, rng)  # (2S, 2S)
        m = 0.25 * (m[0::2, 0::2] + m[1::2, 0::2] + m[0::2, 1::2] + m[1::2, 1::2])  # (S, S)
    bg, fg = (c.astype(np.float32)[:, None, None] for c in _two_colours(rng))  # (3, 1, 1)
    # nuisances the model should learn to ignore: a lighting gradient and pixel noise
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32) * np.float32(rng.uniform(0, 30))
    light = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]  # (S, S)
    img = rng.random((3, size, size), dtype=np.float32) - 0.5  # channels first: cheaper broadcasts
    img *= 2 * rng.uniform(0, 10)
    img += bg + (fg - bg) * m + light  # (3, S, S)
    np.clip(img, 0, 255, out=img)
    image = Image.fromarray(img.transpose(1, 2, 0).astype(np.uint8), "RGB")
    return (image, m) if with_mask else image


class SyntheticShapes(Dataset):
    """10 balanced classes (label = index % 10): 7 shapes (circle, square, triangle,
    cross, ring, star, crescent) and 3 full-image textures (stripes, checker, dots).
    Colours, position, size, rotation, lighting and noise are random and carry no
    class information, so an encoder must learn shape to separate the classes.
    Image i is a pure function of (seed, split, i): drawn on the fly, identical in
    every process and epoch, no files."""

    SPLITS = {"train": (0, 5000), "val": (1, 1000)}  # split -> (RNG stream, default size)

    def __init__(self, split="train", num_images=None, image_size=64, seed=0, transform=None):
        if split not in self.SPLITS:
            raise DataError(f"synthetic data has splits 'train' and 'val', got {split!r}: "
                            f"use split='train' or split='val'")
        if not isinstance(image_size, int) or image_size < 8:
            raise DataError(f"synthetic image_size must be an integer >= 8, got {image_size!r}")
        if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
            raise DataError(f"synthetic num_images must be a positive integer, got {num_images!r}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"synthetic seed must be an integer >= 0, got {seed!r}")
        self.split, self.image_size, self.seed, self.transform = split, image_size, seed, transform
        self._stream, default_size = self.SPLITS[split]
        n = default_size if num_images is None else num_images
        self.classes = list(SYNTHETIC_CLASSES)
        self.targets = [i % len(self.classes) for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        label = self.targets[i]
        rng = np.random.default_rng([self.seed, self._stream, i])  # local: no global state
        img = synthetic_image(label, self.image_size, rng)
        return (self.transform(img) if self.transform else img), label


# -----------------------------------------------------------------------------
# Image folders

# What an image folder's files are read as: torchvision's ImageFolder list (the released loaders'), the other
# names of JPEG and Netpbm files, and GIF (its first frame). Image files of other kinds (Pillow reads them only with
# plug-ins, or they are not raster images) are counted by extension and named in the run's summary, never read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".pnm")
NOT_READ_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".jpx", ".svg", ".ico", ".psd", ".tga",
                       ".exr", ".hdr", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raw", ".eps", ".pcx",
                       ".dds", ".xcf")
UNREADABLE = -1   # the label of an unreadable image with on_bad_image="drop": the caller drops the sample


def load_image(path):
    """The image at path as an 8-bit RGB PIL image, decoded in full (a truncated file raises here).

    As the released DINO / DINOv2 loaders read it (PIL's convert("RGB")): EXIF orientation is not applied (the
    pixels as stored), transparency is dropped, a palette is expanded, a GIF gives its first frame. Except where
    convert("RGB") destroys data: it clips 16-bit grayscale (PNG, TIFF: modes I;16 and I) at 255, so those are scaled,
    0..65535 -> 0..255 rounded, and 32-bit float images (mode F) in [0, 1] -> 0..255; values outside those ranges
    have no defined 8-bit scale and raise ValueError (the image is unreadable). 16-bit RGB(A) PNGs Pillow itself
    reduces to their high bytes."""
    with Image.open(path) as im:
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im).astype(np.float64)                             # (H, W)
            top = 65535.0 if im.mode.startswith("I") else 1.0
            if a.size and not (a.min() >= 0 and a.max() <= top):
                raise ValueError(f"mode {im.mode} image with values {a.min():g}..{a.max():g}, outside 0..{top:g}: "
                                 f"no defined 8-bit scale")
            return Image.fromarray(np.rint(a * (255 / top)).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGB")
_LAYOUT = "expected DIR/<class>/<image>.jpg, one sub-folder per class"


class ImageFolderDataset(Dataset):
    """root/<class>/**/<image>, sorted class names -> 0..C-1, sorted files, read by load_image.
    An unreadable image either stops with a DataError (on_bad_image="stop"), or is skipped with
    a one-line warning: for training (on_bad_image="skip") the next readable sample is returned
    instead, so batch shapes never change; for an evaluation, which must score each image once
    (on_bad_image="drop"), the item is a black image labelled UNREADABLE, for the caller to drop.
    `num_skipped` counts the distinct unreadable files met so far, in this process and in
    DataLoader workers, `unreadable` names them; `skipped_by_extension` counts the image files
    of kinds not read ({".heic": 3}, NOT_READ_EXTENSIONS)."""

    def __init__(self, root, transform=None, on_bad_image="skip"):
        if on_bad_image not in ("skip", "stop", "drop"):
            raise DataError(f"on_bad_image must be 'skip' or 'stop', got {on_bad_image!r}: "
                            f"pass --on_bad_image skip or --on_bad_image stop")
        root = os.fspath(root)
        if not os.path.exists(root):
            raise DataError(f"data folder '{root}' does not exist: pass --data DIR with one "
                            f"sub-folder per class, or --data synthetic")
        if not os.path.isdir(root):
            raise DataError(f"data path '{root}' is not a folder: pass --data DIR with one "
                            f"sub-folder per class ({_LAYOUT}), or --data synthetic")
        # hidden folders (.git, .ipynb_checkpoints) are never classes
        classes = sorted(e.name for e in os.scandir(root)
                         if e.is_dir() and not e.name.startswith("."))
        if not classes:
            n_loose = sum(1 for e in os.scandir(root) if _is_image(e.name))
            hint = f" (it holds {n_loose} images directly: move them into class sub-folders)" \
                if n_loose else ""
            raise DataError(f"data folder '{root}' has no class sub-folders{hint}: {_LAYOUT}")
        skipped = {}
        samples = [(path, target) for target, c in enumerate(classes)
                   for path in _image_files(os.path.join(root, c), skipped)]
        self.skipped_by_extension = dict(sorted(skipped.items()))
        if not samples:
            other = f" (only {', '.join(f'{n} {e}' for e, n in skipped.items())}, not read: convert them)" \
                if skipped else ""
            raise DataError(f"data folder '{root}' has {len(classes)} class sub-folders but no "
                            f"image files ({' '.join(IMAGE_EXTENSIONS)}){other}: {_LAYOUT}")
        self.root, self.transform, self.on_bad_image = root, transform, on_bad_image
        self.classes, self.samples = classes, samples
        self.targets = [t for _, t in samples]
        # one shared byte per file, set to 1 when it fails to decode. Shared memory so
        # the main process sees what DataLoader workers found; flags rather than a
        # locked counter because a Value's lock created under fork cannot be sent to
        # spawn-context workers, and setting a flag is race-free and idempotent.
        self._bad = mp.RawArray("b", len(samples))

    @property
    def num_skipped(self):
        return int(np.frombuffer(self._bad, dtype=np.int8).sum())

    @property
    def unreadable(self):
        """The paths of the unreadable files met so far, in order."""
        return [path for (path, _), bad in zip(self.samples, self._bad) if bad]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        n = len(self.samples)
        for k in range(n):
            j = (i + k) % n  # on a bad file, walk on to the next one
            if self._bad[j]:
                continue  # already known bad (maybe found by another worker)
            path, target = self.samples[j]
            try:
                img = load_image(path)
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... on bad data
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if self.on_bad_image == "stop":
                    raise DataError(
                        f"cannot read image '{path}' ({reason}): fix or delete it, or pass "
                        f"--on_bad_image skip to skip unreadable images") from None
                self._bad[j] = 1
                print(f"warning: skipping unreadable image '{path}' ({reason})",
                      file=sys.stderr, flush=True)
                if self.on_bad_image == "drop":  # scored nowhere: never replaced by another image
                    black = Image.new("RGB", (64, 64))
                    return (self.transform(black) if self.transform else black), UNREADABLE
                continue
            return (self.transform(img) if self.transform else img), target
        raise DataError(f"no readable image in '{self.root}' (all {n} files failed to "
                        f"decode): check the files, or pass another --data DIR")


def _is_image(name):  # hidden files include macOS '._x.jpg' metadata, not images
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _image_files(folder, skipped=None):
    """All image files under folder, recursively, in a deterministic order; skipped[ext] counts the
    image files of kinds not read (NOT_READ_EXTENSIONS)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # walk in order
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        if skipped is not None:
            for f in filenames:
                ext = os.path.splitext(f)[1].lower()
                if ext in NOT_READ_EXTENSIONS and not f.startswith("."):
                    skipped[ext] = skipped.get(ext, 0) + 1
    return out


class CIFAR10Dataset(Dataset):
    """CIFAR-10 (Krizhevsky 2009) from ROOT/cifar-10-batches-py/, the python pickles that
    torchvision.datasets.CIFAR10 downloads and keeps (downloaded there on first use, 163 MB).
    split 'train': the 5 training batches (50,000 images); 'val' or 'test': the test batch
    (10,000). Items are (PIL RGB 32 x 32 image, label); classes from batches.meta."""

    FOLDER = "cifar-10-batches-py"

    def __init__(self, root, split="train", transform=None):
        folder = os.path.join(os.fspath(root), self.FOLDER)
        if not os.path.isdir(folder):
            _download_cifar10(os.fspath(root))
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        self.classes = list(_unpickle(folder, "batches.meta", "label_names")["label_names"])
        batches = [_unpickle(folder, name, "data", "labels") for name in names]
        data = [np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches]
        labels = [int(t) for b in batches for t in b["labels"]]
        self.images = np.concatenate(data).transpose(0, 2, 3, 1)  # (N, 32, 32, 3) uint8
        self.targets, self.transform = labels, transform
        self.num_skipped = 0  # the pickles have no unreadable images

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def _unpickle(folder, name, *keys):
    """One of CIFAR-10's pickled files, a dict with these keys; a one-line DataError if it cannot be read."""
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") as f:
            out = pickle.load(f, encoding="latin1")
        if not isinstance(out, dict) or any(k not in out for k in keys):
            raise ValueError(f"not a dict with {', '.join(keys)}")
        return out
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read CIFAR-10 file '{path}' ({type(e).__name__}): delete "
                        f"'{folder}' to download it again") from None


def _download_cifar10(root):
    from torchvision.datasets.utils import download_and_extract_archive
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    print(f"downloading CIFAR-10 into '{root}' (163 MB, once)", file=sys.stderr, flush=True)
    try:
        download_and_extract_archive(url, root, md5="c58f30108f718f92721af3b95e74349a")
    except Exception as e:
        raise DataError(f"CIFAR-10 is not in '{root}' and could not be downloaded ({type(e).__name__}): put "
                        f"torchvision's {CIFAR10Dataset.FOLDER}/ there, or pass an image folder as --data") from None


def build_dataset(data, transform=None, split="train", on_bad_image="skip"):
    """--data synthetic -> SyntheticShapes (synthetic:N for N images per split, for quick
    runs); --data cifar10:ROOT -> CIFAR10Dataset (torchvision's files under ROOT, downloaded
    on first use); --data DIR -> DIR/<split> if it exists (train/, val/, or test/ standing
    in for a missing val/), else DIR itself."""
    if str(data).startswith("cifar10:"):
        return CIFAR10Dataset(str(data).partition(":")[2] or ".", split, transform)
    if data == "synthetic" or str(data).startswith("synthetic:"):
        n = str(data).partition(":")[2]
        if n and not n.isdigit():
            raise DataError(f"--data {data}: write synthetic or synthetic:N with N a number of images")
        return SyntheticShapes(split, num_images=int(n) if n else None, transform=transform)
    data = os.fspath(data)
    root = data
    candidates = [split] + (["test"] if split == "val" else [])
    found = [os.path.join(data, s) for s in candidates if os.path.isdir(os.path.join(data, s))]
    if found:
        root = found[0]
    elif os.path.isdir(data) and any(os.path.isdir(os.path.join(data, s))
                                     for s in ("train", "val", "test")):
        # a split tree without the asked-for split: reading DIR itself would make
        # 'train' a class, silently
        raise DataError(f"data folder '{data}' has no '{'/ or '.join(candidates)}/' "
                        f"sub-folder: add DIR/{split}/<class>/<image>.jpg, or pass the "
                        f"class-folder root itself as --data")
    return ImageFolderDataset(root, transform=transform, on_bad_image=on_bad_image)


# -----------------------------------------------------------------------------
# Block masking (BEiT / iBOT / DINOv2)

def _uniform(rng, a, b):  # like random.uniform: b < a is allowed
    return a + (b - a) * float(rng.random())  # random.Random and numpy Generator both have random()


def _randint(rng, a, b):  # inclusive of b, like random.randint
    return rng.randint(a, b) if isinstance(rng, random.Random) else int(rng.integers(a, b + 1))


class BlockMaskGenerator:
    """Masks of a (H, W) patch grid made of rectangles, as DINOv2's (and BEiT's) masking generator
    draws them: each rectangle has a target area ~ U[min_num_patches, min(max_num_patches, remaining)]
    and an aspect ratio log-uniform in [min_aspect, max_aspect], is placed only if both its sides are
    strictly shorter than the grid's, and is kept if it adds 1..remaining new patches (rectangles may
    overlap; one whose rounded area is under min_num_patches is kept too). Ten tries per rectangle;
    masks never more than the requested count, and exactly that count in most draws."""

    def __init__(self, grid_size, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.height, self.width = (grid_size, grid_size) if isinstance(grid_size, int) \
            else (int(grid_size[0]), int(grid_size[1]))
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches or 0.5 * self.num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self):
        return (f"BlockMaskGenerator({self.height}x{self.width}, patches per block "
                f"{self.min_num_patches}..{self.max_num_patches}, aspect "
                f"{math.exp(self.log_aspect[0]):.2f}..{math.exp(self.log_aspect[1]):.2f})")

    def _add_block(self, mask, max_new, rng):
        """Try (10 times) to place one rectangle adding 1..max_new new patches; returns how many it added."""
        for _ in range(10):
            area = _uniform(rng, self.min_num_patches, max_new)
            aspect = math.exp(_uniform(rng, *self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= self.height or w >= self.width:  # never a full row or column of the grid
                continue
            top = _randint(rng, 0, self.height - h)
            left = _randint(rng, 0, self.width - w)
            block = mask[top:top + h, left:left + w]  # a view
            new = h * w - int(block.sum())
            if 0 < new <= max_new:
                block[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches, generator):
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, max_new, generator)
            if added == 0:
                break  # no room for another block: stop a little short
            count += added
        return torch.from_numpy(mask)  # (H, W) bool


def collate_multicrop(samples, mask_generator=None, mask_ratio=(0.1, 0.5),
                      mask_probability=0.5, generator=None):
    """samples: B pairs (list of 2 + M_loc view tensors, label) -> dict with
    "xg": the global views (2, B, 3, G, G), "xl": the local views (M_loc, B, 3, L, L)
    (M_loc = 0: an empty (0, B, 3, G, G)), "labels": (B,) long, and with a mask_generator
    "masks": (2B, N) bool for xg.flatten(0, 1) (DINOv2's rule: int(2B * mask_probability)
    crops get block masks whose ratios are spread evenly over mask_ratio across the
    batch, the rest none, in a random order).
    Leave generator None inside DataLoader workers: a fixed generator in a
    functools.partial is copied into every worker, which would then draw the same masks;
    None draws a seed from torch's RNG, which the DataLoader seeds per worker."""
    views_per_sample = [s[0] for s in samples]
    n_views = len(views_per_sample[0])
    # view k of every sample together, one tensor per crop size, as the step loop wants them
    xg = torch.stack([torch.stack([v[k] for v in views_per_sample]) for k in range(2)])  # (2, B, 3, G, G)
    xl = (torch.stack([torch.stack([v[k] for v in views_per_sample]) for k in range(2, n_views)])
          if n_views > 2 else xg[:0])                                                  # (M_loc, B, 3, L, L)
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)  # (B,)
    out = {"xg": xg, "xl": xl, "labels": labels}
    if mask_generator is None:
        return out
    if n_views < 2:
        raise ValueError("masking needs the 2 global crops first in every sample")
    rng = generator if generator is not None else random.Random(int(torch.randint(2**62, (1,))))
    n_crops = 2 * len(samples)
    N = mask_generator.num_patches
    n_masked = int(n_crops * mask_probability)
    # float32 ratios, as DINOv2's collate computes them (torch.linspace): the same int() of N * ratio
    probs = torch.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1)
    masks = [mask_generator(int(N * (probs[j] + (probs[j + 1] - probs[j]) * float(rng.random()))), rng).flatten()
             for j in range(n_masked)]
    masks += [torch.zeros(N, dtype=torch.bool)] * (n_crops - n_masked)
    order = list(range(n_crops))
    if isinstance(rng, random.Random):
        rng.shuffle(order)
    else:
        order = rng.permutation(n_crops).tolist()
    out["masks"] = torch.stack([masks[k] for k in order])  # (2B, N)
    return out
