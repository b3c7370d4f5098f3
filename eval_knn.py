"""Weighted k-NN evaluation of a frozen backbone: the DINO protocol (Caron et al. 2021, Sec. 4 and eval_knn.py).

Every image of the train and val splits goes once through the frozen backbone, resized as in the
SimDINO paper's Appendix A (shorter side to 256 px, bicubic; centre crop 224 px). Its final-norm CLS
feature (with --avgpool_patchtokens: [CLS, mean patch token]) is L2-normalised. Each val image is
classified by its k most similar train images (cosine similarity); each neighbour votes for its own
label with the weight exp(sim / T), T = 0.07:

    votes[c] = sum over the k neighbours j with label c of exp(cos(x, x_j) / T),    prediction = argmax_c votes[c]

Top-1 and top-5 accuracy are reported for k = 10, 20, 100, 200 in one run (papers quote k = 20).

    python eval_knn.py --checkpoint out/simdino/checkpoint.pth                    # this project's runs: the teacher
    python eval_knn.py --checkpoint dino_vitbase16_pretrain.pth --data /path/to/imagenet
    torchrun --nproc_per_node=8 eval_knn.py --checkpoint dinov2_vits14_reg4_pretrain.pth --data /path/to/imagenet
    python eval_knn.py --checkpoint out/simdino_synthetic/checkpoint.pth --data synthetic:2000 \\
        --resize_size 36 --crop_size 32 --compare_init                            # trained vs. the same net at init
    python eval_knn.py --checkpoint out/dinov2/checkpoint.pth --compare_init --init_layerscale 0.1   # DINOv2 (below)
    python eval_knn.py --raw_pixels --data data/cifar10 --resize_size 32 --crop_size 32          # no network at all
    python eval_knn.py --checkpoint out/simdino/checkpoint000[1-4].pth     # a run's curve: the images decoded once
    python eval_knn.py --checkpoint out/simdino/checkpoint.pth --avgpool_patchtokens   # [CLS, mean patch] feature

Two floors put a trained network's figure in context. --compare_init: the same architecture freshly initialised,
with the run's own seed. DINOv2 starts its residual branches at layerscale 1e-5, so its fresh network gives every
image nearly the same feature and that floor is decided by float32 rounding (near chance); --init_layerscale 0.1
gives the same architecture a floor that is not. --raw_pixels: no network, k-NN on the normalised pixels.
"""
import argparse
import errno
import json
import math
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision import transforms
from tqdm import tqdm

import vit
from data import IMAGENET_MEAN, IMAGENET_STD, UNREADABLE, DataError, build_dataset


def add_interpolation_args(p):
    p.add_argument("--interpolate_offset", default=None, type=float,
                   help="""Position-embedding resizing at crops other than the stored grid (a released DINOv2 file is
                   stored at 518 px): bicubic with scale_factor (grid + offset) / stored grid, or to the grid exactly
                   with 0. Default: the checkpoint's own (this project's files store it; register models and
                   SimDINOv2: 0; DINO, SimDINO and DINOv2 without registers: 0.1).""")
    p.add_argument("--interpolate_antialias", default=None, action=argparse.BooleanOptionalAction,
                   help="""Anti-aliased resizing of the position embeddings. Default: the checkpoint's own (register
                   models and SimDINOv2: on; DINO, SimDINO and DINOv2 without registers: off).""")


def add_init_layerscale_arg(p):
    p.add_argument("--init_layerscale", default=None, type=float,
                   help="""Initial layerscale of the --compare_init network, for checkpoints whose blocks have
                   layerscale (DINOv2, SimDINOv2). Default: the run's own initial value when its args record it
                   (dinov2.py: 1e-5, simdinov2.py: 0.1), else 0.1 (SimDINOv2, Table 4). At DINOv2's 1e-5 every image
                   gets nearly the same feature and the floor is decided by float32 rounding: 0.1 gives a floor of
                   the same architecture that is not. The output names the value and where it came from.""")


