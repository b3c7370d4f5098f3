"""Tests of data.py: multi-crop views, the synthetic data set, image folders with bad
files, block masks and the DINOv2 mask collate. CPU only, a few seconds."""

import functools
import io
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from data import (IMAGENET_MEAN, IMAGENET_STD, BlockMaskGenerator, DataError,
                  ImageFolderDataset, MultiCropAugmentation, RandomGaussianBlur,
                  SYNTHETIC_CLASSES, SyntheticShapes, build_dataset, collate_multicrop, gaussian_blur,
                  synthetic_image)


# -----------------------------------------------------------------------------
# MultiCropAugmentation

def small_aug(n_local=3, photometric="device"):
    return MultiCropAugmentation(global_crops_size=32, local_crops_size=16,
                                 local_crops_number=n_local, photometric=photometric)


def flat(t):
    """All leaf transforms inside nested Compose / RandomApply."""
    if isinstance(t, transforms.Compose):
        return [x for s in t.transforms for x in flat(s)]
    if isinstance(t, transforms.RandomApply):
        return [t] + [x for s in t.transforms for x in flat(s)]
    return [t]


def of_type(t, cls):
    return [x for x in flat(t) if isinstance(x, cls)]


def views(aug, img):
    """The float views of one image as training sees them: workers' uint8 crops, then on_device."""
    batch = collate_multicrop([(aug(img), 0)])
    xg, xl = aug.on_device(batch["xg"], batch["xl"])
    return [*xg[:, 0], *xl[:, 0]]


@pytest.mark.parametrize("photometric", ["device", "pil"])
def test_multicrop_count_and_shapes(photometric):
    img = SyntheticShapes(num_images=1)[0][0]
    aug = small_aug(3, photometric)
    crops = aug(img)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.uint8 for c in crops)   # a quarter of float32's bytes to the training process
    assert [tuple(v.shape) for v in views(aug, img)] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views(aug, img))
    assert len(small_aug(0, photometric)(img)) == 2 and len(views(small_aug(0, photometric), img)) == 2


@pytest.mark.parametrize("photometric", ["device", "pil"])
def test_multicrop_black_image_maps_to_minus_mean_over_std(photometric):
    # black survives every random op (crop, flip, jitter, grayscale, blur, solarize < 128)
    expected = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    black = Image.new("RGB", (48, 48))
    torch.manual_seed(0)
    for _ in range(3):
        for c in views(small_aug(2, photometric), black):
            assert torch.allclose(c, expected[:, None, None].expand_as(c), atol=1e-5)


@pytest.mark.parametrize("photometric", ["device", "pil"])
def test_multicrop_value_range_is_normalised(photometric):
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    ds = SyntheticShapes(num_images=10)
    torch.manual_seed(0)
    crops = [c for i in range(10) for c in views(small_aug(2, photometric), ds[i][0])]
    for c in crops:
        assert (c >= lo[:, None, None] - 1e-5).all() and (c <= hi[:, None, None] + 1e-5).all()
    allc = torch.cat([c.flatten(1) for c in crops], 1)  # (3, pixels)
    assert allc.min() < -1.0 and allc.max() > 1.0  # normalised, not [0, 1]
    assert allc.mean().abs() < 1.0


