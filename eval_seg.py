"""Linear semantic segmentation on a frozen backbone: the ADE20K protocol of the SimDINO paper's Table 3 (iBOT's
linear protocol, Zhou et al. 2021; DINOv2's linear head, Oquab et al. 2023).

The backbone is frozen. Its last block's patch tokens after the final norm form an (h, w) map of D-dim features
(--n_last_blocks 4 --concat_cls: the last 4 blocks' maps, each with its CLS token broadcast beside it, DINOv2's
multi-layer "+ms" input). A BatchNorm and a 1x1 convolution map them to class logits (DINOv2's BNHead), which are
upsampled bilinearly to the label's size:

    logits = upsample(W * BN(f(x)) + b)                     (B, C, H, W), trained by cross-entropy, ignore label skipped

Training: random rescale of image and label together (ratio 0.5-2 of --img_scale), a random --crop_size crop in which
no class covers more than 75 % (10 tries), flip, photometric distortion (mmsegmentation's ADE20K pipeline), AdamW with
a linear warm-up and a poly-1 decay, batch 16, every iteration through the backbone. Evaluation: each val image rescaled
to --img_scale, logits averaged over sliding --crop_size windows (stride 341) and resized to the label's own size;
mIoU and mAcc over the classes (mmsegmentation's: intersections and unions summed over the whole val set).

    python eval_seg.py --checkpoint out/simdinov2/checkpoint.pth --data /path/to/ADEChallengeData2016
    torchrun --nproc_per_node=8 eval_seg.py --checkpoint dino_vitbase16_pretrain.pth --data ADEChallengeData2016
    python eval_seg.py --checkpoint ckpt.pth --data my_seg --num_classes 21 --ignore_index 255 --compare_init
    python eval_seg.py --checkpoint ckpt.pth --data ADEChallengeData2016 --cache_features      # no augmentation

Data: ADE20K as released (DIR/images/{training,validation}/*.jpg, DIR/annotations/{training,validation}/*.png, label
0 "other" ignored, 1..150 the classes), or DIR/{train,val}/images/*.jpg with DIR/{train,val}/masks/<same name>.png
holding class indices 0..C-1 and --ignore_index for unlabelled pixels. The settings, their sources and every
difference from the released mmsegmentation configurations are in docs/dense_evaluation.md.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import vit
from data import IMAGENET_MEAN, IMAGENET_STD, DataError, _is_image, load_image
from eval_knn import (add_init_layerscale_arg, add_interpolation_args, arch_name, check_init_layerscale,
                      checkpoint_iteration, default_json, fail, gather_in_order, init_distributed, init_floor,
                      init_settings, load_backbone, random_twin, write_json, check_writable)  # the shared plumbing

IGNORE = -100   # the ignored label inside this script (F.cross_entropy's default)


def get_args(argv=None):
    p = argparse.ArgumentParser("eval_seg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Backbone
    p.add_argument("--checkpoint", default=None,
                   help="""Checkpoint to evaluate: this project's training checkpoints, a bare ViT state dict, or the
                   authors' released DINO / DINOv2 / SimDINO / SimDINOv2 files (architecture read off the weights).""")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="Which network of a training checkpoint to evaluate (teacher, as DINO's evaluations).")
    add_interpolation_args(p)
    p.add_argument("--compare_init", action="store_true",
                   help="""Also train a head on the same architecture freshly initialised (torch.manual_seed(--seed),
                   built as the training scripts build it): what training added over the random network.""")
    add_init_layerscale_arg(p)
    p.add_argument("--seed", default=None, type=int,
                   help="""Seed of the head, of the data order and augmentations, and of the --compare_init network.
                   Default: the checkpoint's own args.seed, else 0.""")
    # Features
    p.add_argument("--n_last_blocks", default=1, type=int,
                   help="""Patch-token maps of this many last blocks (each after the final norm), concatenated
                   (DINOv2's linear: 1; its "+ms": 4).""")
    p.add_argument("--concat_cls", action="store_true",
                   help="""Put each block's CLS token beside its patch tokens, broadcast over the map, before the head
                   (DINOv2's "+ms" input: --n_last_blocks 4 --concat_cls).""")
    # Head training (defaults: DINOv2's ADE20K linear configuration)
    p.add_argument("--iterations", default=40000, type=int,
                   help="Training iterations of the head (DINOv2's linear: 40,000; iBOT's: 160,000).")
    p.add_argument("--batch_size_per_gpu", default=2, type=int,
                   help="Crops per process and iteration (DINOv2, iBOT: 2 x 8 GPUs = 16).")
    p.add_argument("--lr", default=1e-3, type=float,
                   help="""Peak AdamW learning rate (DINOv2's linear: 1e-3; iBOT's: 7e-4), for the batch of 16; not
                   rescaled with the batch (mmsegmentation does not).""")
    p.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay (DINOv2: 1e-4; iBOT: 0.05).")
    p.add_argument("--warmup_iters", default=1500, type=int,
                   help="""Linear warm-up from 1e-6 x lr (DINOv2, iBOT: 1,500 iterations), then poly decay (power 1)
                   to 0.""")
    # Data
    p.add_argument("--data", default=None,
                   help="""ADEChallengeData2016 as released, or a folder DIR/{train,val}/images/ with
                   DIR/{train,val}/masks/ (class indices; see --ignore_index, --num_classes).""")
    p.add_argument("--num_classes", default=None, type=int,
                   help="Classes of a generic folder (default: the largest label of its train masks + 1; ADE20K: 150).")
    p.add_argument("--ignore_index", default=255, type=int,
                   help="Mask value of unlabelled pixels in a generic folder (mmsegmentation: 255). ADE20K: its 0.")
    p.add_argument("--crop_size", default=512, type=int,
                   help="""Side of the training crops and of the sliding windows (DINOv2, iBOT: 512); a multiple of
                   the patch size.""")
    p.add_argument("--img_scale", default=[2048, 512], type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="""Images are rescaled (aspect kept) to fit LONG x SHORT: training at a random ratio 0.5-2 of
                   it, evaluation at it (mmsegmentation's ADE20K: 2048 512).""")
    p.add_argument("--ratio_range", default=[0.5, 2.0], type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="Training rescale ratios (mmsegmentation: 0.5 2.0).")
    p.add_argument("--eval_mode", default="slide", choices=["slide", "whole"],
                   help="""Evaluation over sliding --crop_size windows, logits averaged (DINOv2, iBOT: slide), or the
                   whole rescaled image at once.""")
    p.add_argument("--stride", default=341, type=int, help="Sliding-window stride (DINOv2, iBOT: 341 for 512 crops).")
    p.add_argument("--cache_features", action="store_true",
                   help="""No augmentation: each train image is rescaled to --img_scale and centre-cropped once, its
                   features computed once and kept in memory (float16: images x D x (crop / patch)^2 x 2 bytes, 32 GB
                   for ADE20K with a ViT-B at 512 px), and the head trained on them: the backbone runs once per image
                   instead of once per iteration and crop, at the cost of the augmentations, so the head sees one view
                   of each image and the mIoU is typically lower than the protocol's.""")
    # Run
    p.add_argument("--num_workers", default=4, type=int, help="Data-loading processes per GPU.")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction,
                   help="bf16 autocast for the backbone on CUDA (the head trains in float32). Ignored on CPU.")
    p.add_argument("--output_json", default=None,
                   help="""Where the result goes. Default: <output_dir or the checkpoint's folder>/<checkpoint
                   name>_seg.json.""")
    p.add_argument("--output_dir", default=None, help="Folder for the default JSON file (default: the checkpoint's).")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