def get_args(argv=None):
    p = argparse.ArgumentParser("eval_knn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Backbone
    p.add_argument("--checkpoint", default=None, nargs="+", metavar="PATH",
                   help="""Checkpoint(s) to evaluate: this project's training checkpoints, bare ViT state dicts, or the
                   authors' released DINO / DINOv2 / SimDINO / SimDINOv2 files. The architecture (width, depth, patch
                   size, registers, layerscale) is read off the weights. Several (a run's epochs, several runs) are
                   evaluated one after the other on images decoded once (--cache_gb), each to its own JSON file.""")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="Which network of a training checkpoint to evaluate (DINO's eval_knn: teacher).")
    add_interpolation_args(p)
    p.add_argument("--compare_init", action="store_true",
                   help="""Also evaluate the same architecture freshly initialised (torch.manual_seed(--seed), built as
                   the training scripts build it) and print both lines: what training added over the random network.""")
    add_init_layerscale_arg(p)
    p.add_argument("--seed", default=None, type=int,
                   help="Seed of the --compare_init network. Default: the checkpoint's own args.seed, else 0.")
    p.add_argument("--raw_pixels", action="store_true",
                   help="""No network: k-NN on the evaluation transform's output itself (bicubic resize, centre crop,
                   ImageNet mean/std, exactly as a network sees it) flattened to 3 x crop_size x crop_size values,
                   with the same protocol (L2-normalised, cosine, exp(sim / T) votes, --nb_knn, top-1 / top-5): the
                   model-free floor. Takes no --checkpoint, --compare_init or saved features; the JSON says
                   "raw-pixel floor" and goes to <output_dir or .>/raw_pixels_knn.json unless --output_json.
                   Memory: (train + val images) x 3 x crop_size^2 x 4 bytes, 737 MB for CIFAR-10 at 32 px.""")
    # Data
    p.add_argument("--data", default="synthetic",
                   help="""ImageFolder-style folder with train/ and val/ (or test/) sub-folders of class folders, or
                   'synthetic' / 'synthetic:N' for the embedded shapes dataset (N images per split), or 'cifar10:ROOT' for
                   torchvision's CIFAR-10 files under ROOT (train: its 50,000 training images; val: its 10,000 test
                   images; downloaded there on first use).""")
    p.add_argument("--resize_size", default=256, type=int,
                   help="Shorter side after the bicubic resize (Appendix A and DINO: 256). For the 64 px synthetic images: 36.")
    p.add_argument("--crop_size", default=224, type=int,
                   help="Side of the centre crop (Appendix A and DINO: 224); a multiple of the patch size. Synthetic: 32.")
    p.add_argument("--on_bad_image", default="skip", choices=["skip", "stop"],
                   help="An unreadable or truncated image is skipped and counted, or stops the run.")
    p.add_argument("--cache_gb", default=4.0, type=float,
                   help="""When several networks are evaluated (several --checkpoint, or --compare_init), the images are
                   decoded and transformed once and kept in memory, if train + val take at most this many GB as
                   float32 (CIFAR-10 at 32 px: 0.74 GB; ImageNet at 224 px: 770 GB, so never). The features are
                   the same either way; 0: decode again for each network.""")
    # k-NN
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], type=int, nargs="+",
                   help="Numbers of neighbours k, all reported in one run (DINO: 10 20 100 200; k=20 is the one quoted).")
    p.add_argument("--avgpool_patchtokens", action="store_true",
                   help="""Feature [CLS, mean of the patch tokens] of the last block after the final norm, (B, 2D), instead
                   of the CLS token alone (DINO's k-NN): eval_linear.py's feature with --n_last_blocks 1
                   --avgpool_patchtokens (DINO's ViT-B probe). Registers are not averaged. The concatenation is
                   L2-normalised as a whole; the JSON says which feature and goes to <checkpoint>_knn_avgpool.json.""")
    p.add_argument("--temperature", default=0.07, type=float,
                   help="T of the vote weights exp(sim / T) (DINO: 0.07).")
    p.add_argument("--chunk_size", default=256, type=int,
                   help="""Val images whose similarities to all train images are computed at once: memory is
                   chunk_size x train images x 4 bytes (1.3 GB for ImageNet-1k at 256). Results do not depend on it.""")
    # Run
    p.add_argument("--batch_size_per_gpu", default=128, type=int, help="Images per process and forward pass (DINO: 128).")
    p.add_argument("--num_workers", default=8, type=int, help="Data-loading processes per GPU.")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction,
                   help="""bf16 autocast for the backbone where the device computes bf16 natively (vit.bf16_native:
                   a GPU of compute capability 8.0 or later, a CPU with AMX or AVX512-BF16), float32 elsewhere; the
                   features are normalised and compared in float32 (docs/precision.md).""")
    p.add_argument("--save_features", default=None, metavar="DIR",
                   help="""Save the extracted train/val features and labels to DIR/knn_features.pth
                   (and DIR/knn_features_init.pth with --compare_init).""")
    p.add_argument("--load_features", default=None, metavar="DIR",
                   help="Skip the backbone: load DIR/knn_features.pth written by --save_features.")
    p.add_argument("--output_json", default=None,
                   help="""Where the result is written as JSON. Default: <output_dir or the checkpoint's
                   folder>/<checkpoint name>_knn.json (--raw_pixels: <output_dir or .>/raw_pixels_knn.json).""")
    p.add_argument("--output_dir", default=None,
                   help="""Folder for the default JSON file (default: the checkpoint's folder; --raw_pixels: the
                   current folder).""")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- k-NN (DINO protocol)

