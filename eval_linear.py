"""Linear-probe evaluation of a frozen backbone: the DINO / DINOv2 protocol (Caron et al. 2021, eval_linear.py;
Oquab et al. 2023, linear.py).

The backbone is frozen (eval mode, no gradients). Its features of each image are the CLS tokens of the
last n blocks, concatenated, after the final norm (DINO: n = 4 for ViT-S, 1 for ViT-B), plus for ViT-B
the average of the last block's patch tokens:

    f(x) = [cls_{L-n+1}(x), ..., cls_L(x), (mean of patch_L(x))]                (B, (n + avgpool) * D)

and a linear classifier W f(x) + b is trained on them with cross-entropy, SGD (momentum 0.9, no weight
decay) and a cosine learning-rate schedule, on RandomResizedCrop + flip views of the train split (so the
features are recomputed every batch). As DINOv2 does, one classifier per learning rate of a grid is
trained at once on the same features, and the best one's val accuracy is reported. Evaluation: resize
the shorter side to 256 (bicubic), centre crop 224 (the SimDINO paper's Appendix A).

    python eval_linear.py --checkpoint out/simdino/checkpoint.pth --data /path/to/imagenet
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint dino_vitbase16_pretrain.pth --data /path/to/imagenet
    python eval_linear.py --checkpoint out/simdino_synthetic/checkpoint.pth --data synthetic:2000 \\
        --resize_size 36 --crop_size 32 --epochs 10 --compare_init        # trained vs. the same net at init
    python eval_linear.py --checkpoint out/dinov2/checkpoint.pth --compare_init --init_layerscale 0.1

--compare_init's floor of a DINOv2 run is at its own layerscale 1e-5, where every image has nearly the same
feature; --init_layerscale 0.1 gives the same architecture a floor that is not decided by float32 rounding.
"""
import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms
from tqdm import tqdm

import vit
from data import IMAGENET_MEAN, IMAGENET_STD, UNREADABLE, DataError
from eval_knn import (add_init_layerscale_arg, add_interpolation_args, arch_name, build_splits, check_crop,
                      check_init_layerscale, check_writable, checkpoint_iteration, default_json, eval_transform, fail,
                      init_distributed, init_floor, init_settings, linear_features, load_backbone, random_twin,
                      skipped_files, skipped_note, write_json)  # the loading, data and feature code both share

DINOV2_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]