class SegFolder(torch.utils.data.Dataset):
    """(RGB uint8 (H, W, 3) array, (H, W) int64 labels, IGNORE where unlabelled) pairs of one split of --data."""

    def __init__(self, root, split, ignore_index=255):
        self.ade = os.path.isdir(os.path.join(root, "images", "training"))
        if self.ade:
            img_dir = os.path.join(root, "images", {"train": "training", "val": "validation"}[split])
            mask_dir = os.path.join(root, "annotations", {"train": "training", "val": "validation"}[split])
        else:
            img_dir, mask_dir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
        if not os.path.isdir(img_dir):
            raise DataError(f"--data {root}: no {img_dir}; expected ADE20K's images/{{training,validation}}/ or "
                            f"{os.path.join(root, '{train,val}', 'images')}/ with masks/ beside")
        files = sorted(f for f in os.listdir(img_dir) if _is_image(f))
        self.pairs = [(os.path.join(img_dir, f), os.path.join(mask_dir, os.path.splitext(f)[0] + ".png"))
                      for f in files]
        missing = [m for _, m in self.pairs if not os.path.exists(m)]
        if not self.pairs or missing:
            raise DataError(f"--data {root}: {len(self.pairs)} images in {img_dir}, {len(missing)} of them without "
                            f"a mask (e.g. {missing[0] if missing else 'none'}); give every image its .png mask")
        self.ignore_index = ignore_index

    def __len__(self):
        return len(self.pairs)

    def labels(self, i):
        m = np.array(Image.open(self.pairs[i][1]), dtype=np.int64)
        if m.ndim != 2:
            raise DataError(f"mask {self.pairs[i][1]} is not single-channel: save class indices as an L or P PNG")
        if self.ade:                                                    # reduce_zero_label: 0 ignored, 1..150 -> 0..149
            return np.where(m == 0, IGNORE, m - 1)
        return np.where(m == self.ignore_index, IGNORE, m)

    def __getitem__(self, i):
        return np.array(load_image(self.pairs[i][0])), self.labels(i)


