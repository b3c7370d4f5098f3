"""DINO: self-distillation with no labels (Caron et al., ICCV 2021), the baseline of SimDINO's Figure 1 (a).

A student and an EMA teacher are kept in agreement across views of an image. Each network
ends in a head that maps a feature to K = 65536 prototype scores; the teacher's scores are
centred and sharpened into a target distribution, and the student's softmax is trained to
match it by cross-entropy:

    loss = mean over (student view i, teacher view j != i) pairs of H(pt_j, ps_i) = -sum_k pt_j[k] log ps_i[k]
    ps_i = softmax(zs_i / tau_s)                 student, all M views, temperature tau_s = 0.1
    pt_j = softmax((zt_j - center) / tau_t)      teacher, the 2 global views, no gradient, tau_t 0.04 -> 0.07
    center <- m center + (1 - m) mean over the global batch of zt          (m = 0.9, after every step)

Centering alone would drive the teacher to the uniform distribution, sharpening alone to a
single prototype; together they keep it away from both collapses. SimDINO (`simdino.py`,
Figure 1 (b)) removes the prototype layer, the softmax, the centre and the temperatures and
puts a squared distance and a coding-rate term in their place: `diff -u dino.py simdino.py`
shows exactly that change; everything else is shared.

`dino_loss` below is that objective; `train` is the rest of the released recipe (main_dino.py,
with the settings of the SimDINO paper's Table 4): multi-crop views, EMA teacher, schedules,
prototype layer frozen in the first epoch, DDP / FSDP2, bf16, checkpoints.

    python dino.py                                         # embedded synthetic dataset, CPU or one GPU
    torchrun --nproc_per_node=8 dino.py --data /path/to/imagenet --output_dir out/dino
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
    p = argparse.ArgumentParser("DINO", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--arch", default="vit_small", choices=list(vit.ARCHS),
                   help="Backbone size. The paper trains vit_base and vit_large on ImageNet-1k; vit_tiny is for CPU smoke runs.")
    p.add_argument("--patch_size", default=16, type=int,
                   help="Patch size in pixels (Table 4: 16). Crop sizes must be multiples of it.")
    p.add_argument("--drop_path_rate", default=0.1, type=float,
                   help="Stochastic depth of the student, rising linearly over the blocks (Table 4, v1 family: 0.1).")
    p.add_argument("--num_register_tokens", default=0, type=int,
                   help="Register tokens (Darcet et al. 2024). The DINO recipe uses none; DINOv2's later recipes use 4.")
    p.add_argument("--proj_hidden_dim", default=2048, type=int, help="Hidden width of the 3-layer projector MLP (released: 2048).")
    p.add_argument("--proj_dim", default=256, type=int,
                   help="Bottleneck dimension: the MLP's output, L2-normalised before the prototype layer (released: 256).")
    p.add_argument("--out_dim", default=65536, type=int,
                   help="Number K of prototypes, the size of the softmax (released and Table 4: 65536).")
    p.add_argument("--norm_last_layer", default=True, action=argparse.BooleanOptionalAction,
                   help="""Fix the norm of every prototype at 1 (weight norm with g = 1, not trained), so the scores
                   are cosines (released default). --no-norm_last_layer trains g; DINO's authors do so for vit_small:
                   'better performance but can make the training unstable'.""")
    # Loss: centering and sharpening
    p.add_argument("--student_temp", default=0.1, type=float, help="Student softmax temperature tau_s (released: 0.1).")
    p.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                   help="Teacher softmax temperature tau_t in the first epoch (released: 0.04).")
    p.add_argument("--teacher_temp", default=0.07, type=float,
                   help="""Teacher temperature after the warm-up (DINO's ViT-S/16 recipe and Table 4: 0.07; main_dino.py's
                   own default is 0.04, and it warns that values above 0.07 are unstable).""")
    p.add_argument("--warmup_teacher_temp_epochs", default=30, type=int,
                   help="""Epochs of linear teacher-temperature warm-up, one value per epoch (DINO's ViT-S/16 recipe and
                   Table 4: 30; main_dino.py's own default is 0, with a help string that says 30).""")
    p.add_argument("--center_momentum", default=0.9, type=float,
                   help="Momentum m of the centre's EMA over the teacher's mean scores, updated every step (released: 0.9).")
    p.add_argument("--freeze_last_layer", default=1, type=int,
                   help="Epochs at the start in which the prototype layer is not updated; it stabilises DINO (released: 1).")
    # Teacher and optimisation
    p.add_argument("--momentum_teacher", default=0.996, type=float,
                   help="Teacher EMA momentum at the start; it follows a cosine schedule to 1 (Table 4: 0.996).")
    p.add_argument("--lr", default=0.0005, type=float,
                   help="""Peak learning rate per 256 images, scaled linearly with the global batch (released
                   DINO script: 0.0005, i.e. 0.001 at 512; Table 4 prints 0.002).""")
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
                   help="Local crops per image, seen by the student only (Table 4: 10; main_dino.py: 8).")
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
    p.add_argument("--output_dir", default="out/dino", help="Where checkpoints and log.jsonl are written.")
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
                   help="bf16 autocast on CUDA (the prototype layer, the loss and the centre stay float32). Ignored on CPU.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model