def get_args(argv=None):
    p = argparse.ArgumentParser("eval_linear", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Backbone
    p.add_argument("--checkpoint", default=None,
                   help="""Checkpoint to evaluate: one of this project's training checkpoints, a bare ViT state dict,
                   or the authors' released DINO / DINOv2 / SimDINO / SimDINOv2 files. The architecture (width, depth,
                   patch size, registers, layerscale) is read off the weights.""")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="Which network of a training checkpoint to evaluate (DINO's eval_linear: teacher).")
    add_interpolation_args(p)
    p.add_argument("--compare_init", action="store_true",
                   help="""Also probe the same architecture freshly initialised (torch.manual_seed(--seed), built as
                   the training scripts build it) and print both lines: what training added over the random network.""")
    add_init_layerscale_arg(p)
    p.add_argument("--seed", default=None, type=int,
                   help="""Seed of the classifiers, the data order and the --compare_init network.
                   Default: the checkpoint's args.seed, else 0.""")
    # Features
    p.add_argument("--n_last_blocks", default=None, type=int,
                   help="""Concatenate the CLS tokens of this many last blocks.
                   Default as DINO: 4 for ViT-S (and ViT-T), 1 for ViT-B/L.""")
    p.add_argument("--avgpool_patchtokens", default=None, action=argparse.BooleanOptionalAction,
                   help="""Also concatenate the average of the last block's patch tokens.
                   Default as DINO: off for ViT-S/T, on for ViT-B/L.""")
    # Classifier training
    p.add_argument("--lrs", default=DINOV2_LRS, type=float, nargs="+",
                   help="""Learning rates per 256 images, one classifier each, trained at once; scaled linearly by
                   the global batch / 256 (DINO's rule). Default: DINOv2's grid 1e-5 ... 0.1 (DINO trains one, 0.001).""")
    p.add_argument("--epochs", default=100, type=int,
                   help="Training epochs of the classifiers (DINO: 100; DINOv2: 12500 iterations).")
    p.add_argument("--batch_size_per_gpu", default=128, type=int,
                   help="Images per process and step (DINO: 128 x 8 GPUs = 1024).")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (DINO: 0.9).")
    p.add_argument("--weight_decay", default=0.0, type=float, help="SGD weight decay (DINO, DINOv2: 0).")
    # Data
    p.add_argument("--data", default="synthetic",
                   help="""ImageFolder-style folder with train/ and val/ (or test/) sub-folders of class folders, or
                   'synthetic' / 'synthetic:N' for the embedded shapes dataset (N images per split), or 'cifar10:ROOT' for
                   torchvision's CIFAR-10 files under ROOT (train: its 50,000 training images; val: its 10,000 test
                   images; downloaded there on first use).""")
    p.add_argument("--resize_size", default=256, type=int,
                   help="""Evaluation: shorter side after the bicubic resize (Appendix A and DINO: 256).
                   For the 64 px synthetic images: 36.""")
    p.add_argument("--crop_size", default=224, type=int,
                   help="""Side of the train-time RandomResizedCrop and of the evaluation centre crop (Appendix A and
                   DINO: 224); a multiple of the patch size. Synthetic: 32.""")
    p.add_argument("--on_bad_image", default="skip", choices=["skip", "stop"],
                   help="An unreadable or truncated image is skipped and counted, or stops the run.")
    # Run
    p.add_argument("--num_workers", default=8, type=int, help="Data-loading processes per GPU.")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction,
                   help="""bf16 autocast for the backbone where the device computes bf16 natively (vit.bf16_native:
                   a GPU of compute capability 8.0 or later, a CPU with AMX or AVX512-BF16), float32 elsewhere; the
                   classifiers train in float32 (docs/precision.md).""")
    p.add_argument("--output_json", default=None,
                   help="""Where the result is written as JSON. Default:
                   <output_dir or the checkpoint's folder>/<checkpoint name>_linear.json.""")
    p.add_argument("--output_dir", default=None, help="Folder for the default JSON file (default: the checkpoint's folder).")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- features and classifiers

class LinearHeads(nn.Module):
    """One linear classifier per learning rate, all on the same features (DINOv2 trains its lr grid at once)."""

    def __init__(self, in_dim, num_classes, num_heads):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_classes) for _ in range(num_heads))
        for head in self.heads:                                                    # DINO's LinearClassifier init
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, f):                                                          # (B, F)
        return torch.stack([head(f) for head in self.heads])                       # (L, B, C) logits of each head


def train_heads(heads, loader, feature_fn, lrs, epochs, device, momentum=0.9, weight_decay=0.0, rank=0,
                show_every=100):
    """SGD with a cosine schedule from lrs[i] to 0 for head i (DINO steps it per epoch, here per iteration: the
    same curve, smoother); heads may be wrapped in DDP.

    feature_fn maps a batch of the loader's inputs to (B, F) features, under no_grad: the backbone is frozen.
    The progress bar shows the epoch's mean loss per head so far, every show_every iterations and at the end of
    the epoch: the running sum stays on the device in between (reading it is a GPU sync).
    """
    module = heads.module if hasattr(heads, "module") else heads
    optimizer = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(module.heads, lrs)],
                                momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(loader)
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"linear epoch {epoch}", disable=rank != 0, dynamic_ncols=True)
        running = torch.zeros((), device=device)                                   # sum of this epoch's losses
        for i, (x, y) in enumerate(bar):
            scale = 0.5 * (1 + math.cos(math.pi * (epoch * len(loader) + i) / total))    # cosine, 1 -> 0
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr * scale
            with torch.no_grad():
                f = feature_fn(x.to(device, non_blocking=True))                     # (B, F) frozen features
            y = torch.as_tensor(y).to(device, non_blocking=True)                   # (B,)
            logits = heads(f)                                                      # (L, B, C)
            n = (y != UNREADABLE).sum().clamp_min(1)                                # unreadable images: no loss
            loss = sum(F.cross_entropy(out, y, ignore_index=UNREADABLE, reduction="sum") for out in logits) / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()                                                        # DDP averages over processes
            optimizer.step()
            running += loss.detach()
            if rank == 0 and ((i + 1) % show_every == 0 or i + 1 == len(loader)):
                bar.set_postfix(loss=f"{running.item() / ((i + 1) * len(lrs)):.3f}")   # mean per head and batch
    return heads


