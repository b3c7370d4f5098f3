"""Synthetic data for the dense evaluations, written as files in the layouts the scripts read.

- segmentation_set: images of 2-3 shapes of data.py's synthetic shapes on a noisy background of random colour, the
  label of each pixel its shape's class (1..7, background 0), in ADE20K's layout (images/, annotations/, 0 ignored)
  or the generic one (train/images, train/masks, background a class);
- band_set: patch-aligned horizontal or vertical bands of a class each, each class its own exact colour: the case
  where a per-patch feature can be perfect;
- videos: shapes moving, turning and changing size over the frames, with their masks, in DAVIS's layout
  (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt) or the generic one (<video>/images, <video>/masks);
- band_videos: patch-aligned bands moving by whole patches, each object id its own exact colour;
- figure_ground_set: data.py's own training images of its 7 shapes, each pixel labelled shape (1) or background (0).
The learning check uses figure_ground_set and videos(flicker=...): what SimDINO's training teaches in two minutes of
a CPU (the object against its background, invariance to colour changes) is what they score.
"""
import os

import numpy as np
from PIL import Image

from data import SYNTHETIC_SHAPES, _shape_mask, synthetic_image

COLOURS = np.array([[20, 20, 20], [230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40], [230, 40, 230],
                    [40, 230, 230], [240, 240, 240], [128, 64, 0], [0, 128, 64]], dtype=np.uint8)


def shapes_scene(rng, h, w, n_shapes):
    """(h, w, 3) uint8 image and (h, w) labels 0..7: random shapes (class 1..7) over a background (0)."""
    img = rng.uniform(0, 255, 3)[None, None] + rng.normal(0, 8, (h, w, 3))
    labels = np.zeros((h, w), dtype=np.int64)
    for _ in range(n_shapes):
        c = int(rng.integers(len(SYNTHETIC_SHAPES)))
        m = _shape_mask(SYNTHETIC_SHAPES[c], max(h, w), rng)[:h, :w] > 0.5
        img[m] = rng.uniform(0, 255, 3) + rng.normal(0, 8, (m.sum(), 3))
        labels[m] = c + 1
    return np.clip(img, 0, 255).astype(np.uint8), labels


def write_pair(img, labels, img_path, mask_path):
    os.makedirs(os.path.dirname(img_path), exist_ok=True)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    Image.fromarray(img).save(img_path)
    Image.fromarray(labels.astype(np.uint8)).save(mask_path)


def segmentation_set(root, layout="folder", n_train=48, n_val=16, size=(48, 48), shapes=(2, 3), seed=0):
    """Scenes of `shapes` (low, high) shapes under root in the given layout ("ade20k" or "folder"); -> root."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img, labels = shapes_scene(rng, *size, int(rng.integers(shapes[0], shapes[1] + 1)))
            if layout == "ade20k":
                sub = {"train": "training", "val": "validation"}[split]
                write_pair(img, labels + 1, os.path.join(root, "images", sub, f"ADE_{i:05d}.jpg"),   # 0 "other"
                           os.path.join(root, "annotations", sub, f"ADE_{i:05d}.png"))
            else:
                write_pair(img, labels, os.path.join(root, split, "images", f"{i:03d}.jpg"),
                           os.path.join(root, split, "masks", f"{i:03d}.png"))
    return str(root)


def band_labels(rng, grid, patch, num_classes):
    """(grid * patch, grid * patch) labels: horizontal or vertical bands of whole patches, a random class each."""
    cuts = np.sort(rng.choice(np.arange(1, grid), size=int(rng.integers(1, grid)), replace=False))
    classes = rng.integers(num_classes, size=len(cuts) + 1)
    cells = np.repeat(classes, np.diff(np.concatenate([[0], cuts, [grid]])))                   # (grid,)
    labels = np.repeat(cells, patch)[:, None].repeat(grid * patch, 1)
    return labels if rng.integers(2) else labels.T


def band_set(root, n_train=16, n_val=8, grid=4, patch=8, num_classes=4, seed=0):
    """Patch-aligned bands, class c painted COLOURS[c] exactly (PNG), generic layout; -> root."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            labels = band_labels(rng, grid, patch, num_classes)
            write_pair(COLOURS[labels], labels, os.path.join(root, split, "images", f"{i:03d}.png"),
                       os.path.join(root, split, "masks", f"{i:03d}.png"))
    return str(root)