class WeightNormLinear(nn.Module):
    """y = x W^T, W = g * V / ||V|| row by row (weight normalisation, Salimans & Kingma 2016), no bias.

    DINO's prototype layer: row k of W is prototype k. `weight_v` (K, d) holds the directions and
    `weight_g` (K, 1) the norms, under the names of DINO's released checkpoints. With
    train_norm=False (DINO's norm_last_layer) g stays 1 and gets no gradient: unit prototypes.
    """

    def __init__(self, in_dim, out_dim, train_norm=False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        bound = 1 / math.sqrt(in_dim)     # nn.Linear's default init, which DINO's prototype layer keeps (no trunc_normal)
        nn.init.uniform_(self.weight_v, -bound, bound)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_norm)  # g = 1 at the start either way

    @property
    def weight(self):                                               # (K, d), row k has norm g_k
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x):                                           # (..., d)
        return F.linear(x, self.weight)                             # (..., K)


class DINOHead(nn.Module):
    """The released DINO head: 3-layer MLP, L2-normalise, weight-normalised linear layer to K prototype scores."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256, num_prototypes=65536, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(out_dim, num_prototypes, train_norm=not norm_last_layer)

    def forward(self, x):                                           # (..., D)
        x = F.normalize(self.mlp(x).float(), dim=-1)                # (..., d), unit norm
        with torch.autocast(x.device.type, enabled=False):          # float32: bf16 would round a score near 1 by up
            return self.last_layer(x)                               # to 0.004, i.e. 0.1 after / tau_t. (B, K)


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
    backbone.mask_token.requires_grad_(False)  # DINO never masks; DDP wants every trained parameter used
    student = Network(backbone, DINOHead(backbone.embed_dim, args.proj_hidden_dim, args.proj_dim, args.out_dim,
                                         args.norm_last_layer))
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False).eval()      # eval: no stochastic depth, the teacher's forward is deterministic
    return student, teacher


# ----------------------------------------------------------------------------- loss: centering, sharpening

def dino_loss(zsg, zsl, ztg, center, student_temp, teacher_temp):
    """DINO's cross-entropy between the centred, sharpened teacher and the student. Returns (loss, pt).

    zsg (M_glo, B, K), zsl (M_loc, B, K): student prototype scores of the global / local views;
    ztg (M_glo, B, K): teacher scores of the global views; center (1, K). pt (M_glo, B, K), the
    teacher's targets, comes back for the collapse diagnostic (`teacher_entropy`).
    """
    zsg, zsl, ztg = (z.to(torch.promote_types(z.dtype, torch.float32)) for z in (zsg, zsl, ztg))  # >= float32
    M_glo, B, K = zsg.shape
    with torch.autocast(zsg.device.type, enabled=False):                             # no bf16 einsum
        zs = torch.cat([zsg, zsl])                                                   # (M, B, K) all student views
        ps = F.log_softmax(zs / student_temp, dim=-1)                                # (M, B, K) log student probabilities
        pt = F.softmax((ztg - center.to(ztg.dtype)) / teacher_temp, dim=-1).detach()  # (M_glo, B, K) centre, sharpen
        ce = -torch.einsum("ibk,jbk->ijb", ps, pt)                                   # (M, M_glo, B) H(pt_j, ps_i)
        pairs = torch.ones(len(zs), M_glo, 1, device=zs.device)                       # (M, M_glo, 1) pairs that count
        pairs[:M_glo].diagonal().zero_()                                             # no (i, i) pairs: M*M_glo - M_glo
        loss = (pairs * ce).sum() / (pairs.sum() * B)                                # mean over kept pairs and samples
    return loss, pt


@torch.no_grad()
def update_center(center, ztg, momentum):
    """center <- m center + (1 - m) mean teacher score over the global batch, in place; returns center.

    ztg (M_glo, B, K): this process's teacher scores. The sum is all-reduced, so every process
    holds the centre that one process would compute on the whole batch.
    """
    batch_center = ztg.float().sum(dim=(0, 1)).unsqueeze(0)                         # (1, K)
    count = ztg.shape[0] * ztg.shape[1]
    if dist.is_initialized():
        dist.all_reduce(batch_center)
        count *= dist.get_world_size()
    return center.mul_(momentum).add_(batch_center / count, alpha=1 - momentum)


@torch.no_grad()
def teacher_entropy(pt):
    """Mean entropy of the teacher's targets pt (..., K), in nats: 0 when one-hot, log K when uniform.

    DINO's collapse diagnostic (its Figure 7): loss - entropy is the mean KL(pt || ps), which falls
    to 0 under either collapse; the entropy tells which one (0: one prototype, log K: uniform).
    """
    return torch.special.entr(pt.float()).sum(-1).mean()


def teacher_temp_schedule(warmup_temp, final_temp, warmup_epochs, epochs):
    """Per-epoch teacher temperatures: linear from warmup_temp to final_temp over warmup_epochs, then constant."""
    warmup = np.linspace(warmup_temp, final_temp, warmup_epochs)
    return np.concatenate([warmup, np.full(max(epochs - warmup_epochs, 0), final_temp)]).tolist()


def cancel_last_layer_gradients(model):
    """DINO's last-layer freezing: drop the prototype layer's gradients, so the optimiser skips it."""
    for p in model.head.last_layer.parameters():
        p.grad = None


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
    for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
        if not getattr(args, name) > 0:
            fail(f"--{name} {getattr(args, name)} must be positive (the scores are divided by it)")
    if args.out_dim < 1:
        fail(f"--out_dim {args.out_dim} must be a positive number of prototypes (released: 65536)")
    if not 0 <= args.center_momentum <= 1:
        fail(f"--center_momentum {args.center_momentum} must lie in [0, 1] (released: 0.9)")


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
    center = torch.zeros(1, args.out_dim, device=device)                                # (1, K) EMA of teacher scores

    # ---- per-iteration schedules, as in the released recipe
    lr_schedule = cosine_schedule(args.lr * global_batch / 256, args.min_lr, args.epochs, iters_per_epoch,
                                  args.warmup_epochs)                                   # linear scaling rule
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
    teacher_temps = teacher_temp_schedule(args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs,
                                          args.epochs)                                  # per epoch, as released

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start_epoch = 0
    if args.resume:
        ckpt = load_training_state(ckpt_path if args.resume == "auto" else args.resume, student, teacher,
                                   optimizer)
        center.copy_(ckpt["center"])
        start_epoch = ckpt["epoch"]
        del ckpt
    if rank == 0:
        print(f"DINO {args.arch}/{args.patch_size}: {len(dataset)} images, {world_size} process(es), global batch "
              f"{global_batch}, {iters_per_epoch} it/epoch, {args.out_dim} prototypes, from epoch {start_epoch}")
    log = open(os.path.join(args.output_dir, "log.jsonl"), "a") if rank == 0 else None

    for epoch in range(start_epoch, args.epochs):
        seed_all(args.seed + 1 + epoch * world_size + rank)   # same stream when resumed at this epoch
        sampler.set_epoch(epoch)
        bad = torch.zeros((), device=device)                    # non-finite losses so far, checked without a sync per step
        t0, done = time.time(), 0
        teacher_temp = teacher_temps[epoch]
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            it = epoch * iters_per_epoch + i
            for g in optimizer.param_groups:
                g["lr"], g["weight_decay"] = lr_schedule[it] * g["lr_mult"], wd_schedule[it] * g["wd_mult"]

            xg = batch["xg"].to(device, non_blocking=True)                  # (M_glo, B, 3, G, G) global views
            xl = batch["xl"].to(device, non_blocking=True)                  # (M_loc, B, 3, L, L) local views
            xg, xl = transform.on_device(xg, xl)                            # uint8 -> float views: --photometric, normalised
            with autocast:
                zsg, zsl = model(xg, xl)                                    # (M_glo, B, K), (M_loc, B, K) student scores
                with torch.no_grad():
                    ztg = teacher(xg)                                       # (M_glo, B, K) teacher, global views only
                loss, pt = dino_loss(zsg, zsl, ztg, center, args.student_temp, teacher_temp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                clip_gradients(student, args.clip_grad)
            if epoch < args.freeze_last_layer:                              # prototypes fixed in the first epoch(s)
                cancel_last_layer_gradients(student)
            optimizer.step()
            with torch.no_grad():                                           # teacher <- EMA of the student
                momentum = momentum_schedule[it]
                torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)
            update_center(center, ztg, args.center_momentum)                # centre <- EMA of the global mean score
            bad += ~torch.isfinite(loss)
            done += 1

            if (i + 1) % args.log_every == 0 or i + 1 == iters_per_epoch:
                stats = torch.stack([loss.detach().float(), teacher_entropy(pt), bad.float()])
                if world_size > 1:
                    dist.all_reduce(stats)
                    stats[:2] /= world_size
                loss_v, H_v, bad_v = stats.tolist()
                if bad_v > 0:
                    fail(f"loss is not finite at iteration {it} (epoch {epoch}): stopping. The last good checkpoint "
                         f"is {ckpt_path}; resume it with --resume and a lower --lr or --teacher_temp")
                ips = done * global_batch / (time.time() - t0)
                record = {"iteration": it, "epoch": epoch, "time": time.time(), "loss": loss_v, "teacher_entropy": H_v, "kl": loss_v - H_v,
                          "lr": lr_schedule[it], "wd": wd_schedule[it], "momentum": momentum, "teacher_temp": teacher_temp,
                          "images_per_s": ips, "skipped_images": getattr(dataset, "num_skipped", 0)}
                if rank == 0:
                    bar.set_postfix(loss=f"{loss_v:.4f}", H_t=f"{H_v:.2f}", kl=f"{loss_v - H_v:.4f}",
                                    lr=f"{lr_schedule[it]:.2e}", img_s=f"{ips:.0f}")
                    log.write(json.dumps(record) + "\n")
                    log.flush()

        # ---- checkpoint (every process takes part in gathering the full state dicts)
        state = {"student": get_model_state_dict(student, options=full),
                 "teacher": get_model_state_dict(teacher, options=full),
                 "optimizer": get_optimizer_state_dict(student, optimizer, options=full), "center": center.cpu(),
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