def test_multicrop_is_reproducible_from_torch_seed():
    img = SyntheticShapes(num_images=1)[0][0]
    for photometric in ("device", "pil"):
        aug = small_aug(3, photometric)
        torch.manual_seed(123)
        a = views(aug, img)
        torch.manual_seed(123)
        b = views(aug, img)
        torch.manual_seed(124)
        c = views(aug, img)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_multicrop_per_crop_parameters_follow_dino():
    kw = dict(global_crops_scale=(0.3, 0.9), local_crops_scale=(0.1, 0.3),
              local_crops_number=4, global_crops_size=40, local_crops_size=24)
    aug = MultiCropAugmentation(**kw, photometric="pil")
    g1, g2, loc = aug.global_transform1, aug.global_transform2, aug.local_transform
    assert [b.p for b in of_type(g1, RandomGaussianBlur)] == [1.0]
    assert [b.p for b in of_type(g2, RandomGaussianBlur)] == [0.1]
    assert [b.p for b in of_type(loc, RandomGaussianBlur)] == [0.5]
    for b in of_type(g1, RandomGaussianBlur):
        assert (b.radius_min, b.radius_max) == (0.1, 2.0)
    # solarisation on global crop 2 only
    assert of_type(g1, transforms.RandomSolarize) == of_type(loc, transforms.RandomSolarize) == []
    (sol,) = of_type(g2, transforms.RandomSolarize)
    assert (sol.p, sol.threshold) == (0.2, 128)
    # the device path draws the same probabilities, per view, in the training process
    assert MultiCropAugmentation.BLUR_P == (1.0, 0.1, 0.5) and MultiCropAugmentation.SOLARIZE_P == (0.0, 0.2, 0.0)
    dev = MultiCropAugmentation(**kw, photometric="device")
    for t, size, scale in ((g1, 40, (0.3, 0.9)), (g2, 40, (0.3, 0.9)), (loc, 24, (0.1, 0.3))):
        (rrc,) = of_type(t, transforms.RandomResizedCrop)
        assert tuple(rrc.size) == (size, size) and tuple(rrc.scale) == scale
        assert rrc.interpolation == transforms.InterpolationMode.BICUBIC
        (flip,) = of_type(t, transforms.RandomHorizontalFlip)
        assert flip.p == 0.5
        (jit,) = of_type(t, transforms.ColorJitter)
        assert (jit.brightness, jit.contrast, jit.saturation, jit.hue) == \
            ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        (apply,) = [x for x in of_type(t, transforms.RandomApply) if jit in x.transforms]
        assert apply.p == 0.8
        (gray,) = of_type(t, transforms.RandomGrayscale)
        assert gray.p == 0.2
        assert isinstance(flat(t)[-1], transforms.PILToTensor)  # uint8 out; on_device normalises
    for t in (dev.global_transform1, dev.global_transform2, dev.local_transform):  # workers: crop and flip only
        assert [type(x) for x in flat(t)] == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip,
                                             transforms.PILToTensor]
    with pytest.raises(DataError, match="--photometric"):
        MultiCropAugmentation(photometric="gpu")
    # auto: the batched float operations where a GPU runs them, PIL on a CPU
    assert MultiCropAugmentation().photometric == ("device" if torch.cuda.is_available() else "pil")


def test_gaussian_blur_probability():
    # a sharp checkerboard: any blur changes it
    img = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    ref = np.asarray(img)
    torch.manual_seed(0)
    for p, lo, hi in ((1.0, 400, 400), (0.0, 0, 0), (0.5, 160, 240)):
        blur = RandomGaussianBlur(p)
        changed = sum(not np.array_equal(np.asarray(blur(img)), ref) for _ in range(400))
        assert lo <= changed <= hi, (p, changed)


def test_blur_radius_reaches_both_photometric_paths_and_0_0_means_no_blur():
    img = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    torch.manual_seed(0)
    assert not np.array_equal(np.asarray(RandomGaussianBlur(1.0, 0.1, 0.3)(img)), np.asarray(img))
    assert np.array_equal(np.asarray(RandomGaussianBlur(1.0, 0.0, 0.0)(img)), np.asarray(img))
    pil = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8, photometric="pil",
                                blur_radius=(0.2, 0.5))
    blurs = [b for t in (pil.global_transform1, pil.global_transform2, pil.local_transform)
             for b in of_type(t, RandomGaussianBlur)]
    assert [(b.radius_min, b.radius_max) for b in blurs] == [(0.2, 0.5)] * 3
    # the device path: radius 0 0 gives the views of blur probability 0 from the same draws; DINO's radii do not
    xg = torch.randint(0, 256, (2, 4, 3, 16, 16), dtype=torch.uint8)
    xl = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)

    def views(blur_radius, blur_p=None):
        aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8,
                                    photometric="device", blur_radius=blur_radius)
        if blur_p is not None:
            aug.BLUR_P = blur_p
        torch.manual_seed(1)
        return torch.cat([v.flatten() for v in aug.on_device(xg, xl)])

    unblurred = views((0.1, 2.0), blur_p=(0.0, 0.0, 0.0))
    assert torch.equal(views((0.0, 0.0)), unblurred)
    assert not torch.allclose(views((0.1, 2.0)), unblurred)
    assert not torch.allclose(views((0.1, 2.0)), views((0.1, 0.3)))
    # a radius range from 0: a draw of exactly 0 blurs nothing (no 0 / 0 in the kernel)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(gaussian_blur(x, torch.tensor([0.0, 0.0]), 0.3), x)