def weighted_votes(sims, neighbour_labels, T, num_classes):
    """(b, k) cosine similarities and labels of the k nearest train samples -> (b, C) votes sum exp(sim / T).

    In float64: exp(1 / T) overflows float32 for T < 0.0114.
    """
    weights = (sims.double() / T).exp()                                            # (b, k)
    votes = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    return votes.scatter_add_(1, neighbour_labels, weights)                         # (b, C)


def topk_hits(votes, labels):
    """(b, C) votes, (b,) labels -> (2,) numbers of top-1 and top-5 hits.

    Top-5: the label is among the (up to) 5 classes with the most votes, among classes that got a vote.
    So with k < 5 neighbours or fewer than 5 classes it stays what it says: a class nobody voted for
    is never a hit (DINO's code ranks the unvoted classes arbitrarily and fails with < 5 classes).
    """
    top_votes, top_classes = votes.topk(min(5, votes.shape[1]), dim=1)             # (b, 5)
    hit = (top_classes == labels[:, None]) & (top_votes > 0)                       # (b, 5)
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).cpu()


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, k_list=(10, 20, 100, 200), T=0.07,
                 num_classes=None, chunk_size=256):
    """Weighted k-NN accuracy of the test samples: {k: (top-1 %, top-5 %)} for each k of k_list.

    Features (N, D) and (M, D) are L2-normalised here (in float32), so similarities are cosines. A k larger
    than the train set is clamped to its size (every train sample votes). The similarity matrix is built
    chunk_size test samples at a time: memory chunk_size x N, whatever M.
    """
    train_features = F.normalize(train_features.float(), dim=1)                    # (N, D) unit rows
    test_features = F.normalize(test_features.float(), dim=1)                      # (M, D)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = [min(k, len(train_features)) for k in k_list]
    hits = torch.zeros(len(ks), 2, dtype=torch.long)                               # (len(ks), top-1/top-5)
    for i in range(0, len(test_features), chunk_size):
        sims = test_features[i:i + chunk_size] @ train_features.T                  # (b, N) cosine similarities
        sims, idx = sims.topk(max(ks), dim=1)                                      # (b, K) largest first
        neighbour_labels = train_labels[idx]                                       # (b, K)
        labels = test_labels[i:i + chunk_size]                                     # (b,)
        for j, k in enumerate(ks):                                                 # the k nearest are the first k
            hits[j] += topk_hits(weighted_votes(sims[:, :k], neighbour_labels[:, :k], T, num_classes), labels)
    n = len(test_features)
    return {k: (100.0 * h[0].item() / n, 100.0 * h[1].item() / n) for k, h in zip(k_list, hits)}


# ----------------------------------------------------------------------------- features

