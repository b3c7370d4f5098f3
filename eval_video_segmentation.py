"""DAVIS-2017 semi-supervised video object segmentation by label propagation, with the benchmark's J and F
(the SimDINO paper's Table 3; DINO's protocol, Caron et al. 2021, eval_video_segmentation.py).

Each frame goes through the frozen backbone once: shorter side to --short_side (480) px, the longer one floored to a
multiple of --size_multiple (64), the last block's patch tokens after the final norm are its features (h x w
patches). The first frame's annotation, resized to the patch grid, and the labels predicted for the --n_last_frames
(7) previous frames are the context. Each patch j of the target frame takes its labels from the context patches i:

    A[i, j] = exp(cos(f_i, f_j) / 0.1)               if patch i lies within --size_mask_neighborhood (12) patches of j
    A[i, j] = 0 outside it, and below the --topk (5) largest A[., j] over all context frames
    labels_j = sum_i A[i, j] labels_i / sum_i A[i, j]                          (C, h, w): one channel per object

then upsampled by the patch size (bilinear), each object's channel min-max normalised, and the arg-max written as an
indexed PNG at the frame's own size (the DAVIS palette, written here). The scores are the DAVIS-2017 benchmark's
(Pont-Tuset et al. 2017, davis2017-evaluation), computed here: per object and frame, the region similarity J (IoU)
and the boundary F-measure F (boundaries matched within ceil(0.008 x the image diagonal) pixels), over every frame
but the first and the last; each object's mean over its frames; J mean, F mean over all objects of all videos, and
J&F mean = (J mean + F mean) / 2.

    python eval_video_segmentation.py --checkpoint dino_vitbase16_pretrain.pth --data /path/to/DAVIS
    torchrun --nproc_per_node=8 eval_video_segmentation.py --checkpoint out/simdino/checkpoint.pth --data DAVIS
    python eval_video_segmentation.py --checkpoint out/simdino/checkpoint.pth --data my_videos --compare_init

Data: the DAVIS-2017 release (DIR/JPEGImages/480p/<video>/*.jpg, DIR/Annotations/480p/<video>/*.png, the videos of
DIR/ImageSets/2017/val.txt), or a folder of videos (DIR/<video>/images/*.jpg and DIR/<video>/masks/*.png, the
masks' pixel values the object ids, 0 background; the first frame's mask is required, the others are scored when
present). Videos are shared among torchrun's processes; the scores do not depend on their number.
Every difference from DINO's script and the benchmark's code is listed in docs/dense_evaluation.md.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import vit
from data import IMAGENET_MEAN, DataError, _is_image, load_image
from eval_knn import (add_init_layerscale_arg, add_interpolation_args, arch_name, check_init_layerscale,
                      checkpoint_iteration, default_json, fail, init_distributed, init_floor, init_settings,
                      load_backbone, random_twin, write_json, check_writable)  # the shared plumbing

DINO_STD = (0.228, 0.224, 0.225)   # DINO's color_normalize: 0.228 for red, not ImageNet's 0.229


def get_args(argv=None):
    p = argparse.ArgumentParser("eval_video_segmentation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="""Checkpoint to evaluate: this project's training checkpoints, a bare ViT state dict, or the
                   authors' released DINO / DINOv2 / SimDINO / SimDINOv2 files (architecture read off the weights).""")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="Which network of a training checkpoint to evaluate (DINO: teacher).")
    add_interpolation_args(p)
    p.add_argument("--compare_init", action="store_true",
                   help="""Also evaluate the same architecture freshly initialised (torch.manual_seed(--seed), built as
                   the training scripts build it): what training added over the random network. Its PNGs go to
                   <output_dir>/init/.""")
    add_init_layerscale_arg(p)
    p.add_argument("--seed", default=None, type=int,
                   help="Seed of the --compare_init network. Default: the checkpoint's own args.seed, else 0.")
    p.add_argument("--data", default=None,
                   help="""The DAVIS-2017 folder (JPEGImages/480p, Annotations/480p, ImageSets/2017), or a folder of
                   videos <video>/images/ and <video>/masks/.""")
    p.add_argument("--video_list", default=None,
                   help="""A text file naming one video per line. Default: DAVIS's ImageSets/2017/val.txt (the 30
                   validation videos), or every video folder of a folder of videos.""")
    p.add_argument("--n_last_frames", default=7, type=int,
                   help="Previous frames whose predictions are context, beside the first frame's annotation (DINO: 7).")
    p.add_argument("--size_mask_neighborhood", default=12, type=int,
                   help="""A target patch takes labels only from context patches at most this many patches away in
                   each direction (DINO: 12; 0: no restriction).""")
    p.add_argument("--topk", default=5, type=int,
                   help="Context patches (over all context frames) each target patch takes its labels from (DINO: 5).")
    p.add_argument("--temperature", default=0.1, type=float, help="T of the affinities exp(cos / T) (DINO: 0.1).")
    p.add_argument("--short_side", default=480, type=int,
                   help="Frames are resized to this shorter side (DINO: 480, DAVIS's own 480p).")
    p.add_argument("--size_multiple", default=64, type=int,
                   help="""The longer side is floored to a multiple of this (DINO: 64; 854 x 480 frames become 832 x
                   480). Frames are then cropped at the bottom and right to a multiple of the patch size, as a
                   stride-p patch embedding drops the remainder.""")
    p.add_argument("--bound_th", default=0.008, type=float,
                   help="""Boundary tolerance of F: a fraction of the image diagonal if < 1 (benchmark: 0.008, 8 px at
                   854 x 480), else pixels.""")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction,
                   help="bf16 autocast for the backbone on CUDA (the propagation runs in float32). Ignored on CPU.")
    p.add_argument("--output_dir", default=None,
                   help="""Folder of the predicted PNGs (<output_dir>/<video>/<frame>.png) and of the JSON result.
                   Default: <checkpoint folder>/<checkpoint name>_davis/, the JSON beside the checkpoint.""")
    p.add_argument("--output_json", default=None, help="Where the JSON result goes (default: see --output_dir).")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the DAVIS-2017 scores