def rescale_size(h, w, img_scale, ratio=1.0):
    """mmcv's keep-ratio rescale: the largest size with long side <= LONG x ratio and short side <= SHORT x ratio."""
    long_edge, short_edge = int(max(img_scale) * ratio), int(min(img_scale) * ratio)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize(img, labels, size):
    """(H, W, 3) uint8 and (H, W) labels -> (3, h, w) float in 0..255 (bilinear, half-pixel centres, no anti-aliasing,
    rounded: OpenCV's INTER_LINEAR as mmcv calls it) and (h, w) labels (nearest: OpenCV's INTER_NEAREST)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    y = None if labels is None else F.interpolate(torch.from_numpy(labels)[None, None].double(), size=size,
                                                  mode="nearest")[0, 0].long()
    return x, y


def photometric_distortion(x, rng):
    """mmsegmentation's PhotoMetricDistortion on (3, H, W) float 0..255: each with probability 1/2, brightness +-32,
    contrast x 0.5-1.5 (before or after the rest, at random), saturation x 0.5-1.5 and hue -18..17 (of 180) in HSV;
    8-bit truncation after each step as there. HSV is PIL's (H in 256 steps), not OpenCV's (180), and saturation and
    hue share one round trip through it where mmsegmentation makes one each."""
    def u8(t):
        return t.clamp(0, 255).floor()
    if rng.integers(2):
        x = u8(x + rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        x = u8(x * rng.uniform(0.5, 1.5))
    sat, hue = rng.integers(2), rng.integers(2)
    alpha, delta = (rng.uniform(0.5, 1.5) if sat else 1.0), (rng.integers(-18, 18) if hue else 0)   # numpy's: -18..17
    if sat or hue:
        hsv = np.array(Image.fromarray(x.permute(1, 2, 0).numpy().astype(np.uint8)).convert("HSV")).astype(np.float64)
        hsv[..., 1] = np.clip(hsv[..., 1] * alpha, 0, 255).astype(np.uint8)
        hsv[..., 0] = np.round(hsv[..., 0] + delta * 256 / 180) % 256
        rgb = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1)
    if mode == 0 and rng.integers(2):
        x = u8(x * rng.uniform(0.5, 1.5))
    return x


def normalize_pad(x, y, crop):
    """(3, h, w) 0..255, (h, w) -> ImageNet-normalised (3, crop, crop), (crop, crop): padded at the bottom and right
    with 0 (the mean colour) and IGNORE (mmsegmentation's Pad after Normalize)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255, torch.tensor(IMAGENET_STD)[:, None, None] * 255
    x = (x - mean) / std
    ph, pw = crop - x.shape[1], crop - x.shape[2]
    return F.pad(x, (0, pw, 0, ph)), F.pad(y, (0, pw, 0, ph), value=IGNORE)


def random_crop_box(labels, crop, rng, cat_max_ratio=0.75, tries=10):
    """mmsegmentation's RandomCrop: a random crop box; redrawn (up to 10 times) while one class covers >= cat_max_ratio
    of its labelled pixels or it holds fewer than 2 classes. -> (top, left)."""
    H, W = labels.shape

    def draw():
        return int(rng.integers(0, max(H - crop, 0) + 1)), int(rng.integers(0, max(W - crop, 0) + 1))
    top, left = draw()
    for _ in range(tries):
        window = labels[top:top + crop, left:left + crop]
        _, counts = torch.unique(window[window != IGNORE], return_counts=True)
        if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
            break
        top, left = draw()
    return top, left


class TrainViews(torch.utils.data.Dataset):
    """Item key = epoch * N + i: image i's augmented view of that epoch, drawn from a generator seeded by
    (seed, epoch, i): the same whatever the number of processes and loader workers."""

    def __init__(self, dataset, args, seed):
        self.dataset, self.args, self.seed = dataset, args, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        a, (epoch, i) = self.args, divmod(key, len(self.dataset))
        rng = np.random.default_rng([self.seed, epoch, i])
        img, labels = self.dataset[i]
        size = rescale_size(*labels.shape, a.img_scale, rng.uniform(*a.ratio_range))
        x, y = resize(img, labels, size)
        top, left = random_crop_box(y, a.crop_size, rng)
        x, y = x[:, top:top + a.crop_size, left:left + a.crop_size], y[top:top + a.crop_size, left:left + a.crop_size]
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return normalize_pad(photometric_distortion(x, rng), y, a.crop_size)


class CentreViews(torch.utils.data.Dataset):
    """--cache_features: image i rescaled to --img_scale and centre-cropped to --crop_size, nothing random."""

    def __init__(self, dataset, args):
        self.dataset, self.args = dataset, args

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, labels = self.dataset[i]
        x, y = resize(img, labels, rescale_size(*labels.shape, self.args.img_scale))
        c = self.args.crop_size
        top, left = max(y.shape[0] - c, 0) // 2, max(y.shape[1] - c, 0) // 2
        return normalize_pad(x[:, top:top + c, left:left + c], y[top:top + c, left:left + c], c)


def batch_keys(n, batch_size, world_size, rank, iterations, seed):
    """Per iteration, this process's keys (epoch * n + i): each epoch is one permutation of the n images (seeded by
    (seed, epoch)) cut into global batches of batch_size x world_size; process r takes the r-th slice of each."""
    g, stream, epoch = batch_size * world_size, [], 0
    while len(stream) < iterations * g:                                          # whole epochs, one after the other
        stream.extend((epoch * n + np.random.default_rng([seed, epoch]).permutation(n)).tolist())
        epoch += 1
    return [stream[it * g + rank * batch_size: it * g + (rank + 1) * batch_size] for it in range(iterations)]


# ----------------------------------------------------------------------------- features and head

def dense_features(backbone, x, n_last_blocks=1, concat_cls=False):
    """(B, 3, H, W) -> (B, n * D (x 2 with concat_cls), H / p, W / p) float32: the last n blocks' patch tokens after the
    final norm as maps (registers left out), each followed by its CLS token broadcast over the map."""
    p, r = backbone.patch_size, 1 + backbone.num_register_tokens
    h, w = x.shape[-2] // p, x.shape[-1] // p
    maps = []
    for out in backbone.get_intermediate_layers(x, n_last_blocks):                # n x (B, 1 + R + h*w, D)
        patches = out[:, r:].transpose(1, 2).reshape(len(x), -1, h, w)            # (B, D, h, w)
        maps.append(patches)
        if concat_cls:
            maps.append(out[:, 0, :, None, None].expand_as(patches))              # (B, D, h, w) the CLS everywhere
    return torch.cat(maps, 1).float()


class SyncStatsBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch (SyncBN, as DINOv2's head), summed
    over processes with torch.distributed; with one process, plain batch statistics. The statistics depend only on
    the frozen features, so no gradient needs to flow through them to the head's parameters."""

    def forward(self, x):                                                           # (B, C, h, w)
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            stats = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)),
                               x.new_tensor([x.numel() / x.shape[1]])]).double()   # (2C + 1,)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(stats)
            C, n = x.shape[1], stats[-1]
            mean = stats[:C] / n
            var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)                  # biased, as BN normalises
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.float())
            self.running_var.mul_(1 - m).add_(m * (var * n / max(n - 1, 1)).float())
            self.num_batches_tracked += 1
        x = (x - mean.float()[:, None, None]) / torch.sqrt(var.float()[:, None, None] + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class LinearSegHead(nn.Module):
    """BN + 1x1 convolution from the feature map to class logits (DINOv2's BNHead; mmsegmentation's conv_seg init)."""

    def __init__(self, in_dim, num_classes):
        super().__init__()
        self.bn = SyncStatsBatchNorm(in_dim)
        self.conv = nn.Conv2d(in_dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, f):                                                           # (B, D', h, w)
        return self.conv(self.bn(f))                                                # (B, C, h, w)


def lr_at(it, args):
    """mmcv's poly schedule (power 1, min 0) with a linear warm-up from 1e-6 x its value."""
    poly = args.lr * (1 - it / args.iterations)
    if it < args.warmup_iters:
        return poly * (1 - (1 - it / args.warmup_iters) * (1 - 1e-6))
    return poly


def train_head(head, batches, feature_fn, args, device, world_size=1, rank=0):
    """AdamW on the head over the batches (one per iteration). The loss is the cross-entropy summed over this
    process's labelled pixels, divided by the global batch's number of labelled pixels and multiplied by world_size,
    so that DDP's gradient average is the global batch's mean over its labelled pixels, whatever the process count."""
    params = (head.module if hasattr(head, "module") else head).parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    head.train()
    bar = tqdm(batches, desc="head", disable=rank != 0, dynamic_ncols=True)
    for it, (x, y) in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, args)
        with torch.no_grad():
            f = feature_fn(x.to(device, non_blocking=True))                         # (B, D', h, w)
        y = y.to(device, non_blocking=True)                                         # (B, S, S)
        logits = F.interpolate(head(f), size=y.shape[-2:], mode="bilinear", align_corners=False)   # (B, C, S, S)
        n = (y != IGNORE).sum().double()
        if world_size > 1:
            dist.all_reduce(n)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum") / n.clamp_min(1).float() * world_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and (it % 50 == 0 or it + 1 == len(batches)):
            bar.set_postfix(loss=f"{loss.item() / world_size:.3f}")
    return head