@pytest.mark.parametrize("kwargs", [
    dict(blur_radius=(2.0, 1.0)), dict(blur_radius=(-0.1, 1.0)),
    dict(global_crops_scale=(0.5, 0.2)), dict(global_crops_scale=(0.0, 1.0)),
    dict(local_crops_scale=(0.05, 1.5)), dict(global_crops_size=0),
    dict(local_crops_size=-4), dict(local_crops_number=-1), dict(global_crops_size=32.5),
])
def test_multicrop_rejects_bad_settings(kwargs):
    with pytest.raises(DataError, match="pass"):
        MultiCropAugmentation(**kwargs)


# -----------------------------------------------------------------------------
# SyntheticShapes

def test_synthetic_sizes_labels_and_splits():
    train, val = SyntheticShapes("train"), SyntheticShapes("val")
    assert (len(train), len(val)) == (5000, 1000)
    assert len(train.classes) == len(set(train.classes)) == 10
    assert np.bincount(train.targets).tolist() == [500] * 10
    assert np.bincount(val.targets).tolist() == [100] * 10
    img, label = SyntheticShapes(image_size=40)[13]
    assert img.mode == "RGB" and img.size == (40, 40) and label == 3 == train.targets[13]
    with pytest.raises(DataError, match="'train'"):
        SyntheticShapes("test")


def test_synthetic_is_deterministic_and_uses_no_global_rng():
    a = SyntheticShapes("train", num_images=20)
    b = SyntheticShapes("train", num_images=20)
    px = lambda ds, i: np.asarray(ds[i][0])
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    for i in (0, 7, 19, 7):
        assert np.array_equal(px(a, i), px(b, i))
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    val = SyntheticShapes("val", num_images=20)
    seed1 = SyntheticShapes("train", num_images=20, seed=1)
    for i in range(10):
        assert not np.array_equal(px(a, i), px(val, i))
        assert not np.array_equal(px(a, i), px(seed1, i))
        assert not np.array_equal(px(a, i), px(a, i + 10))  # same class, other nuisances
    t = SyntheticShapes(num_images=4, transform=transforms.ToTensor())
    assert t[2][0].shape == (3, 64, 64) and t[2][1] == 2


def test_synthetic_image_with_mask_is_the_same_image_and_its_mask_marks_the_foreground():
    """with_mask (the dense evaluations' labels) draws nothing more: the image is the dataset's; the mask's pixels
    carry the foreground colour, which differs from the background's by >= 80 of luminance before light and noise."""
    for label in range(len(SYNTHETIC_CLASSES)):
        img = synthetic_image(label, 48, np.random.default_rng([3, label]))
        same, m = synthetic_image(label, 48, np.random.default_rng([3, label]), with_mask=True)
        assert np.array_equal(np.asarray(img), np.asarray(same)) and m.shape == (48, 48)
        assert m.min() >= 0 and m.max() <= 1 and (m > 0.9).sum() >= 20 and (m < 0.1).sum() >= 20
        luma = np.asarray(img.convert("L"), dtype=np.float64)
        assert abs(luma[m > 0.9].mean() - luma[m < 0.1].mean()) > 40, SYNTHETIC_CLASSES[label]
        if label < 7:                                      # a shape (diameter <= 70 % of the side) is the smaller part
            assert (m > 0.5).mean() < 0.4, SYNTHETIC_CLASSES[label]