def gather_in_order(local, n_total, world_size):
    """Rank r holds rows r, r + W, r + 2W, ... of an (n_total, ...) tensor -> the whole tensor, in order, on every rank.

    all_gather wants equal shapes: shares are padded to ceil(n_total / W) rows, the padding trimmed after.
    """
    m = math.ceil(n_total / world_size)
    padded = local.new_zeros((m, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)                                                 # W x (m, ...)
    out = local.new_empty((n_total, *local.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world_size] = part[:len(range(r, n_total, world_size))]             # rank r's rows, padding dropped
    return out


class Decoded:
    """A dataset whose images were decoded and transformed once, kept as this process's batches: extract_features
    reads them back for each network instead of decoding again."""

    def __init__(self, dataset, batches, rank, world_size):
        self.dataset, self.batches, self.classes = dataset, batches, dataset.classes
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return len(self.dataset)

    @property
    def num_skipped(self):                                                      # unreadable images, for the JSON
        return getattr(self.dataset, "num_skipped", 0)


def share_batches(dataset, device, batch_size=128, num_workers=0, rank=0, world_size=1):
    """The (images, labels) batches of this process's share: every world_size-th image from rank, in order."""
    if len(dataset) < world_size:
        raise DataError(f"{len(dataset)} images are fewer than the {world_size} processes: use fewer processes")
    if isinstance(dataset, Decoded):
        assert (dataset.rank, dataset.world_size) == (rank, world_size), "decoded for another process"
        return dataset.batches
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(share, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=device.type == "cuda")


def decode_once(dataset, device, batch_size=128, num_workers=0, rank=0, world_size=1):
    """dataset -> Decoded: its share's batches read once (on the CPU, pinned for a GPU)."""
    batches = []
    for x, y in tqdm(share_batches(dataset, device, batch_size, num_workers, rank, world_size), desc="decoding",
                     disable=rank != 0, dynamic_ncols=True):
        batches.append((x, torch.as_tensor(y)))
    return Decoded(dataset, batches, rank, world_size)


def linear_features(backbone, x, n_last_blocks, avgpool):
    """(B, 3, H, W) images -> (B, (n + avgpool) * D) float32: CLS of the last n blocks (+ the last one's mean patch)."""
    outputs = backbone.get_intermediate_layers(x, n_last_blocks)                   # n x (B, 1 + R + N, D), final-normed
    features = [out[:, 0] for out in outputs]                                      # n x (B, D) CLS tokens
    if avgpool:
        features.append(outputs[-1][:, 1 + backbone.num_register_tokens:].mean(1))  # (B, D) patches, not registers
    return torch.cat(features, dim=-1).float()


class ClsAvgpool(torch.nn.Module):
    """--avgpool_patchtokens: the backbone's [CLS, mean patch] feature (B, 2D) of its last block, final-normed."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return linear_features(self.backbone, x, 1, True)


@torch.no_grad()
def extract_features(model, dataset, device, batch_size=128, num_workers=0, rank=0, world_size=1, bf16=True):
    """Backbone features of a whole dataset: (N, D) float32 and (N,) labels of its readable images, in dataset order,
    on every rank; an unreadable image (label UNREADABLE) is dropped, never replaced, so N counts the images scored.

    Each process takes every world_size-th image (no padding duplicates, unlike DistributedSampler); the
    shares are gathered back in dataset order. `dataset` may be decode_once's output: the same images, read once.
    """
    model.eval()
    batches = share_batches(dataset, device, batch_size, num_workers, rank, world_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and vit.bf16_native(device))
    features, labels = [], []
    for x, y in tqdm(batches, desc="features", disable=rank != 0, dynamic_ncols=True):
        with autocast:
            features.append(model(x.to(device, non_blocking=True)).float())        # (B, D)
        labels.append(torch.as_tensor(y).to(device, non_blocking=True))            # (B,) pinned: no sync
    features, labels = torch.cat(features), torch.cat(labels)                      # (N / W, D), (N / W,)
    if world_size > 1:
        features = gather_in_order(features, len(dataset), world_size)             # (N, D)
        labels = gather_in_order(labels, len(dataset), world_size)                 # (N,)
    readable = labels != UNREADABLE
    return features[readable], labels[readable]


# ----------------------------------------------------------------------------- backbone and data (eval_linear.py uses these too)

def fail(msg):
    """Stop with a one-line message and a non-zero exit code, no traceback."""
    sys.exit(f"error: {msg}")


def init_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` runs one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def arch_name(model):
    """'vit_small/16' for a ViT-S with 16 px patches."""
    arch = next(a for a, (d, L, _) in vit.ARCHS.items() if d == model.embed_dim and L == len(model.blocks))
    return f"{arch}/{model.patch_size}"


def load_backbone(path, which="teacher", interpolate_offset=None, interpolate_antialias=None):
    """(ViT with the weights of the checkpoint at path (or of a checkpoint already read), the checkpoint's training
    args as a dict, possibly empty).

    The position embeddings are resized (at crops other than the stored grid) as the checkpoint's own
    code does it (vit.released_interpolation), unless interpolate_offset / interpolate_antialias are given."""
    ckpt = vit.read_checkpoint(path) if isinstance(path, (str, os.PathLike)) else path
    args = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}   # vit_from_checkpoint rejects non-dicts
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    model = vit.vit_from_checkpoint(ckpt, which=which, interpolate_offset=interpolate_offset,
                                    interpolate_antialias=interpolate_antialias)
    return model.eval(), args


def checkpoint_iteration(ckpt):
    """The training iteration a checkpoint of this project's scripts was written at (the k-NN curve's x), else None:
    the released models and bare state dicts do not record one (DINO's full checkpoints record only the epoch)."""
    it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
    return it if isinstance(it, int) and not isinstance(it, bool) else None


def random_twin(model, seed, layerscale=0.1):
    """The same architecture freshly initialised after torch.manual_seed(seed), built as the training scripts build
    their backbone, so a run's own checkpoint gets back the network it started from. `layerscale` is the initial
    value of the layerscale weights, used only if the model has them (the trained weights do not tell it)."""
    torch.manual_seed(seed)
    arch = arch_name(model).split("/")[0]
    grid = math.isqrt(model.pos_embed.shape[1] - 1)
    twin = vit.build_vit(arch, img_size=grid * model.patch_size, patch_size=model.patch_size,
                         num_register_tokens=model.num_register_tokens,
                         layerscale=layerscale if has_layerscale(model) else None,
                         interpolate_offset=model.interpolate_offset, interpolate_antialias=model.interpolate_antialias)
    return twin.to(model.pos_embed.device).eval()


def has_layerscale(model):
    return isinstance(model.blocks[0].ls1, vit.LayerScale)


def init_settings(args, ckpt_args):
    """(seed, layerscale, where the layerscale came from) of the --compare_init network: --seed, else the run's own
    seed, else 0; --init_layerscale, else the run's initial layerscale if its args record it, else 0.1 (SimDINOv2,
    Table 4)."""
    seed = args.seed if args.seed is not None else int(ckpt_args.get("seed", 0))
    if getattr(args, "init_layerscale", None) is not None:
        return seed, float(args.init_layerscale), "--init_layerscale"
    ls = ckpt_args.get("layerscale")
    if isinstance(ls, (int, float)) and not isinstance(ls, bool) and ls > 0:
        return seed, float(ls), "the run's own"
    return seed, 0.1, "default: SimDINOv2's"


def init_floor(model, seed, layerscale, source):
    """(printed name, JSON fields) of the --compare_init network: which floor it is."""
    name = f"{arch_name(model)} random init, seed {seed}"
    fields = {"seed": seed, "floor": "--compare_init: the same architecture, freshly initialised"}
    if has_layerscale(model):
        name += f", layerscale {layerscale:g} ({source})"
        fields.update(layerscale=layerscale, layerscale_from=source)
    return name, fields


def check_init_layerscale(args, model=None):
    """--init_layerscale only sets the --compare_init network's layerscale: refuse it where it would do nothing
    (model: the loaded backbone, once there is one)."""
    if args.init_layerscale is None:
        return
    if not args.compare_init:
        fail(f"--init_layerscale {args.init_layerscale:g} sets the --compare_init network: add --compare_init")
    if not args.init_layerscale > 0:
        fail(f"--init_layerscale {args.init_layerscale:g} must be positive (DINOv2: 1e-5, SimDINOv2: 0.1)")
    if model is not None and not has_layerscale(model):
        fail(f"--init_layerscale: the checkpoint's {arch_name(model)} blocks have no layerscale; drop the flag")


def eval_transform(resize_size, crop_size):
    """Appendix A / DINO: bicubic resize of the shorter side, centre crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_crop(args, model):
    if args.crop_size % model.patch_size:
        fail(f"--crop_size {args.crop_size} is not divisible by the patch size {model.patch_size} of the checkpoint: "
             f"use a multiple of {model.patch_size}, e.g. {max(1, round(args.crop_size / model.patch_size)) * model.patch_size}")


def build_splits(args, train_transform, val_transform):
    """(train, val) datasets of --data: two different image sets with the same classes, at least 2 of them.

    data.build_dataset reads a folder without train/ (val/, test/) sub-folders as the class root itself, for both
    splits (right for training, where labels are unused): here that would score the images against themselves."""
    data = str(args.data)
    folder = not (data == "synthetic" or data.startswith(("synthetic:", "cifar10:")))
    splits = [os.path.join(data, s) for s in ("train", "val", "test")]
    if folder and os.path.isdir(data) and not any(os.path.isdir(s) for s in splits):
        raise DataError(f"--data {data} has no train/ and val/ (or test/) sub-folders, so its images would be "
                        f"evaluated against themselves: put them in {os.path.join(data, 'train')}/<class>/ and "
                        f"{os.path.join(data, 'val')}/<class>/ (different images)")
    on_bad_image = "drop" if args.on_bad_image == "skip" else "stop"             # scored once, or not at all
    train_set = build_dataset(args.data, train_transform, "train", on_bad_image)
    val_set = build_dataset(args.data, val_transform, "val", on_bad_image)
    roots = [getattr(s, "root", None) for s in (train_set, val_set)]
    if folder and None not in roots and os.path.realpath(roots[0]) == os.path.realpath(roots[1]):
        raise DataError(f"--data {data}: train/ and val/ are the same folder ({os.path.realpath(roots[0])}), so its "
                        f"images would be evaluated against themselves: give val/ (or test/) its own images")
    if list(train_set.classes) != list(val_set.classes):
        raise DataError(f"--data {args.data}: train has classes {train_set.classes[:3]}... ({len(train_set.classes)}) "
                        f"but val has {val_set.classes[:3]}... ({len(val_set.classes)}): give both the same class folders")
    if len(train_set.classes) < 2:
        raise DataError(f"--data {args.data} has a single class ('{train_set.classes[0]}'): accuracy over one class "
                        f"is 100 % whatever the features; give train/ and val/ at least 2 class folders")
    return train_set, val_set


def default_json(args, suffix, checkpoint=None):
    """--output_json, else <output_dir or the checkpoint's folder>/<checkpoint name>_<suffix>.json (checkpoint:
    the one evaluated, default args.checkpoint)."""
    if args.output_json:
        return args.output_json
    if getattr(args, "raw_pixels", False):                                       # no checkpoint to sit next to
        return os.path.join(args.output_dir or ".", f"raw_pixels_{suffix}.json")
    checkpoint = checkpoint or args.checkpoint
    folder = args.output_dir or (args.load_features if getattr(args, "load_features", None) else None) \
        or os.path.dirname(os.path.abspath(checkpoint))
    stem = os.path.splitext(os.path.basename(checkpoint))[0] if checkpoint else "features"
    key = "" if args.checkpoint_key == "teacher" else f"_{args.checkpoint_key}"
    return os.path.join(folder, f"{stem}{key}_{suffix}.json")


def check_writable(path, fix="pass --output_json FILE or --output_dir DIR where this user can write"):
    """Stop now, with one line, if the result file at path could not be written at the end: path is not a folder, and
    a file can be created in its folder (or, for a folder still to be made, in the nearest one that exists; nothing
    is made here). Every evaluation script calls it on each file it will write, right after its argument checks and
    before any checkpoint or image is read."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        probe = os.path.join(folder, f".write-test.{socket.gethostname()}.{os.getpid()}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o666))
        os.remove(probe)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        fail(f"cannot write the result to {path}: {os_problem(e)}; {fix}")
    return path