def region_similarity(gt, pred):
    """J: (T, H, W) bool ground truth and prediction of one object -> (T,) IoU; a frame where both are empty
    scores 1 (the benchmark's rule)."""
    inter = (gt & pred).sum((-2, -1))
    union = (gt | pred).sum((-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def boundary_map(mask):
    """(H, W) bool -> (H, W) bool 1-pixel boundary, the benchmark's seg2bmap (Martin et al.): a pixel is on the boundary
    when it differs from its right, lower or lower-right neighbour; the last row compares only to the right, the last
    column only downward, the corner pixel never."""
    e, s, se = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    b = (mask ^ e) | (mask ^ s) | (mask ^ se)
    b[-1, :] = mask[-1, :] ^ e[-1, :]
    b[:, -1] = mask[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(r):
    """(2r + 1, 2r + 1) bool disk, x^2 + y^2 <= r^2 (skimage.morphology.disk, the benchmark's structuring element)."""
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def dilate(b, r):
    """Binary dilation of (H, W) bool by disk(r), pixels outside the image ignored (what cv2.dilate computes)."""
    if r == 0 or not b.any():
        return b.copy()
    kernel = torch.from_numpy(disk(r).astype(np.float32))[None, None]
    out = F.conv2d(torch.from_numpy(b.astype(np.float32))[None, None], kernel, padding=r)
    return out[0, 0].numpy() > 0.5


def boundary_f(gt, pred, bound_th=0.008):
    """F: the boundary F-measure of one (H, W) bool prediction against its ground truth. Boundary pixels of either
    one within ceil(bound_th x diagonal) pixels (a disk) of the other's boundary count as matched:
    precision = matched prediction boundary / prediction boundary, recall = matched ground-truth boundary / its
    boundary, F = 2 P R / (P + R). Empty boundaries: both empty -> 1; one empty -> P or R is 0, F = 0."""
    r = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    gb, pb = boundary_map(gt), boundary_map(pred)
    n_gt, n_pred = gb.sum(), pb.sum()
    if n_gt == 0 or n_pred == 0:
        return 1.0 if n_gt == n_pred else 0.0
    precision = (pb & dilate(gb, r)).sum() / n_pred
    recall = (gb & dilate(pb, r)).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def statistics(values):
    """The benchmark's per-object statistics of per-frame scores: mean, recall (fraction above 0.5) and decay
    (mean of the first quarter of the frames minus that of the last)."""
    v = np.asarray(values, dtype=np.float64)
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return {"mean": float(v.mean()), "recall": float((v > 0.5).mean()), "decay": float(bins[0].mean() - bins[3].mean())}


def score_video(gt, pred, num_objects, bound_th=0.008):
    """(T, H, W) ground-truth and predicted object ids of the scored frames -> per object k = 1..num_objects:
    {"J": per-frame J, "F": per-frame F}."""
    out = []
    for k in range(1, num_objects + 1):
        g, p = gt == k, pred == k
        out.append({"J": region_similarity(g, p).tolist(),
                    "F": [boundary_f(g[t], p[t], bound_th) for t in range(len(g))]})
    return out


def summarize(per_video):
    """{video: per-object scores} -> the benchmark's table: J / F mean, recall, decay over all objects, J&F mean."""
    objects = [o for v in per_video.values() for o in v]
    res = {}
    for m in ("J", "F"):
        stats = [statistics(o[m]) for o in objects]
        res[m] = {s: 100 * float(np.mean([x[s] for x in stats])) for s in ("mean", "recall", "decay")}
    res["J&F"] = (res["J"]["mean"] + res["F"]["mean"]) / 2
    res["num_objects"] = len(objects)
    return res


# ----------------------------------------------------------------------------- label propagation (DINO's)

def neighbourhood(h, w, size):
    """(h*w, h*w) float mask: 1 where source patch i and target patch j are at most `size` patches apart in rows
    and in columns (DINO's restrict_neighborhood, vectorised)."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    i, j = i.flatten(), j.flatten()
    return (((i[:, None] - i[None]).abs() <= size) & ((j[:, None] - j[None]).abs() <= size)).float()


def propagate(target, context, labels, topk=5, temperature=0.1, mask=None):
    """Labels of the target frame's patches from the context frames'.

    target (N, D) features of the N target patches; context (M, N, D) of the M context frames' patches; labels
    (M, C, N) their soft labels; mask (N, N) the neighbourhood (source, target) or None -> (C, N) soft labels.
    Affinities exp(cos / T), zero outside the neighbourhood, all but the topk largest per target patch (over all
    context frames and patches; ties with the k-th kept) zeroed, normalised to sum 1 per target patch."""
    M, N, _ = context.shape
    aff = torch.exp(F.normalize(context, dim=-1) @ F.normalize(target, dim=-1).T / temperature)  # (M, N src, N tar)
    if mask is not None:
        aff = aff * mask                                                           # (M, N, N), mask broadcast
    aff = aff.reshape(M * N, N)                                                    # (M*N sources, N targets)
    kth = aff.topk(min(topk, M * N), dim=0).values[-1]                             # (N,) k-th largest per target
    aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
    aff = aff / aff.sum(0, keepdim=True)
    return labels.permute(1, 0, 2).reshape(-1, M * N) @ aff                        # (C, M*N) @ (M*N, N) -> (C, N)


def norm_mask(x):
    """(C, H, W) -> each channel with a positive maximum min-max scaled to [0, 1] (DINO's norm_mask); a constant
    positive channel, 0 / 0 in DINO's code (NaN), becomes 1."""
    lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    scaled = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-30), torch.ones_like(x))
    return torch.where(hi > 0, scaled, x)


# ----------------------------------------------------------------------------- frames and videos

def davis_size(h, w, short_side=480, multiple=64):
    """DINO's read_frame: the shorter side to short_side, the longer one floored to a multiple -> (H, W)."""
    if h > w:
        return int(short_side * h / w // multiple * multiple), short_side
    return short_side, int(short_side * w / h // multiple * multiple)


def read_frame(path, size, patch_size):
    """Image file -> (3, H', W') float, resized to size = (H, W) bilinearly (OpenCV's INTER_LINEAR formula: half-pixel
    centres, no anti-aliasing, rounded to 8 bits as cv2 returns them), normalised with DINO's mean / std, cropped
    to a multiple of the patch size."""
    img = torch.from_numpy(np.asarray(load_image(path), dtype=np.float32)).permute(2, 0, 1)
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255) / 255
    img = (img - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(DINO_STD)[:, None, None]
    H, W = size[0] // patch_size * patch_size, size[1] // patch_size * patch_size
    return img[:, :H, :W]


def read_mask(path):
    """Indexed PNG -> (H, W) int64 object ids; 255 (void) is background, as the benchmark reads it."""
    m = np.array(Image.open(path), dtype=np.int64)
    if m.ndim != 2:
        raise DataError(f"mask {path} is not a single-channel (indexed or grey) PNG: save object ids 0, 1, 2, ...")
    m[m == 255] = 0
    return m


def list_videos(args):
    """[(name, [frame paths], {frame index: mask path})] of --data, in --video_list order."""
    root = args.data
    if not root or not os.path.isdir(root):
        raise DataError(f"--data {root}: no such folder; pass the DAVIS-2017 folder or a folder of videos")
    davis = os.path.isdir(os.path.join(root, "JPEGImages", "480p"))
    listing = args.video_list or (os.path.join(root, "ImageSets", "2017", "val.txt") if davis else None)
    if listing:
        if not os.path.isfile(listing):
            raise DataError(f"--video_list {listing} does not exist: pass a text file naming one video per line")
        with open(listing) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"--data {root} holds no videos: expected {os.path.join(root, '<video>', 'images')}/ and "
                        f"masks/, or DAVIS's JPEGImages/480p/")
    videos = []
    for name in names:
        img_dir = os.path.join(root, "JPEGImages", "480p", name) if davis else os.path.join(root, name, "images")
        mask_dir = os.path.join(root, "Annotations", "480p", name) if davis else os.path.join(root, name, "masks")
        frames = sorted(f for f in os.listdir(img_dir) if _is_image(f)) if os.path.isdir(img_dir) else []
        if not frames:
            raise DataError(f"video '{name}': no frames in {img_dir}")
        stems = {os.path.splitext(f)[0]: i for i, f in enumerate(frames)}
        masks = {stems[os.path.splitext(f)[0]]: os.path.join(mask_dir, f) for f in
                 (os.listdir(mask_dir) if os.path.isdir(mask_dir) else []) if f.endswith(".png")
                 and os.path.splitext(f)[0] in stems}
        if 0 not in masks:
            raise DataError(f"video '{name}': no mask of its first frame {frames[0]} in {mask_dir} "
                            f"(expected {os.path.splitext(frames[0])[0]}.png)")
        videos.append((name, [os.path.join(img_dir, f) for f in frames], masks))
    return videos


def davis_palette():
    """(256, 3) uint8: the PASCAL VOC colour map DAVIS's indexed PNGs use (bits of the index spread over R, G, B)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def write_indexed(path, labels):
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(davis_palette().flatten().tolist())
    img.save(path)


# ----------------------------------------------------------------------------- one video

@torch.no_grad()
def patch_features(model, frame, device, bf16):
    """(3, H, W) frame -> (h*w, D) float32 last-block patch tokens after the final norm, registers left out."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16)
    with autocast:
        out = model.get_intermediate_layers(frame[None].to(device), 1)[0]          # (1, 1 + R + N, D)
    return out[0, 1 + model.num_register_tokens:].float()


@torch.no_grad()
def segment_video(feature_fn, frame_paths, first_mask, args, patch_size, device, out_dir=None):
    """Predicted object ids (T, H, W) of every frame at its own size; frame 0 is the annotation itself.

    feature_fn maps a (3, H, W) frame to its (h*w, D) patch features."""
    H0, W0 = first_mask.shape
    size = davis_size(H0, W0, args.short_side, args.size_multiple)
    h, w = size[0] // patch_size, size[1] // patch_size
    if h < 1 or w < 1:
        raise DataError(f"frames of {W0} x {H0} px resized to {size[1]} x {size[0]} hold no {patch_size} px patch: "
                        f"use a larger --short_side or a smaller --size_multiple")
    C = int(first_mask.max()) + 1
    small = np.array(Image.fromarray(first_mask.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.int64)
    first_labels = F.one_hot(torch.from_numpy(small).flatten(), C).T.float().to(device)   # (C, h*w)
    first_feat = feature_fn(read_frame(frame_paths[0], size, patch_size))                # (h*w, D)
    mask = neighbourhood(h, w, args.size_mask_neighborhood).to(device) if args.size_mask_neighborhood > 0 else None
    queue, preds = [], [first_mask]
    for path in frame_paths[1:]:
        feat = feature_fn(read_frame(path, size, patch_size))                             # (h*w, D)
        context = torch.stack([first_feat] + [f for f, _ in queue])                      # (M, h*w, D)
        labels = torch.stack([first_labels] + [l for _, l in queue])                     # (M, C, h*w)
        soft = propagate(feat, context, labels, args.topk, args.temperature, mask)       # (C, h*w)
        queue = (queue + [(feat, soft)])[-args.n_last_frames:] if args.n_last_frames > 0 else []
        up = F.interpolate(soft.reshape(1, C, h, w), scale_factor=patch_size, mode="bilinear",
                           align_corners=False)[0]                                        # (C, h*p, w*p)
        seg = norm_mask(up).argmax(0).to(torch.uint8).cpu().numpy()
        preds.append(np.array(Image.fromarray(seg).resize((W0, H0), Image.NEAREST), dtype=np.int64))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for path, pred in zip(frame_paths, preds):
            write_indexed(os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png"), pred)
    return np.stack(preds)


def evaluate(feature_fn, videos, args, patch_size, device, out_dir, rank=0, world_size=1):
    """{video: per-object per-frame J and F} of every video, in order, on rank 0 (each process segments every
    world_size-th video)."""
    mine = {}
    for name, frames, masks in tqdm(videos[rank::world_size], desc="videos", disable=rank != 0, dynamic_ncols=True):
        first = read_mask(masks[0])
        pred = segment_video(feature_fn, frames, first, args, patch_size, device,
                             os.path.join(out_dir, name) if out_dir else None)
        scored = [t for t in sorted(masks) if 0 < t < len(frames) - 1]   # the benchmark: not the first, not the last
        if not scored:
            raise DataError(f"video '{name}': no annotated frame besides the first and the last to score; "
                            f"give it masks of its middle frames")
        gt = np.stack([read_mask(masks[t]) for t in scored])
        if gt.shape[1:] != first.shape:
            raise DataError(f"video '{name}': its masks differ in size ({first.shape} and {gt.shape[1:]})")
        mine[name] = score_video(gt, pred[scored], int(first.max()), args.bound_th)
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return {name: mine[name] for name, _, _ in videos}


# ----------------------------------------------------------------------------- main

def check_args(args):
    if args.checkpoint is None:
        fail("pass --checkpoint PATH (a training checkpoint or a released backbone)")
    if args.data is None:
        fail("pass --data DIR: the DAVIS-2017 folder, or a folder of videos <video>/images/ and <video>/masks/")
    check_init_layerscale(args)
    for name in ("topk", "short_side", "size_multiple", "temperature", "bound_th"):
        if not getattr(args, name) > 0:
            fail(f"--{name} {getattr(args, name)} must be positive")
    for name in ("n_last_frames", "size_mask_neighborhood"):
        if getattr(args, name) < 0:
            fail(f"--{name} {getattr(args, name)} must be >= 0")


def result_line(name, res):
    return (f"DAVIS ({name}): J&F mean {res['J&F']:.2f} | J mean {res['J']['mean']:.2f} | "
            f"F mean {res['F']['mean']:.2f} ({res['num_objects']} objects)")


def main(args):
    rank, world_size, device = init_distributed()
    check_args(args)
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"{stem}_davis")
    json_path = default_json(args, "davis")
    for path in (json_path, os.path.join(out_dir, "frame.png")):   # before any work: the results must have a place
        check_writable(path)
    ckpt = vit.read_checkpoint(args.checkpoint)
    model, ckpt_args = load_backbone(ckpt, args.checkpoint_key, args.interpolate_offset, args.interpolate_antialias)
    iteration = checkpoint_iteration(ckpt)
    del ckpt
    check_init_layerscale(args, model)
    videos = list_videos(args)
    nets = [("checkpoint", f"{arch_name(model)} {args.checkpoint_key}, {args.checkpoint}", model, out_dir)]
    seed, ls, source = init_settings(args, ckpt_args)
    init_name, init_fields = init_floor(model, seed, ls, source)
    if args.compare_init:
        nets.append(("init", init_name, random_twin(model, seed, ls), os.path.join(out_dir, "init")))
    settings = {k: getattr(args, k) for k in ("n_last_frames", "size_mask_neighborhood", "topk", "temperature",
                                              "short_side", "size_multiple", "bound_th")}
    result = {"checkpoint": args.checkpoint, "iteration": iteration, "checkpoint_key": args.checkpoint_key,
              "backbone": arch_name(model), "data": args.data, "num_videos": len(videos), **settings,
              "predictions": out_dir}
    for label, name, net, folder in nets:
        net = net.to(device).eval()
        per_video = evaluate(lambda x: patch_features(net, x, device, args.bf16), videos, args, model.patch_size,
                             device, folder, rank, world_size)
        res = {**summarize(per_video), "per_object": {f"{v}_{i + 1}": {m: 100 * statistics(o[m])["mean"]
                                                                        for m in ("J", "F")}
                                                       for v, objs in per_video.items() for i, o in enumerate(objs)}}
        if rank == 0:
            print(result_line(name, res))
        if label == "checkpoint":
            result.update(res)
        else:
            result[label] = {**init_fields, **res, "predictions": folder}
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
