"""SimDINO: DINO simplified by coding-rate regularization (Wu et al., ICML 2025, Algorithm 1).

DINO (Caron et al. 2021) keeps a student and an EMA teacher in agreement across views of
an image, and needs a 65536-way prototype head, centering, sharpening and temperature
schedules to keep the features from collapsing. SimDINO drops all of that: the student's
L2-normalised projector output is pulled towards the teacher's by a squared distance,
and collapse is prevented explicitly by rewarding the coding rate of the features:

    loss = mean over (student view, teacher view) pairs of d(zs, zt)  -  gamma * R_eps(Z)      (eq. 8)
    d(x, y) = 1/2 ||x - y||^2                                                                    (eq. 6)
    R_eps(Z) = 1/2 logdet(I + d/eps^2 * Z^T Z / n),  Z: n features of dimension d                (eq. 7)

`simdino_loss` below is that objective, line for line with Algorithm 1; `train` is the
rest of the recipe: multi-crop views, EMA teacher, schedules, DDP / FSDP2, bf16, checkpoints.
Defaults reproduce the authors' released recipe; where it differs from the paper's
pseudocode, a flag selects the paper's variant (see --help and the README).

    python simdino.py                                      # embedded synthetic dataset, CPU or one GPU
    torchrun --nproc_per_node=8 simdino.py --data /path/to/imagenet --output_dir out/simdino
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

import vit
from data import DataError, MultiCropAugmentation, build_dataset, collate_multicrop


def get_args(argv=None):
    p = argparse.ArgumentParser("SimDINO", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--arch", default="vit_small", choices=list(vit.ARCHS),
                   help="Backbone size. The paper trains vit_base and vit_large on ImageNet-1k; vit_tiny is for CPU smoke runs.")
    p.add_argument("--patch_size", default=16, type=int,
                   help="Patch size in pixels (Table 4: 16). Crop sizes must be multiples of it.")
    p.add_argument("--drop_path_rate", default=0.1, type=float,
                   help="Stochastic depth of the student, rising linearly over the blocks (Table 4, v1 family: 0.1).")
    p.add_argument("--num_register_tokens", default=0, type=int,
                   help="Register tokens (Darcet et al. 2024). The SimDINO recipe uses none; SimDINOv2 uses 4.")
    p.add_argument("--proj_hidden_dim", default=2048, type=int, help="Hidden width of the 3-layer projector MLP (released: 2048).")
    p.add_argument("--proj_dim", default=256, type=int,
                   help="Output dimension d of the projector, the space where the loss lives (released: 256).")
    # Loss (eq. 8)
    p.add_argument("--eps", default=math.sqrt(0.4), type=float,
                   help="""The paper's epsilon of eq. 7: R_eps = 1/2 logdet(I + d/eps^2 S). Default sqrt(0.4) = 0.632:
                   the released runs pass eps=0.05 to a code that divides by the world size (8 GPUs), i.e.
                   eps^2 = 8 * 0.05 = 0.4 on per-GPU groups of 64 samples (see --cov_group_size).""")
    p.add_argument("--cov_group_size", default=64, type=int,
                   help="""Samples per coding-rate estimate n. The batch of each view is split into groups of n
                   consecutive samples, R_eps is taken on each and averaged. The released code uses the per-GPU
                   batch (64), so its loss depends on the GPU count; here n is fixed, so 1 or 8 processes at the
                   same global batch optimise the same objective. Must divide --batch_size_per_gpu.""")
    p.add_argument("--gamma", default="released",
                   help="""Weight of the coding-rate term. 'released': the authors' heuristic (d + B)/(d B), with d
                   --proj_dim and B the global batch (0.0059 at d=256, B=512). A number sets it directly
                   (the paper's Remark C.3 derives gamma up to a tuned constant).""")
    p.add_argument("--coding_rate_on", default="mean", choices=["mean", "student"],
                   help="""Features the coding rate is taken on, per global view. 'mean': (zsg + ztg)/2, the
                   released default (expa_type=1, smoother covariance). 'student': zsg, as in Algorithm 1.""")
    p.add_argument("--same_view_pairs", default="skip", choices=["skip", "keep"],
                   help="""'skip': leave out the pairs where student and teacher see the same global view
                   (released code, as in DINO): M*M_glo - M_glo pairs. 'keep': all M*M_glo pairs (Algorithm 1).""")
    p.add_argument("--distance", default="half_sq", choices=["half_sq", "sq"],
                   help="""'half_sq': d(x,y) = 1/2||x-y||^2 = 1 - cos(x,y) of eq. 6; the released code's -cos up to a
                   constant. 'sq': ||x-y||^2 as written in Algorithm 1 (twice the gradient).""")
    # Teacher and optimisation
    p.add_argument("--momentum_teacher", default=0.996, type=float,
                   help="Teacher EMA momentum at the start; it follows a cosine schedule to 1 (Table 4: 0.996).")
    p.add_argument("--lr", default=0.0005, type=float,
                   help="""Peak learning rate per 256 images, scaled linearly with the global batch (released
                   SimDINO script: 0.0005, i.e. 0.001 at 512; Table 4 prints 0.002).""")
    p.add_argument("--min_lr", default=1e-6, type=float, help="Learning rate at the end of the cosine schedule.")
    p.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear learning-rate warm-up from 0 (Table 4: 10).")
    p.add_argument("--weight_decay", default=0.04, type=float, help="AdamW weight decay at the start (Table 4: 0.04).")
    p.add_argument("--weight_decay_end", default=0.4, type=float,
                   help="Weight decay at the end; cosine schedule in between (Table 4: 0.4). Biases and norms get none.")
    p.add_argument("--clip_grad", default=3.0, type=float,
                   help="Clip each parameter's gradient to this norm, as DINO does (released: 3.0). 0 disables.")
    p.add_argument("--batch_size_per_gpu", default=64, type=int,
                   help="Images per process and step; the global batch is this times the number of processes (Table 4: 64 x 8).")
    p.add_argument("--epochs", default=100, type=int, help="Training epochs (Table 4: 100).")
    # Multi-crop
    p.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                   help="Area range of the 2 global crops, relative to the image (DINO: 0.4 1).")
    p.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                   help="Area range of the local crops (DINO: 0.05 0.4).")
    p.add_argument("--local_crops_number", default=10, type=int,
                   help="Local crops per image, seen by the student only (Table 4: 10).")
    p.add_argument("--global_crops_size", default=224, type=int, help="Side of the global crops in pixels (224).")
    p.add_argument("--local_crops_size", default=96, type=int, help="Side of the local crops in pixels (96).")
    p.add_argument("--photometric", default="auto", choices=["auto", "device", "pil"],
                   help="""Where colour jitter, grayscale, blur and solarisation run. 'device': batched in the training
                   process after the copy (data.photometric_augment), the loader workers only decode, crop and flip:
                   same distribution of views, about 2.5x the images/s per loader core (bench.py --loader). 'pil':
                   DINO's exact PIL pipeline in the workers. 'auto': 'device' on CUDA, 'pil' on CPU (where the
                   float operations would slow the step). Both send uint8 crops and normalise on the device.""")
    # Data and run
    p.add_argument("--data", default="synthetic",
                   help="""ImageFolder-style folder (one sub-folder per class; a 'train' sub-folder is used if
                   present), or 'synthetic' for the embedded shapes dataset (no files needed; 'synthetic:N' for N images).""")
    p.add_argument("--on_bad_image", default="skip", choices=["skip", "stop"],
                   help="An unreadable or truncated image is skipped and counted, or stops the run.")
    p.add_argument("--num_workers", default=8, type=int, help="Data-loading processes per GPU.")
    p.add_argument("--output_dir", default="out/simdino", help="Where checkpoints and log.jsonl are written.")
    p.add_argument("--saveckp_freq", default=10, type=int,
                   help="Also keep checkpoint<epoch>.pth every this many epochs (checkpoint.pth is rewritten every epoch).")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="Continue a run: from <output_dir>/checkpoint.pth, or from the checkpoint given.")
    p.add_argument("--seed", default=0, type=int, help="Seed of weights, augmentations and data order.")
    p.add_argument("--log_every", default=10, type=int, help="Iterations between log lines (each costs one GPU sync).")
    p.add_argument("--fsdp", action="store_true", help="Shard student and teacher with FSDP2 (fully_shard) instead of DDP.")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block.")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="Recompute the student's block activations in backward: far less memory, about 1/3 more compute.")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction,
                   help="bf16 autocast on CUDA (the loss and the coding rate stay float32/float64). Ignored on CPU.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model