@torch.no_grad()
def evaluate_heads(heads, loader, feature_fn, device, world_size=1):
    """(L, 2) top-1 / top-5 accuracy in % of each head on the loader's samples, summed over processes.

    Top-5 counts the min(5, C) highest logits, so with fewer than 5 classes it is 100.
    """
    num_heads = len(heads.module.heads if hasattr(heads, "module") else heads.heads)
    hits = torch.zeros(num_heads, 2, dtype=torch.long, device=device)
    n = torch.zeros((), dtype=torch.long, device=device)
    for x, y in loader:
        logits = heads(feature_fn(x.to(device, non_blocking=True)))                 # (L, B, C)
        y = torch.as_tensor(y).to(device, non_blocking=True)                       # (B,) pinned: no sync
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[None, :, None]   # (L, B, 5)
        batch_hits = torch.stack([top[..., 0].sum(1), top.any(-1).sum(1)], dim=1)  # (L, 2)
        hits += batch_hits                                                         # UNREADABLE is never a hit
        n += (y != UNREADABLE).sum()
    if world_size > 1:
        dist.all_reduce(hits)
        dist.all_reduce(n)
    return 100.0 * hits.double().cpu() / n.item()


def train_transform(crop_size):
    """DINO's eval_linear training views: RandomResizedCrop (bicubic) and flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ----------------------------------------------------------------------------- main

def check_args(args):
    if args.checkpoint is None:
        fail("pass --checkpoint PATH (a training checkpoint or a released backbone)")
    check_init_layerscale(args)
    if not args.lrs or min(args.lrs) <= 0:
        fail(f"--lrs {' '.join(map(str, args.lrs))}: every learning rate must be positive")
    for name in ("epochs", "batch_size_per_gpu", "resize_size", "crop_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name} {getattr(args, name)} must be positive")
    if args.crop_size > args.resize_size:
        fail(f"--crop_size {args.crop_size} is larger than --resize_size {args.resize_size}: the centre crop would pad "
             f"the image; use e.g. --resize_size {math.ceil(args.crop_size * 256 / 224)}")


def probe(backbone, args, train_set, val_set, seed, rank, world_size, device):
    """Train one classifier per lr on the frozen backbone; -> (L, 2) val top-1 / top-5 of each."""
    backbone = backbone.to(device).eval().requires_grad_(False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and vit.bf16_native(device))

    def feature_fn(x):                                                             # (B, 3, S, S) -> (B, F)
        with autocast:
            return linear_features(backbone, x, args.n_last_blocks, args.avgpool_patchtokens)

    torch.manual_seed(seed)
    in_dim = backbone.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
    heads = LinearHeads(in_dim, len(train_set.classes), len(args.lrs)).to(device)
    if world_size > 1:
        heads = nn.parallel.DistributedDataParallel(heads)                          # replicas, gradients all-reduced
    sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed)
    cuda = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size_per_gpu, sampler=sampler,
                                               num_workers=args.num_workers, pin_memory=cuda)
    val_share = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))   # no duplicates
    val_loader = torch.utils.data.DataLoader(val_share, batch_size=args.batch_size_per_gpu,
                                             num_workers=args.num_workers, pin_memory=cuda)
    lrs = [lr * args.batch_size_per_gpu * world_size / 256 for lr in args.lrs]    # linear scaling rule
    train_heads(heads, train_loader, feature_fn, lrs, args.epochs, device, args.momentum, args.weight_decay, rank)
    return evaluate_heads(heads, val_loader, feature_fn, device, world_size)


def summary(accs, args, world_size):
    """Best head by val top-1, and every head's numbers."""
    best = int(accs[:, 0].argmax())
    scale = args.batch_size_per_gpu * world_size / 256
    return {"top1": accs[best, 0].item(), "top5": accs[best, 1].item(), "best_lr": args.lrs[best],
            "per_lr": [{"lr": lr, "lr_scaled": lr * scale, "top1": a[0].item(), "top5": a[1].item()}
                       for lr, a in zip(args.lrs, accs)]}