def _radial_spectrum(imgs):
    """Translation- and rotation-invariant descriptor: log radial profile of |FFT| of the
    standardised grayscale image. (n, S, S) -> (n, S/2)."""
    x = imgs - imgs.mean((1, 2), keepdims=True)
    x = x / (x.std((1, 2), keepdims=True) + 1e-6)
    f = np.abs(np.fft.fft2(x))
    S = imgs.shape[1]
    r = np.hypot(np.fft.fftfreq(S)[:, None], np.fft.fftfreq(S)[None, :])
    bins = np.minimum((r * S).astype(int), S // 2).ravel()
    counts = np.bincount(bins, minlength=S // 2 + 1)
    prof = np.stack([np.bincount(bins, fi.ravel(), minlength=S // 2 + 1) / counts for fi in f])
    return np.log(prof[:, 1:] + 1e-3)


def _nearest_class_mean(ftr, ytr, fva, yva):
    mu = np.stack([ftr[ytr == c].mean(0) for c in range(10)])
    sd = ftr.std(0) + 1e-6
    pred = (((fva[:, None] - mu[None]) / sd) ** 2).sum(-1).argmin(1)
    return (pred == yva).mean(), pred


def test_synthetic_classes_are_distinguishable_and_colour_is_not_informative():
    tr = SyntheticShapes("train", num_images=1000, image_size=32)
    va = SyntheticShapes("val", num_images=500, image_size=32)
    imgs = lambda ds: [ds[i][0] for i in range(len(ds))]
    itr, iva = imgs(tr), imgs(va)
    ytr, yva = np.array(tr.targets), np.array(va.targets)
    gray = lambda ims: np.stack([np.asarray(im.convert("L"), np.float32) for im in ims])
    acc, pred = _nearest_class_mean(_radial_spectrum(gray(itr)), ytr,
                                    _radial_spectrum(gray(iva)), yva)
    assert acc > 0.4, acc  # chance is 0.1; measured ~0.6
    per_class = [(pred[yva == c] == c).mean() for c in range(10)]
    assert min(per_class) > 0.2, per_class  # every class, not just shapes vs textures
    colour = lambda ims: np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in ims])
    acc_colour, _ = _nearest_class_mean(colour(itr), ytr, colour(iva), yva)
    assert acc_colour < 0.2, acc_colour


# -----------------------------------------------------------------------------
# ImageFolderDataset and build_dataset

def save_image(path, seed=0, size=20, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)) \
        .save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, data cut


def make_tree(root, bad=True):
    """root/cat: 4 files (2 unreadable when bad), root/dog: 3 files, plus noise."""
    save_image(os.path.join(root, "cat", "0.png"), 0)
    save_image(os.path.join(root, "cat", "3.JPG"), 3, fmt="JPEG")
    save_image(os.path.join(root, "dog", "a.bmp"), 4)
    save_image(os.path.join(root, "dog", "b.webp"), 5)
    save_image(os.path.join(root, "dog", "sub", "c.png"), 6)  # nested files count
    with open(os.path.join(root, "dog", "notes.txt"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(root, ".ipynb_checkpoints"))  # hidden: not a class
    if bad:
        truncated_jpeg(os.path.join(root, "cat", "1.jpg"))
        with open(os.path.join(root, "cat", "2.jpg"), "wb") as f:
            f.write(os.urandom(300))  # garbage


def test_image_folder_layout(tmp_path):
    make_tree(tmp_path, bad=False)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    names = [os.path.relpath(p, tmp_path) for p, _ in ds.samples]
    assert names == ["cat/0.png", "cat/3.JPG", "dog/a.bmp", "dog/b.webp", "dog/sub/c.png"]
    assert ds.targets == [0, 0, 1, 1, 1] == [t for _, t in ds.samples]
    img, label = ds[2]
    assert img.mode == "RGB" and img.size == (20, 20) and label == 1
    assert ds.num_skipped == 0


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist.*--data"),
    ("file", "not a folder"),
    ("empty", "no class sub-folders.*<class>"),
    ("loose", "holds 2 images directly"),
    ("no_images", "no image files.*<class>"),
])
def test_image_folder_errors(tmp_path, case, match):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "loose":
        save_image(str(root / "a.png"))
        save_image(str(root / "b.jpg"), fmt="JPEG")
    elif case == "no_images":
        (root / "cat").mkdir(parents=True)
        (root / "dog").mkdir()
        (root / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=match) as e:
        ImageFolderDataset(root)
    assert "\n" not in str(e.value) and str(root) in str(e.value)


def test_image_folder_rejects_unknown_policy(tmp_path):
    make_tree(tmp_path, bad=False)
    with pytest.raises(DataError, match="on_bad_image"):
        ImageFolderDataset(tmp_path, on_bad_image="ignore")


def to_tensor_dataset(root, **kw):
    return ImageFolderDataset(root, transform=transforms.ToTensor(), **kw)


def test_bad_images_are_skipped_in_process(tmp_path, capfd):
    make_tree(tmp_path)
    ds = to_tensor_dataset(tmp_path)
    assert len(ds) == 7
    x, label = ds[1]  # 1.jpg and 2.jpg are bad: walks on to 3.JPG
    expected = transforms.ToTensor()(Image.open(tmp_path / "cat" / "3.JPG").convert("RGB"))
    assert torch.equal(x, expected)
    assert label == 0 and ds.num_skipped == 2
    err = capfd.readouterr().err
    assert "1.jpg" in err and "2.jpg" in err and len(err.strip().splitlines()) == 2
    ds[2]  # known bad files are not retried, warned or counted again
    assert ds.num_skipped == 2 and capfd.readouterr().err == ""


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_bad_images_are_counted_across_dataloader_workers(tmp_path, context):
    if context not in torch.multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method here")
    make_tree(tmp_path)
    ds = to_tensor_dataset(tmp_path)
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 20, 20)] * 3 + [(1, 3, 20, 20)]
    assert sum(len(y) for _, y in batches) == 7
    assert ds.num_skipped == 2