class Projector(nn.Module):
    """The released SimDINO head: 3-layer MLP, then L2-normalise. No prototypes, no softmax."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):                        # (..., D)
        return F.normalize(self.mlp(x), dim=-1)  # (..., d), unit norm


class Network(nn.Module):
    """Backbone + head. One call runs both crop sizes (one backbone pass per size)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, xg, xl=None):               # xg (M_glo, B, 3, G, G), xl (M_loc, B, 3, L, L)
        zg = self.head(self.backbone(xg.flatten(0, 1)).unflatten(0, xg.shape[:2]))   # (M_glo, B, head output)
        if xl is None:
            return zg
        return zg, self.head(self.backbone(xl.flatten(0, 1)).unflatten(0, xl.shape[:2]))  # + (M_loc, B, head output)


def build_networks(args):
    """Student and teacher start identical; the teacher is never trained by gradients."""
    backbone = vit.build_vit(args.arch, patch_size=args.patch_size, drop_path_rate=args.drop_path_rate,
                             img_size=args.global_crops_size, num_register_tokens=args.num_register_tokens)
    backbone.grad_checkpointing = args.grad_checkpointing  # the student recomputes in backward; the teacher (eval) never
    backbone.mask_token.requires_grad_(False)  # SimDINO never masks; DDP wants every trained parameter used
    student = Network(backbone, Projector(backbone.embed_dim, args.proj_hidden_dim, args.proj_dim))
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False).eval()      # eval: no stochastic depth, the teacher's forward is deterministic
    return student, teacher