def main(args):
    rank, world_size, device = init_distributed()
    check_args(args)
    path = check_writable(default_json(args, "linear"))                          # before any work
    ckpt = vit.read_checkpoint(args.checkpoint)
    model, ckpt_args = load_backbone(ckpt, args.checkpoint_key, args.interpolate_offset, args.interpolate_antialias)
    iteration = checkpoint_iteration(ckpt)
    del ckpt                                                      # the student and the optimizer state: not needed
    check_crop(args, model)
    check_init_layerscale(args, model)
    small = model.embed_dim <= vit.ARCHS["vit_small"][0]
    if args.n_last_blocks is None:
        args.n_last_blocks = 4 if small else 1                                     # DINO's per-size defaults
    if args.avgpool_patchtokens is None:
        args.avgpool_patchtokens = not small
    if not 1 <= args.n_last_blocks <= len(model.blocks):
        fail(f"--n_last_blocks {args.n_last_blocks} must be between 1 and the backbone's {len(model.blocks)} blocks")
    train_set, val_set = build_splits(args, train_transform(args.crop_size),
                                      eval_transform(args.resize_size, args.crop_size))
    seed, ls, source = init_settings(args, ckpt_args)
    init_name, init_fields = init_floor(model, seed, ls, source)
    nets = [("checkpoint", f"{arch_name(model)} {args.checkpoint_key}, {args.checkpoint}", model)]
    if args.compare_init:
        nets.append(("init", init_name, random_twin(model, seed, ls)))

    result = {"checkpoint": args.checkpoint, "iteration": iteration, "checkpoint_key": args.checkpoint_key,
              "backbone": arch_name(model),
              "data": args.data, "num_train": len(train_set), "num_val": len(val_set),
              "num_classes": len(train_set.classes), "resize_size": args.resize_size, "crop_size": args.crop_size,
              "n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens,
              "epochs": args.epochs, "batch_size": args.batch_size_per_gpu * world_size, "seed": seed}
    features = f"last {args.n_last_blocks} CLS{' + avgpool' if args.avgpool_patchtokens else ''}"
    for label, name, net in nets:
        res = summary(probe(net, args, train_set, val_set, seed, rank, world_size, device), args, world_size)
        if rank == 0:
            print(f"linear ({name}): top-1 {res['top1']:.2f} top-5 {res['top5']:.2f} "
                  f"(best of {len(args.lrs)} lrs: {res['best_lr']:g} per 256 images; {features}, {args.epochs} epochs)")
        if label == "checkpoint":
            result.update(res)
        else:
            result[label] = {**init_fields, **res}
    skipped = skipped_files([train_set, val_set], world_size)
    result.update(num_train=len(train_set) - skipped_files([train_set], world_size)["skipped_images"],
                  num_val=len(val_set) - skipped_files([val_set], world_size)["skipped_images"], **skipped)   # scored
    if rank == 0:
        if skipped_note(skipped):
            print(skipped_note(skipped))
        write_json(result, path)
        print(f"written to {path}")
    if world_size > 1:
        dist.destroy_process_group()


def cli(argv=None):
    try:
        main(get_args(argv))
    except (DataError, vit.CheckpointError) as e:
        fail(e)


if __name__ == "__main__":
    cli()