def write_json(obj, path):
    """obj as JSON at path, atomically: a failed write leaves no partial file and stops with one line (a full disk:
    how much room the file needs)."""
    data = json.dumps(obj, indent=2).encode()
    write_atomically(path, lambda f: f.write(data), f" (it needs {len(data) / 1e3:.1f} kB); the result is printed above")


def write_atomically(path, write, note=""):
    """write(f) into a temporary file unique to the process, then renamed to path; on an OSError the temporary file
    is removed and the script stops with one line naming the path and the cause."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"cannot write {'the result to ' if path.endswith('.json') else ''}{path}: {os_problem(e)}{note}")


def os_problem(e):
    """An OSError in the words of the fix it needs."""
    return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EEXIST: "a part of the path is a file, not a folder",
            errno.EISDIR: "it is a folder"}.get(e.errno, e.strerror or type(e).__name__)


def skipped_files(datasets, world_size=1):
    """What an evaluation did not score, for its JSON: {"skipped_images": n, "unreadable_images": [their paths],
    "skipped_by_extension": {".heic": 3, ...}} over the datasets (image files of kinds data.py does not read). Call it
    once the images have been read; with several processes, on every process (each met its own share)."""
    bases = [getattr(d, "dataset", d) for d in datasets]                         # Decoded -> the dataset it read
    names = sorted({path for d in bases for path in getattr(d, "unreadable", [])})
    if world_size > 1:
        every = [None] * world_size
        dist.all_gather_object(every, names)
        names = sorted(set().union(*every))
    by_extension = {}
    for d in bases:
        for ext, n in getattr(d, "skipped_by_extension", {}).items():
            by_extension[ext] = by_extension.get(ext, 0) + n
    return {"skipped_images": len(names), "unreadable_images": names, "skipped_by_extension": by_extension}


def skipped_note(skipped):
    """One line on what was not scored, or None."""
    parts = [f"{skipped['skipped_images']} unreadable images"] if skipped["skipped_images"] else []
    parts += [f"{n} {ext} files (a kind not read: convert them)" for ext, n in skipped["skipped_by_extension"].items()]
    return f"note: not scored: {', '.join(parts)}; the JSON lists them" if parts else None


# ----------------------------------------------------------------------------- main

def check_args(args):
    if args.raw_pixels:
        for flag, given in (("--checkpoint", args.checkpoint is not None), ("--compare_init", args.compare_init),
                            ("--init_layerscale", args.init_layerscale is not None),
                            ("--load_features", args.load_features), ("--save_features", args.save_features)):
            if given:
                fail(f"--raw_pixels evaluates the pixels themselves, without a network: drop {flag}")
    elif args.checkpoint is None and args.load_features is None:
        fail("pass --checkpoint PATH (a training checkpoint or a released backbone), or --load_features DIR")
    if args.checkpoint and args.load_features:
        fail("--load_features evaluates saved features, without a network: drop --checkpoint")
    if args.checkpoint and len(args.checkpoint) > 1:
        for flag, given in (("--output_json", args.output_json), ("--save_features", args.save_features)):
            if given:
                fail(f"{flag} names one file or folder, but {len(args.checkpoint)} checkpoints are evaluated: "
                     f"drop {flag} (each checkpoint's JSON goes beside it, or to --output_dir) or pass one checkpoint")
        if len(set(args.checkpoint)) < len(args.checkpoint):
            fail("--checkpoint: a file is named twice; each is evaluated once")
    if args.avgpool_patchtokens and (args.raw_pixels or args.load_features):
        fail(f"--avgpool_patchtokens chooses a network's feature: drop it with "
             f"{'--raw_pixels' if args.raw_pixels else '--load_features (the saved features are what they are)'}")
    if args.load_features and args.compare_init:
        fail("--compare_init needs the backbone: it cannot be combined with --load_features")
    check_init_layerscale(args)
    if min(args.nb_knn) < 1:
        fail(f"--nb_knn {' '.join(map(str, args.nb_knn))}: every k must be >= 1")
    for name in ("temperature", "chunk_size", "batch_size_per_gpu", "resize_size", "crop_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name} {getattr(args, name)} must be positive")
    if not args.cache_gb >= 0:
        fail(f"--cache_gb {args.cache_gb:g} must be >= 0 (0: decode the images again for each network)")
    if args.crop_size > args.resize_size:
        fail(f"--crop_size {args.crop_size} is larger than --resize_size {args.resize_size}: the centre crop would pad "
             f"the image; use e.g. --resize_size {math.ceil(args.crop_size * 256 / 224)}")


def result_line(name, accs):
    order = sorted(accs, key=lambda k: (k != 20, k))                               # k = 20, the quoted one, first
    return f"k-NN ({name}): " + " | ".join(f"k={k} top-1 {accs[k][0]:.2f} top-5 {accs[k][1]:.2f}" for k in order)


def extract_splits(net, train_set, val_set, args, rank, world_size, device):
    """train_/test_ features (N, D) and labels (N,) of one backbone, and num_classes."""
    feats = {"num_classes": len(train_set.classes)}
    for split, dataset in (("train", train_set), ("test", val_set)):
        feats[f"{split}_features"], feats[f"{split}_labels"] = extract_features(
            net.to(device), dataset, device, args.batch_size_per_gpu, args.num_workers, rank, world_size, args.bf16)
    return feats


FEATURE_KEYS = ("train_features", "train_labels", "test_features", "test_labels", "num_classes")


def load_saved_features(folder):
    path = os.path.join(folder, "knn_features.pth")
    if not os.path.exists(path):
        fail(f"--load_features: no {path}; write it first with --save_features {folder}")
    feats = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(feats, dict) or any(k not in feats for k in FEATURE_KEYS):
        fail(f"--load_features: {path} is not a file written by --save_features (it needs {', '.join(FEATURE_KEYS)})")
    return path, feats


def near_identical(features, n=512, tol=1e-4):
    """True when the first n rows' cosine similarities all lie within tol of 1: every image has (nearly) the same
    feature, so the k-NN vote is decided by float32 rounding, not by the images (DINOv2 at its 1e-5 init)."""
    f = F.normalize(features[:n].float(), dim=1)
    return len(f) > 1 and (f @ f.T).min().item() > 1 - tol


NEAR_IDENTICAL = ("every image's feature is nearly the same (all cosine similarities within 1e-4 of 1): "
                  "the k-NN vote is decided by float32 rounding, not a measure of the images")


def data_info(args, train_set, val_set, world_size=1):
    """The data fields of the JSON; on every process, once the images have been read (skipped_files)."""
    return {"data": args.data, "resize_size": args.resize_size, "crop_size": args.crop_size,
            **skipped_files([train_set, val_set], world_size)}


def output_files(args):
    """Every file this run will write, checked before any work (check_writable)."""
    if args.load_features or args.raw_pixels:
        paths = [default_json(args, "knn")]
    else:
        suffix = "knn_avgpool" if args.avgpool_patchtokens else "knn"
        paths = [default_json(args, suffix, path) for path in args.checkpoint]
    if args.save_features:
        paths += [os.path.join(args.save_features, "knn_features.pth")]
    return paths


def cached_splits(args, splits, n_networks, rank, world_size, device):
    """The two splits decoded once (decode_once) when n_networks > 1 read them and they fit in --cache_gb."""
    gb = sum(len(s) for s in splits) * 3 * args.crop_size ** 2 * 4 / world_size / 1e9
    if n_networks < 2 or gb > args.cache_gb:
        if n_networks > 1 and rank == 0:
            print(f"note: the images ({gb:.1f} GB per process as float32) exceed --cache_gb {args.cache_gb:g}: "
                  f"decoded again for each of the {n_networks} networks")
        return splits
    return [decode_once(s, device, args.batch_size_per_gpu, args.num_workers, rank, world_size) for s in splits]


def main(args):
    rank, world_size, device = init_distributed()
    check_args(args)
    for path in output_files(args):
        check_writable(path, "pass --save_features DIR where this user can write" if path.endswith(".pth") else
                       "pass --output_json FILE or --output_dir DIR where this user can write")
    if args.load_features:
        path, feats = load_saved_features(args.load_features)
        report(args, {"features": path}, [("checkpoint", f"features from {path}", feats)], default_json(args, "knn"),
               rank, device)
    elif args.raw_pixels:
        transform = eval_transform(args.resize_size, args.crop_size)
        train_set, val_set = build_splits(args, transform, transform)
        dim = 3 * args.crop_size ** 2
        name = f"raw-pixel floor, no network: {dim} normalised pixel values (3 x {args.crop_size} x {args.crop_size})"
        runs = [("checkpoint", name, extract_splits(torch.nn.Flatten(), train_set, val_set, args, rank, world_size,
                                                    device))]
        info = {"floor": "raw-pixel floor: k-NN on the normalised pixels, no network", "features": "raw_pixels",
                "feature_dim": dim, "checkpoint": None, "backbone": None,
                **data_info(args, train_set, val_set, world_size)}
        report(args, info, runs, default_json(args, "knn"), rank, device)
    else:
        evaluate_checkpoints(args, rank, world_size, device)
    if world_size > 1:
        dist.destroy_process_group()


def evaluate_checkpoints(args, rank, world_size, device):
    """Each --checkpoint (and its --compare_init floor) on the same images, read once; one JSON file per checkpoint.

    Every checkpoint is loaded and checked before any image is read, so a wrong one fails at once. A floor shared by
    several checkpoints (the same architecture, seed and layerscale: one run's epochs) is computed once."""
    models = []                                                                 # (path, model, its floor or None)
    for path in args.checkpoint:
        ckpt = vit.read_checkpoint(path)
        model, ckpt_args = load_backbone(ckpt, args.checkpoint_key, args.interpolate_offset, args.interpolate_antialias)
        check_crop(args, model)
        check_init_layerscale(args, model)
        floor = init_settings(args, ckpt_args) if args.compare_init else None   # (seed, layerscale, source)
        models.append((path, model, floor, checkpoint_iteration(ckpt)))
    floor_names = {init_floor(model, *floor)[0] for _, model, floor, _ in models if floor}
    transform = eval_transform(args.resize_size, args.crop_size)
    train_set, val_set = cached_splits(args, build_splits(args, transform, transform),
                                       len(models) + len(floor_names), rank, world_size, device)
    feature = ClsAvgpool if args.avgpool_patchtokens else (lambda net: net)     # the network -> its k-NN feature
    floor_features = {}
    for path, model, floor, iteration in models:
        name = f"{arch_name(model)} {args.checkpoint_key}, {path}" + (", [CLS, mean patch]" * args.avgpool_patchtokens)
        runs = [("checkpoint", name, extract_splits(feature(model), train_set, val_set, args, rank, world_size,
                                                    device))]
        if floor:
            init_name, fields = init_floor(model, *floor)
            if init_name not in floor_features:                                 # one run's epochs share it
                twin = feature(random_twin(model, *floor[:2]))
                floor_features[init_name] = {**fields, **extract_splits(twin, train_set, val_set, args, rank,
                                                                        world_size, device)}
            runs.append(("init", init_name, floor_features[init_name]))
        if args.save_features and rank == 0:
            os.makedirs(args.save_features, exist_ok=True)
            for label, _, feats in runs:
                fname = "knn_features.pth" if label == "checkpoint" else f"knn_features_{label}.pth"
                feats = {k: v.cpu() if torch.is_tensor(v) else v for k, v in feats.items()}
                write_atomically(os.path.join(args.save_features, fname), lambda f: torch.save(feats, f),
                                 "; pass --save_features DIR on a disk with room")
        info = {"checkpoint": path, "iteration": iteration, "checkpoint_key": args.checkpoint_key,
                "backbone": arch_name(model),
                "features": "cls+avgpool_patchtokens" if args.avgpool_patchtokens else "cls",
                "feature_dim": model.embed_dim * (1 + args.avgpool_patchtokens),
                **data_info(args, train_set, val_set, world_size)}
        suffix = "knn_avgpool" if args.avgpool_patchtokens else "knn"            # the CLS result is not overwritten
        report(args, info, runs, default_json(args, suffix, path), rank, device)


def report(args, info, runs, path, rank, device):
    """k-NN of each (label, name, features) of runs, printed and written to path as JSON (on rank 0)."""
    if rank != 0:
        return
    result = {**info, "temperature": args.temperature, "nb_knn": args.nb_knn}
    n_train = len(runs[0][2]["train_features"])
    if max(args.nb_knn) > n_train:
        print(f"note: k > {n_train} (the number of train images) is clamped to {n_train}")
    if "skipped_images" in info and skipped_note(info):
        print(skipped_note(info))
    for label, name, feats in runs:
        accs = knn_classify(feats["train_features"].to(device), feats["train_labels"].to(device),
                            feats["test_features"].to(device), feats["test_labels"].to(device),
                            args.nb_knn, args.temperature, feats["num_classes"], args.chunk_size)
        print(result_line(name, accs))
        entry = {"num_train": n_train, "num_val": len(feats["test_features"]), "num_classes": feats["num_classes"],
                 "knn": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in accs.items()}}
        if near_identical(feats["test_features"]):
            fix = "; --init_layerscale 0.1 gives a floor that is not" if "layerscale" in feats else ""
            print(f"note ({name}): {NEAR_IDENTICAL}{fix}")
            entry["note"] = NEAR_IDENTICAL
        if label == "checkpoint":
            result.update(entry)
        else:
            result[label] = {k: feats[k] for k in ("seed", "floor", "layerscale", "layerscale_from") if k in feats}
            result[label].update(entry)
    write_json(result, path)
    print(f"written to {path}")


def cli(argv=None):
    try:
        main(get_args(argv))
    except (DataError, vit.CheckpointError) as e:
        fail(e)


if __name__ == "__main__":
    cli()