# ----------------------------------------------------------------------------- loss (eqs. 6-8)

def coding_rate(Z, eps):
    """R_eps(Z) = 1/2 logdet(I + d/eps^2 * Z^T Z / n) of eq. 7, for Z (..., n, d) -> (...).

    Computed in float64 via Cholesky whatever Z's dtype or the autocast state: I + cS is
    positive definite, but with large n and small eps float32 (let alone bf16) loses it and
    returns NaN. The d x d matrices are small, so this costs next to nothing.
    """
    n, d = Z.shape[-2:]
    with torch.autocast(Z.device.type, enabled=False):
        Z64 = Z.double()
        covs = Z64.mT @ Z64 / n                                                     # (..., d, d) S of eq. 7
        L, _ = torch.linalg.cholesky_ex(torch.eye(d, dtype=torch.float64, device=Z.device) + d / eps**2 * covs)
        R = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)                              # logdet(A) = 2 sum log diag L
    return R.to(torch.float64 if Z.dtype == torch.float64 else torch.float32)


def released_gamma(d, global_batch):
    """The released code's weight of the coding rate, (d + B)/(d B): 'a heuristic', per its authors."""
    return (d + global_batch) / (d * global_batch)


def simdino_loss(zsg, zsl, ztg, eps, gamma, cov_group_size, same_view_pairs="skip",
                 coding_rate_on="mean", distance="half_sq"):
    """Eq. 8, as Algorithm 1 computes it. Returns (loss, mean distance, mean R_eps).

    zsg (M_glo, B, d), zsl (M_loc, B, d): student features of the global / local views;
    ztg (M_glo, B, d): teacher features of the global views. All L2-normalised.
    """
    zsg, zsl, ztg = (z.to(torch.promote_types(z.dtype, torch.float32)) for z in (zsg, zsl, ztg))  # >= float32
    M_glo, B, d = zsg.shape
    zs = torch.cat([zsg, zsl])                                                       # (M, B, d) all student views
    sq_dists = (zs.unsqueeze(1) - ztg.unsqueeze(0)).square().sum(-1)                 # (M, M_glo, B) ||zs_i - zt_j||^2
    if distance == "half_sq":
        sq_dists = sq_dists / 2                                                      # eq. 6's d = 1/2 ||.||^2
    pairs = torch.ones(len(zs), M_glo, 1, device=zs.device)                           # (M, M_glo, 1) pairs that count
    if same_view_pairs == "skip":
        pairs[:M_glo].diagonal().zero_()                                             # released code: no (i, i) pairs
    mean_sq_dist = (pairs * sq_dists).sum() / (pairs.sum() * B)                      # mean over kept pairs and samples
    Z = (zsg + ztg) / 2 if coding_rate_on == "mean" else zsg                         # (M_glo, B, d)
    Z = Z.unflatten(1, (B // cov_group_size, cov_group_size))                        # (M_glo, B/n, n, d) groups of n
    R_eps = coding_rate(Z, eps)                                                      # (M_glo, B/n)
    loss = mean_sq_dist - gamma * R_eps.mean()                                       # eq. 8
    return loss, mean_sq_dist.detach(), R_eps.mean().detach()


# ----------------------------------------------------------------------------- recipe

def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Per-iteration values (floats): linear warm-up from warmup_start to base, then cosine from base to final."""
    warmup = np.linspace(warmup_start, base, warmup_epochs * iters_per_epoch)
    t = np.arange(epochs * iters_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warmup, cosine]).tolist()


def param_groups(model):
    """AdamW groups with lr and weight-decay multipliers: biases and norm weights (1-D) get no decay."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]
    return [{"params": decay, "lr_mult": 1.0, "wd_mult": 1.0}, {"params": no_decay, "lr_mult": 1.0, "wd_mult": 0.0}]


@torch.no_grad()
def clip_gradients(model, max_norm):
    """DINO's clipping: each parameter's gradient is scaled to norm <= max_norm on its own."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


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


def distribute(student, teacher, args, world_size):
    """Wrap for multi-process training: DDP (default) or FSDP2. Returns the module to call."""
    if args.compile:
        for blk in [*student.backbone.blocks, *teacher.backbone.blocks]:
            blk.compile()
    if world_size == 1:
        return student
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for net in (student, teacher):            # same sharding, so the EMA is a local op on each shard
            for blk in net.backbone.blocks:
                fully_shard(blk)
        fully_shard(student)
        fully_shard(teacher, reshard_after_forward=True)  # a root keeps its weights gathered unless told: no backward here
        return student
    return nn.parallel.DistributedDataParallel(student)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash while saving never destroys the previous file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_optimizer_state(model, optimizer, state):
    """set_optimizer_state_dict for a checkpoint in which some parameters have no optimiser state yet.

    DINO's last layer has none until its first step (it is frozen in epoch 0). The strict load
    rejects that; strict=False keeps, for such a parameter, the zero state of the dummy step that
    set_optimizer_state_dict takes to initialise an empty optimiser, so its first real AdamW step
    would count as step 2 and the resumed run would drift. Drop that state: step 1 comes next.
    """
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    for name, p in model.named_parameters():
        if p.requires_grad and name not in state["state"]:
            optimizer.state.pop(p, None)


def load_training_state(path, student, teacher, optimizer):
    """Restore student, teacher and optimiser from a checkpoint of this script; return the checkpoint."""
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    own, saved = student.state_dict(), ckpt["student"]
    wrong = [k for k in own if k not in saved or saved[k].shape != own[k].shape] + [k for k in saved if k not in own]
    if wrong:
        fail(f"--resume: {path} holds another model ({wrong[0]} differs): resume with the arguments of the run "
             f"that wrote it (its 'args' entry)")
    set_model_state_dict(student, ckpt["student"], options=StateDictOptions(full_state_dict=True))
    set_model_state_dict(teacher, ckpt["teacher"], options=StateDictOptions(full_state_dict=True))
    load_optimizer_state(student, optimizer, ckpt["optimizer"])   # parameters not stepped yet have no state
    return ckpt


def fail(msg):
    """Stop every process with a one-line message and a non-zero exit code, no traceback."""
    sys.exit(f"error: {msg}")


def check_args(args):
    for name in ("global_crops_size", "local_crops_size"):
        if getattr(args, name) % args.patch_size:
            fail(f"--{name} {getattr(args, name)} is not divisible by --patch_size {args.patch_size}: "
                 f"use a multiple of {args.patch_size}")
    if args.batch_size_per_gpu < args.cov_group_size or args.batch_size_per_gpu % args.cov_group_size:
        fail(f"--batch_size_per_gpu {args.batch_size_per_gpu} must be a multiple of --cov_group_size "
             f"{args.cov_group_size} (the samples per covariance): raise the batch or lower the group size")
    if args.eps <= 0:
        fail(f"--eps {args.eps} must be positive (the coding rate divides by eps^2)")
    if args.gamma != "released":
        try:
            float(args.gamma)
        except ValueError:
            fail(f"--gamma '{args.gamma}' is neither 'released' nor a number")


def train(args):
    rank, world_size, device = init_distributed()
    check_args(args)
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    if args.resume is None and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --output_dir")
    seed_all(args.seed)
    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and args.bf16)

    # ---- data: 2 global + local_crops_number local crops of every image
    transform = MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                      args.global_crops_size, args.local_crops_size, args.photometric)
    dataset = build_dataset(args.data, transform, "train", args.on_bad_image)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=use_cuda, drop_last=True,
                                         collate_fn=collate_multicrop)
    iters_per_epoch = len(loader)
    global_batch = args.batch_size_per_gpu * world_size
    if iters_per_epoch == 0:
        fail(f"{len(dataset)} images are fewer than one global batch of {global_batch}: lower --batch_size_per_gpu")

    # ---- student, teacher, optimiser
    student, teacher = build_networks(args)
    student, teacher = student.to(device), teacher.to(device)
    model = distribute(student, teacher, args, world_size)
    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, fused=use_cuda)
    gamma = released_gamma(args.proj_dim, global_batch) if args.gamma == "released" else float(args.gamma)

    # ---- per-iteration schedules, as in the released recipe
    lr_schedule = cosine_schedule(args.lr * global_batch / 256, args.min_lr, args.epochs, iters_per_epoch,
                                  args.warmup_epochs)                                   # linear scaling rule
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start_epoch = 0
    if args.resume:
        ckpt = load_training_state(ckpt_path if args.resume == "auto" else args.resume, student, teacher,
                                   optimizer)
        start_epoch = ckpt["epoch"]
        del ckpt
    if rank == 0:
        print(f"SimDINO {args.arch}/{args.patch_size}: {len(dataset)} images, {world_size} process(es), global batch "
              f"{global_batch}, {iters_per_epoch} it/epoch, gamma {gamma:.4g}, eps {args.eps:.4g}, from epoch {start_epoch}")
    log = open(os.path.join(args.output_dir, "log.jsonl"), "a") if rank == 0 else None

    for epoch in range(start_epoch, args.epochs):
        seed_all(args.seed + 1 + epoch * world_size + rank)   # same stream when resumed at this epoch
        sampler.set_epoch(epoch)
        bad = torch.zeros((), device=device)                    # non-finite losses so far, checked without a sync per step
        t0, done = time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            it = epoch * iters_per_epoch + i
            for g in optimizer.param_groups:
                g["lr"], g["weight_decay"] = lr_schedule[it] * g["lr_mult"], wd_schedule[it] * g["wd_mult"]

            xg = batch["xg"].to(device, non_blocking=True)                  # (M_glo, B, 3, G, G) global views
            xl = batch["xl"].to(device, non_blocking=True)                  # (M_loc, B, 3, L, L) local views
            xg, xl = transform.on_device(xg, xl)                            # uint8 -> float views: --photometric, normalised
            with autocast:
                zsg, zsl = model(xg, xl)                                    # (M_glo, B, d), (M_loc, B, d) student
                with torch.no_grad():
                    ztg = teacher(xg)                                       # (M_glo, B, d) teacher, global views only
                loss, dist_term, R_mean = simdino_loss(zsg, zsl, ztg, args.eps, gamma, args.cov_group_size,
                                                       args.same_view_pairs, args.coding_rate_on, args.distance)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                clip_gradients(student, args.clip_grad)
            optimizer.step()
            with torch.no_grad():                                           # teacher <- EMA of the student
                momentum = momentum_schedule[it]
                torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)
            bad += ~torch.isfinite(loss)
            done += 1

            if (i + 1) % args.log_every == 0 or i + 1 == iters_per_epoch:
                stats = torch.stack([loss.detach().float(), dist_term, R_mean.float(), bad.float()])
                if world_size > 1:
                    dist.all_reduce(stats)
                    stats[:3] /= world_size
                loss_v, dist_v, R_v, bad_v = stats.tolist()
                if bad_v > 0:
                    fail(f"loss is not finite at iteration {it} (epoch {epoch}): stopping. The last good checkpoint "
                         f"is {ckpt_path}; resume it with --resume and a lower --lr or a larger --eps")
                ips = done * global_batch / (time.time() - t0)
                record = {"iteration": it, "epoch": epoch, "time": time.time(), "loss": loss_v, "distance": dist_v, "R_eps": R_v,
                          "lr": lr_schedule[it], "wd": wd_schedule[it], "momentum": momentum, "images_per_s": ips,
                          "skipped_images": getattr(dataset, "num_skipped", 0)}
                if rank == 0:
                    bar.set_postfix(loss=f"{loss_v:.4f}", dist=f"{dist_v:.4f}", R=f"{R_v:.2f}",
                                    lr=f"{lr_schedule[it]:.2e}", img_s=f"{ips:.0f}")
                    log.write(json.dumps(record) + "\n")
                    log.flush()

        # ---- checkpoint (every process takes part in gathering the full state dicts)
        state = {"student": get_model_state_dict(student, options=full),
                 "teacher": get_model_state_dict(teacher, options=full),
                 "optimizer": get_optimizer_state_dict(student, optimizer, options=full),
                 "epoch": epoch + 1, "iteration": (epoch + 1) * iters_per_epoch, "args": vars(args)}
        if rank == 0:
            save_checkpoint(state, ckpt_path)
            if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch + 1:04d}.pth"))
        del state
    if rank == 0:
        log.close()
        print(f"done: teacher weights in {ckpt_path} (load with vit.vit_from_checkpoint)")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        train(get_args())
    except (DataError, vit.CheckpointError) as e:
        fail(e)