def test_bad_image_stop_and_all_bad(tmp_path):
    make_tree(tmp_path)
    ds = to_tensor_dataset(tmp_path, on_bad_image="stop")
    ds[0]
    with pytest.raises(DataError, match=r"1\.jpg.*--on_bad_image skip"):
        ds[1]
    with pytest.raises(DataError, match=r"2\.jpg.*--on_bad_image skip"):
        ds[2]
    bad = tmp_path / "allbad"
    (bad / "x").mkdir(parents=True)
    truncated_jpeg(bad / "x" / "t.jpg")
    (bad / "x" / "g.png").write_bytes(b"\x89PNG garbage")
    ds = to_tensor_dataset(bad)
    with pytest.raises(DataError, match="no readable image"):
        ds[1]
    assert ds.num_skipped == 2


def test_data_error_from_a_worker_keeps_its_one_line_message():
    # what torch's DataLoader re-raises in the main process (torch 2.x ExceptionWrapper);
    # not run through real workers here: their shutdown after an error takes ~5 s
    msg = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most "
           "recent call last):\n  File \"worker.py\", line 375, in _worker_loop\n    data = "
           "fetcher.fetch(index)\ndata.DataError: cannot read image 'x.jpg': pass "
           "--on_bad_image skip to skip unreadable images\n")
    assert str(DataError(msg)) == ("cannot read image 'x.jpg': pass --on_bad_image skip "
                                   "to skip unreadable images")
    assert str(DataError("one line: fix")) == "one line: fix"


def test_build_dataset_picks_split_folders(tmp_path):
    for split in ("train", "test"):
        save_image(str(tmp_path / "tree" / split / "cat" / "0.png"))
        save_image(str(tmp_path / "tree" / split / "dog" / "0.png"))
    make_tree(str(tmp_path / "flat"), bad=False)
    assert build_dataset(str(tmp_path / "tree")).root == str(tmp_path / "tree" / "train")
    assert build_dataset(tmp_path / "tree", split="val").root == str(tmp_path / "tree" / "test")
    assert build_dataset(tmp_path / "tree", split="test").root == str(tmp_path / "tree" / "test")
    flat_ds = build_dataset(str(tmp_path / "flat"), split="val", on_bad_image="stop")
    assert flat_ds.root == str(tmp_path / "flat") and flat_ds.classes == ["cat", "dog"]
    assert flat_ds.on_bad_image == "stop"
    (tmp_path / "tree" / "test").rename(tmp_path / "tree" / "other")
    with pytest.raises(DataError, match="no 'val/ or test/' sub-folder"):
        build_dataset(str(tmp_path / "tree"), split="val")
    with pytest.raises(DataError, match="does not exist.*--data synthetic"):
        build_dataset(str(tmp_path / "nope"))
    syn = build_dataset("synthetic", split="val", transform=transforms.ToTensor())
    assert isinstance(syn, SyntheticShapes) and len(syn) == 1000
    assert syn[0][0].shape == (3, 64, 64)