def video_frames(rng, n_frames, h, w, n_objects=2, flicker=0.0):
    """[(h, w, 3) uint8 frame, (h, w) object ids] of shapes that move and grow or shrink; flicker > 0: each frame's
    exposure, contrast and white balance (a gain per channel) drawn in [1 - flicker, 1 + flicker], as a camera's
    automatic settings change them."""
    bg = rng.uniform(0, 255, 3)
    v_seed = int(rng.integers(1 << 30))
    objects = []
    for k in range(n_objects):
        objects.append({"shape": SYNTHETIC_SHAPES[int(rng.integers(len(SYNTHETIC_SHAPES)))],
                        "colour": rng.uniform(0, 255, 3),
                        "pos": rng.uniform([0.25 * h, 0.25 * w], [0.75 * h, 0.75 * w]),
                        "vel": rng.uniform(-0.03, 0.03, 2) * (h, w), "r": rng.uniform(0.15, 0.25) * min(h, w),
                        "grow": rng.uniform(0.97, 1.03)})
    out = []
    for t in range(n_frames):
        img = bg[None, None] + rng.normal(0, 6, (h, w, 3))
        ids = np.zeros((h, w), dtype=np.int64)
        for k, o in enumerate(objects):
            side = int(2 * o["r"] * o["grow"] ** t / 0.6) + 1                         # _shape_mask's diameter range
            m = _shape_mask(o["shape"], side, np.random.default_rng([k, v_seed]))   # the same placement and angle
            m = m > 0.5
            cy, cx = (o["pos"] + t * o["vel"]).astype(int) - side // 2
            ys, xs = np.nonzero(m)
            ys, xs = ys + cy, xs + cx
            keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            img[ys[keep], xs[keep]] = o["colour"]
            ids[ys[keep], xs[keep]] = k + 1
        if flicker:
            gain, contrast = rng.uniform(1 - flicker, 1 + flicker, 3), rng.uniform(1 - flicker, 1 + flicker)
            img = ((img - img.mean()) * contrast + img.mean()) * gain
        out.append((np.clip(img, 0, 255).astype(np.uint8), ids))
    return out


def write_video(root, layout, name, frames, ext=".jpg"):
    for t, (img, ids) in enumerate(frames):
        if layout == "davis":
            img_path = os.path.join(root, "JPEGImages", "480p", name, f"{t:05d}{ext}")
            mask_path = os.path.join(root, "Annotations", "480p", name, f"{t:05d}.png")
        else:
            img_path = os.path.join(root, name, "images", f"{t:05d}{ext}")
            mask_path = os.path.join(root, name, "masks", f"{t:05d}.png")
        write_pair(img, ids, img_path, mask_path)


def videos(root, layout="folder", n_videos=3, n_frames=10, size=(48, 64), seed=0, flicker=0.0):
    """Moving-shape videos under root in the given layout ("davis" or "folder"); -> root."""
    rng = np.random.default_rng(seed)
    names = [f"video{v}" for v in range(n_videos)]
    for name in names:
        write_video(root, layout, name, video_frames(rng, n_frames, *size, flicker=flicker))
    if layout == "davis":
        os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
        with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return str(root)


def band_videos(root, n_videos=2, n_frames=8, grid=(6, 8), patch=8, seed=0):
    """Bands of whole patches (object ids 1, 2 over background 0) moving by a patch at a time, each id painted
    COLOURS[id] exactly (PNG), generic layout; -> root."""
    rng = np.random.default_rng(seed)
    for v in range(n_videos):
        rows = rng.choice(grid[0] - 2, size=2, replace=False)
        frames = []
        for t in range(n_frames):
            cells = np.zeros(grid[0], dtype=np.int64)
            for k, r in enumerate(rows):
                cells[(r + t * (1 if k == 0 else -1)) % grid[0]] = k + 1
            ids = np.repeat(cells, patch)[:, None].repeat(grid[1] * patch, 1)
            frames.append((COLOURS[ids], ids))
        write_video(root, "folder", f"bands{v}", frames, ext=".png")
    return str(root)


def figure_ground_set(root, n_train=200, n_val=100, size=64, seed=0):
    """Images of data.py's synthetic dataset, its 7 shapes in turn, drawn as SyntheticShapes draws them (random
    colours, size, place, angle, lighting, noise), labelled 1 on the shape (mask > 0.5) and 0 on the background,
    PNG, generic layout; -> root. Its own random streams: no image is one of the training set's."""
    for split, stream, n in (("train", 2, n_train), ("val", 3, n_val)):
        for i in range(n):
            img, m = synthetic_image(i % len(SYNTHETIC_SHAPES), size, np.random.default_rng([seed, stream, i]),
                                     with_mask=True)
            write_pair(np.asarray(img), (m > 0.5).astype(np.int64), os.path.join(root, split, "images", f"{i:03d}.png"),
                       os.path.join(root, split, "masks", f"{i:03d}.png"))
    return str(root)