# ----------------------------------------------------------------------------- inference and scores

def logits_of(head, feature_fn, patch_size, x):
    """(B, 3, h, w) normalised images -> (B, C, h, w) logits; padded at the bottom / right to a multiple of the patch
    size for the backbone, the padding's logits dropped."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (0, -w % patch_size, 0, -h % patch_size))
    out = head(feature_fn(xp))                                                      # (B, C, h' / p, w' / p)
    return F.interpolate(out, size=xp.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]


@torch.no_grad()
def predict(head, feature_fn, patch_size, img, args, device):
    """(H, W, 3) uint8 -> (C, H, W) logits at the image's own size (mmsegmentation's slide or whole inference)."""
    H, W = img.shape[:2]
    x, _ = resize(img, None, rescale_size(H, W, args.img_scale))
    x = ((x - torch.tensor(IMAGENET_MEAN)[:, None, None] * 255) / (torch.tensor(IMAGENET_STD)[:, None, None] * 255))
    x = x[None].to(device)                                                          # (1, 3, h, w)
    h, w = x.shape[-2:]
    if args.eval_mode == "whole":
        out = logits_of(head, feature_fn, patch_size, x)
    else:
        c, s = args.crop_size, args.stride
        out = torch.zeros(1, head.conv.out_channels, h, w, device=device)
        count = torch.zeros(1, 1, h, w, device=device)
        for i in range(max(h - c + s - 1, 0) // s + 1):
            for j in range(max(w - c + s - 1, 0) // s + 1):
                y2, x2 = min(i * s + c, h), min(j * s + c, w)
                y1, x1 = max(y2 - c, 0), max(x2 - c, 0)
                out[..., y1:y2, x1:x2] += logits_of(head, feature_fn, patch_size, x[..., y1:y2, x1:x2])
                count[..., y1:y2, x1:x2] += 1
        out = out / count
    return F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)[0]


def confusion_areas(pred, labels, num_classes):
    """(H, W) predicted and true classes (IGNORE skipped) -> (3, C) int64: intersection, union, true area per class."""
    keep = labels != IGNORE
    pred, labels = pred[keep], labels[keep]
    inter = torch.bincount(labels[pred == labels], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(labels, minlength=num_classes)
    return torch.stack([inter, area_pred + area_label - inter, area_label])


def seg_scores(areas):
    """(3, C) summed areas -> mIoU, mAcc, aAcc in % and the per-class IoU / Acc (None for a class with no union /
    no true pixel: left out of the means, as mmsegmentation's nanmean)."""
    inter, union, label = areas.double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    acc = torch.where(label > 0, inter / label.clamp_min(1), torch.full_like(inter, float("nan")))
    return {"mIoU": 100 * iou.nanmean().item(), "mAcc": 100 * acc.nanmean().item(),
            "aAcc": 100 * (inter.sum() / label.sum().clamp_min(1)).item(),
            "per_class_IoU": [None if math.isnan(v) else 100 * v for v in iou.tolist()],
            "per_class_Acc": [None if math.isnan(v) else 100 * v for v in acc.tolist()]}


@torch.no_grad()
def evaluate(head, feature_fn, patch_size, val_set, args, num_classes, device, rank=0, world_size=1):
    """mIoU / mAcc of the head on every val image (each process scores every world_size-th, the areas summed)."""
    head.eval()
    areas = torch.zeros(3, num_classes, dtype=torch.long, device=device)
    for i in tqdm(range(rank, len(val_set), world_size), desc="val", disable=rank != 0, dynamic_ncols=True):
        img, labels = val_set[i]
        pred = predict(head, feature_fn, patch_size, img, args, device).argmax(0)
        areas += confusion_areas(pred, torch.from_numpy(labels).to(device), num_classes)
    if world_size > 1:
        dist.all_reduce(areas)
    return seg_scores(areas.cpu())


# ----------------------------------------------------------------------------- main

def check_args(args):
    if args.checkpoint is None:
        fail("pass --checkpoint PATH (a training checkpoint or a released backbone)")
    if args.data is None:
        fail("pass --data DIR: ADEChallengeData2016, or a folder with train/ and val/ of images/ and masks/")
    check_init_layerscale(args)
    for name in ("iterations", "batch_size_per_gpu", "lr", "crop_size", "stride", "n_last_blocks"):
        if not getattr(args, name) > 0:
            fail(f"--{name} {getattr(args, name)} must be positive")
    if args.warmup_iters < 0 or args.weight_decay < 0:
        fail("--warmup_iters and --weight_decay must be >= 0")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        fail(f"--ratio_range {args.ratio_range[0]:g} {args.ratio_range[1]:g}: need 0 < low <= high")
    if min(args.img_scale) <= 0:
        fail("--img_scale LONG SHORT must be positive")


def count_classes(train_set, args):
    """ADE20K: 150. A generic folder: --num_classes, else the largest train label + 1; every label checked."""
    if train_set.ade:
        return 150
    top = max(int(train_set.labels(i).max(initial=-1)) for i in range(len(train_set)))
    n = args.num_classes or top + 1
    if top >= n or n < 2:
        raise DataError(f"--data {args.data}: train masks hold label {top}, so --num_classes {n} is too small "
                        f"(or < 2); "
                        f"pass --num_classes above every label, and --ignore_index for unlabelled pixels")
    return n


def cached_batches(feature_fn, views, keys, device, rank, world_size):
    """--cache_features: every train view's features and labels computed once (float16 / int16 on the CPU, gathered
    on every process), then the batches of keys read from them."""
    feats, labels = [], []
    for i in tqdm(range(rank, len(views), world_size), desc="features", disable=rank != 0, dynamic_ncols=True):
        x, y = views[i]
        with torch.no_grad():
            feats.append(feature_fn(x[None].to(device))[0].half().cpu())
        labels.append(y.short())
    feats, labels = torch.stack(feats), torch.stack(labels)
    if world_size > 1:
        feats = gather_in_order(feats.to(device), len(views), world_size).cpu()
        labels = gather_in_order(labels.to(device).int(), len(views), world_size).short().cpu()
    return CachedBatches(feats, labels, keys)


class CachedBatches:
    """The batches of keys (one list per iteration) read from cached features (N, D', h, w) and labels (N, S, S)."""

    def __init__(self, feats, labels, keys):
        self.feats, self.labels, self.keys = feats, labels, keys

    def __len__(self):
        return len(self.keys)

    def __iter__(self):
        n = len(self.feats)
        for ks in self.keys:
            idx = [k % n for k in ks]
            yield self.feats[idx], self.labels[idx].long()


def run(backbone, args, train_set, val_set, num_classes, seed, device, rank, world_size):
    """Train a head on the frozen backbone, score it on val -> scores."""
    backbone = backbone.to(device).eval().requires_grad_(False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.bf16)

    def feature_fn(x):
        with autocast:
            return dense_features(backbone, x, args.n_last_blocks, args.concat_cls)

    keys = batch_keys(len(train_set), args.batch_size_per_gpu, world_size, rank, args.iterations, seed)
    if args.cache_features:
        batches = cached_batches(feature_fn, CentreViews(train_set, args), keys, device, rank, world_size)
        fn = (lambda f: f.float())
    else:
        batches = torch.utils.data.DataLoader(TrainViews(train_set, args, seed), batch_sampler=keys,
                                              num_workers=args.num_workers, pin_memory=device.type == "cuda")
        fn = feature_fn
    torch.manual_seed(seed)
    in_dim = backbone.embed_dim * args.n_last_blocks * (1 + args.concat_cls)
    head = LinearSegHead(in_dim, num_classes).to(device)
    trained = nn.parallel.DistributedDataParallel(head) if world_size > 1 else head
    train_head(trained, batches, fn, args, device, world_size, rank)
    return evaluate(head, feature_fn, backbone.patch_size, val_set, args, num_classes, device, rank, world_size)


def main(args):
    rank, world_size, device = init_distributed()
    check_args(args)
    json_path = default_json(args, "seg")
    check_writable(json_path)                                   # before any work: the result must have a place
    ckpt = vit.read_checkpoint(args.checkpoint)
    model, ckpt_args = load_backbone(ckpt, args.checkpoint_key, args.interpolate_offset, args.interpolate_antialias)
    iteration = checkpoint_iteration(ckpt)
    del ckpt
    check_init_layerscale(args, model)
    if args.crop_size % model.patch_size:
        fail(f"--crop_size {args.crop_size} is not divisible by the patch size {model.patch_size} of the checkpoint: "
             f"use a multiple of {model.patch_size}")
    if not 1 <= args.n_last_blocks <= len(model.blocks):
        fail(f"--n_last_blocks {args.n_last_blocks} must be between 1 and the backbone's {len(model.blocks)} blocks")
    if not os.path.isdir(args.data):
        raise DataError(f"--data {args.data} is not a folder: pass ADEChallengeData2016 or a folder with train/ and "
                        f"val/")
    train_set, val_set = (SegFolder(args.data, s, args.ignore_index) for s in ("train", "val"))
    num_classes = count_classes(train_set, args)
    seed, ls, source = init_settings(args, ckpt_args)
    init_name, init_fields = init_floor(model, seed, ls, source)
    nets = [("checkpoint", f"{arch_name(model)} {args.checkpoint_key}, {args.checkpoint}", model)]
    if args.compare_init:
        nets.append(("init", init_name, random_twin(model, seed, ls)))
    result = {"checkpoint": args.checkpoint, "iteration": iteration, "checkpoint_key": args.checkpoint_key,
              "backbone": arch_name(model), "data": args.data, "layout": "ade20k" if train_set.ade else "folder",
              "num_train": len(train_set), "num_val": len(val_set), "num_classes": num_classes,
              **{k: getattr(args, k) for k in ("n_last_blocks", "concat_cls", "iterations", "lr", "weight_decay",
                                               "warmup_iters", "crop_size", "img_scale", "ratio_range", "eval_mode",
                                               "stride", "cache_features")},
              "batch_size": args.batch_size_per_gpu * world_size, "seed": seed}
    for label, name, net in nets:
        res = run(net, args, train_set, val_set, num_classes, seed, device, rank, world_size)
        if rank == 0:
            print(f"linear segmentation ({name}): mIoU {res['mIoU']:.2f} mAcc {res['mAcc']:.2f} aAcc {res['aAcc']:.2f} "
                  f"({num_classes} classes, {args.iterations} iterations)")
        if label == "checkpoint":
            result.update(res)
        else:
            result[label] = {**init_fields, **res}
    if rank == 0:
        write_json(result, json_path)
        print(f"written to {json_path}")
    if world_size > 1:
        dist.destroy_process_group()


def cli(argv=None):
    try:
        main(get_args(argv))
    except (DataError, vit.CheckpointError) as e:
        fail(e)


if __name__ == "__main__":
    cli()