# -----------------------------------------------------------------------------
# Block masks

def components(mask):
    """Sizes of the 4-connected components of a 2-D bool array."""
    mask = mask.numpy()
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, n = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            n += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                inside = 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1]
                if inside and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(n)
    return sizes


class ReleasedMaskingGenerator:
    """DINOv2's MaskingGenerator (dinov2/data/masking.py), transcribed step by step; `rng` stands in for the
    `random` module it calls. The rules under test: a rectangle is placed only when both sides are strictly
    shorter than the grid's, and one whose rounded area is under min_num_patches is not rejected."""

    def __init__(self, size, rng, min_num_patches=4, max_num_patches=None, min_aspect=0.3):
        self.height, self.width = size, size
        self.rng, self.min_num_patches, self.max_num_patches = rng, min_num_patches, max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                num_masked = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros((self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


REQUESTS = [10, 20, 39, 59, 78, 98]      # 5 % .. 50 % of a 14 x 14 grid (DINOv2's ViT/14 at 196 px, ViT/16 at 224)


def test_block_masks_equal_the_released_generator_draw_for_draw():
    """Fed the same random.Random stream, the generator draws the released masks exactly."""
    gen = BlockMaskGenerator(14)
    assert (gen.num_patches, gen.max_num_patches) == (196, 98)
    for n in REQUESTS + [0, 1, 3, 150]:
        for seed in range(40):
            ref = ReleasedMaskingGenerator(14, random.Random(seed), max_num_patches=98)(n)
            ours = gen(n, random.Random(seed))
            assert ours.dtype == torch.bool and ours.shape == (14, 14)
            assert np.array_equal(ours.numpy(), ref), (n, seed)


def mask_statistics(masks, n):
    """Per-draw masked count, exact hit, rows and columns touched (the blocks' extent), and whether some row or
    column is masked whole (only overlapping blocks can do that: a single block is shorter than the grid)."""
    counts = np.array([m.sum() for m in masks])
    rows = np.array([m.any(1).sum() for m in masks])
    cols = np.array([m.any(0).sum() for m in masks])
    full_line = np.array([m.all(1).any() or m.all(0).any() for m in masks])
    return {"count": counts, "exact": (counts == n).astype(float), "rows": rows, "cols": cols,
            "full_line": full_line.astype(float)}


def test_block_mask_statistics_match_the_released_generator():
    """2,000 draws per request size from the numpy-generator path (other random numbers than the release's)
    against the transcription: mean masked count, exact-hit rate and the blocks' extent agree within
    sampling error (5 standard errors of the difference)."""
    gen = BlockMaskGenerator(14)
    ours_rng, ref_rng = np.random.default_rng(0), random.Random(1)
    ref_gen = ReleasedMaskingGenerator(14, ref_rng, max_num_patches=98)
    for n in REQUESTS:
        ours = mask_statistics([gen(n, ours_rng).numpy() for _ in range(2000)], n)
        ref = mask_statistics([ref_gen(n) for _ in range(2000)], n)
        for key in ours:
            a, b = ours[key], ref[key]
            se = math.sqrt((a.var() + b.var()) / 2000) + 1e-9
            assert abs(a.mean() - b.mean()) < 5 * se, (n, key, a.mean(), b.mean())
        assert (ours["count"] <= n).all()
        assert ours["exact"].mean() > 0.85 and n - ours["count"].mean() < 0.5, (n, ours["exact"].mean())


def test_block_mask_rectangular_grid_and_reproducible():
    gen = BlockMaskGenerator((6, 10), min_aspect=0.5)
    assert gen.num_patches == 60 and gen.max_num_patches == 30
    assert np.allclose(np.exp(gen.log_aspect), (0.5, 2.0))
    a = gen(25, random.Random(7))
    assert a.shape == (6, 10) and 20 <= int(a.sum()) <= 25
    assert torch.equal(a, gen(25, random.Random(7)))
    b = gen(25, np.random.default_rng(7))
    assert torch.equal(b, gen(25, np.random.default_rng(7)))
    masks = [gen(25, random.Random(s)) for s in range(5)]
    assert len({m.numpy().tobytes() for m in masks}) > 1
    # a request below min_num_patches (tiny grids) still masks something
    assert int(BlockMaskGenerator(4)(2, random.Random(0)).sum()) in (1, 2)


# -----------------------------------------------------------------------------
# collate_multicrop

def fake_samples(B, n_local=2, G=8, L=4):
    """View k of sample b is filled with 100 * b + k; label of sample b is 10 + b."""
    return [([torch.full((3, G, G), 100.0 * b + k) for k in range(2)]
             + [torch.full((3, L, L), 100.0 * b + 2 + k) for k in range(n_local)], 10 + b)
            for b in range(B)]


def test_collate_views_and_labels():
    out = collate_multicrop(fake_samples(5))
    assert set(out) == {"xg", "xl", "labels"}
    assert out["xg"].shape == (2, 5, 3, 8, 8) and out["xl"].shape == (2, 5, 3, 4, 4)
    for k, v in enumerate([*out["xg"], *out["xl"]]):
        assert torch.equal(v[:, 0, 0, 0], 100.0 * torch.arange(5) + k)
    assert collate_multicrop(fake_samples(3, n_local=0))["xl"].shape == (0, 3, 3, 8, 8)
    assert out["labels"].dtype == torch.long and out["labels"].tolist() == [10, 11, 12, 13, 14]


def test_collate_mask_statistics():
    B, N = 8, 196
    gen = BlockMaskGenerator(14)
    rng = random.Random(0)
    n_masked = int(2 * B * 0.5)
    probs = np.linspace(0.1, 0.5, n_masked + 1)
    ratios = []
    for _ in range(60):
        out = collate_multicrop(fake_samples(B), mask_generator=gen, generator=rng)
        masks = out["masks"]
        assert masks.dtype == torch.bool and masks.shape == (2 * B, N)
        counts = masks.sum(1)
        assert (counts > 0).sum().item() == n_masked  # exactly half the crops, every batch
        assert counts.max().item() <= int(0.5 * N) < N
        got = sorted(counts[counts > 0].tolist())
        for j, c in enumerate(got):  # one crop per ratio stratum [probs[j], probs[j+1]]
            assert int(N * probs[j]) - 8 <= c <= int(N * probs[j + 1]), (j, c)
        ratios += [c / N for c in got]
    assert 0.27 < np.mean(ratios) < 0.31
    # masked crops land in both global crops, in random positions
    hits = torch.zeros(2 * B)
    for _ in range(50):
        hits += collate_multicrop(fake_samples(B), gen, generator=rng)["masks"].any(1).float()
    assert hits[:B].sum() > 0 and hits[B:].sum() > 0 and hits.min() > 0


def released_collate_masks(n_crops, N, gen, rng, mask_ratio=(0.1, 0.5), mask_probability=0.5):
    """The masking part of DINOv2's collate_data_and_cast, transcribed (`rng` for the `random` module):
    float32 ratio strata from torch.linspace, one mask per stratum, the rest empty, shuffled."""
    n_samples_masked = int(n_crops * mask_probability)
    probs = torch.linspace(*mask_ratio, n_samples_masked + 1)
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(torch.BoolTensor(gen(int(N * rng.uniform(prob_min, prob_max)))))
    for _ in range(n_samples_masked, n_crops):
        masks_list.append(torch.BoolTensor(gen(0)))
    rng.shuffle(masks_list)
    return torch.stack(masks_list).flatten(1)


def test_collate_masks_equal_the_released_collate():
    for B, ratio, prob in [(8, (0.1, 0.5), 0.5), (5, (0.2, 0.3), 0.3), (16, (0.1, 0.5), 0.5)]:
        for seed in range(10):
            rng = random.Random(seed)
            ref = released_collate_masks(2 * B, 196, ReleasedMaskingGenerator(14, rng, max_num_patches=98), rng,
                                         ratio, prob)
            ours = collate_multicrop(fake_samples(B), BlockMaskGenerator(14), ratio, prob, random.Random(seed))["masks"]
            assert torch.equal(ours, ref), (B, seed)


def test_collate_masks_reproducible_and_other_settings():
    gen = BlockMaskGenerator(14)
    a = collate_multicrop(fake_samples(4), gen, generator=random.Random(3))["masks"]
    b = collate_multicrop(fake_samples(4), gen, generator=random.Random(3))["masks"]
    c = collate_multicrop(fake_samples(4), gen, generator=np.random.default_rng(3))["masks"]
    assert torch.equal(a, b) and c.shape == a.shape
    torch.manual_seed(0)
    d = collate_multicrop(fake_samples(4), gen)["masks"]
    torch.manual_seed(0)
    assert torch.equal(d, collate_multicrop(fake_samples(4), gen)["masks"])
    assert not torch.equal(d, collate_multicrop(fake_samples(4), gen)["masks"])  # fresh draws
    out = collate_multicrop(fake_samples(5), gen, mask_ratio=(0.2, 0.3), mask_probability=0.3,
                            generator=random.Random(1))
    counts = out["masks"].sum(1)
    assert (counts > 0).sum() == int(10 * 0.3)
    assert counts.max() <= int(196 * 0.3)


def test_collate_in_dataloader_workers():
    aug = MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=2)
    ds = SyntheticShapes(num_images=8, image_size=32, transform=aug)
    collate = functools.partial(collate_multicrop, mask_generator=BlockMaskGenerator(32 // 8))
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    for i, out in enumerate(batches):
        assert out["xg"].shape == (2, 4, 3, 32, 32) and out["xl"].shape == (2, 4, 3, 16, 16)
        assert out["labels"].tolist() == [4 * i + k for k in range(4)]
        assert out["masks"].shape == (8, 16) and (out["masks"].any(1)).sum() <= 4


# -----------------------------------------------------------------------------
# CIFAR-10 in torchvision's format

def write_fake_cifar10(root, per_batch=8, n_test=6, seed=0):
    """ROOT/cifar-10-batches-py/ as torchvision keeps it: 5 pickled training batches, a test batch and
    batches.meta. Image i of a batch is random bytes; its label is i % 10."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)],
                 "batch_label": name}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch}, f)
    return folder


def test_cifar10_reads_torchvisions_files(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    train = build_dataset(f"cifar10:{tmp_path}", split="train")
    test = build_dataset(f"cifar10:{tmp_path}", split="val")
    assert len(train) == 40 and len(test) == 6 and train.classes[3] == "cat" and train.classes == test.classes
    with open(os.path.join(folder, "data_batch_2"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    img, label = train[8 + 3]                                  # batch 2, image 3
    assert img.size == (32, 32) and img.mode == "RGB" and label == 3 == train.targets[11]
    # row-major 1024 red, then green, then blue values per image
    np.testing.assert_array_equal(np.asarray(img)[..., 1], raw["data"][3, 1024:2048].reshape(32, 32))
    views = build_dataset(f"cifar10:{tmp_path}", MultiCropAugmentation(local_crops_number=2, global_crops_size=32,
                                                                        local_crops_size=16))[0][0]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2


def test_cifar10_bad_or_missing_files_give_one_line(tmp_path, monkeypatch):
    folder = write_fake_cifar10(tmp_path)
    with open(os.path.join(folder, "data_batch_4"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DataError, match="cannot read CIFAR-10 file .*data_batch_4.*delete"):
        build_dataset(f"cifar10:{tmp_path}")

    def offline(*args, **kwargs):
        raise OSError("no network")
    import torchvision.datasets.utils
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        build_dataset(f"cifar10:{tmp_path / 'empty'}")
