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

Below, in this order: the model and the loss, the recipe, `train`, then the run machinery (the same in
the four method files: skip it on a first read) and this method's flags.

    # a CPU-sized run on the embedded synthetic dataset: a few minutes on a laptop
    python dino.py --arch vit_tiny --patch_size 8 --global_crops_size 32 --local_crops_size 16 \
        --local_crops_number 4 --data synthetic:2000 --epochs 4 --warmup_epochs 1 --num_workers 2
    # the defaults are the ImageNet recipe (ViT-S/16, 224 px crops, 100 epochs): runs for GPUs
    torchrun --nproc_per_node=8 dino.py --data /path/to/imagenet --output_dir out/dino
"""
import argparse
import copy
import datetime
import errno
import fcntl
import functools
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import vit
from data import DataError, MultiCropAugmentation, build_dataset, collate_multicrop

CPU_FLAGS = ("--arch vit_tiny --patch_size 8 --global_crops_size 32 --local_crops_size 16 --local_crops_number 4 "
             "--data synthetic:2000 --epochs 4 --warmup_epochs 1 --num_workers 2")   # minutes on a laptop CPU
NOT_FINITE_HINT = "a lower --lr or --teacher_temp"   # what to change when the loss is not finite


# ----------------------------------------------------------------------------- model

class WeightNormLinear(nn.Module):
    """y = x W^T, W = g * V / ||V|| row by row (weight normalisation, Salimans & Kingma 2016), no bias.

    DINO's prototype layer: row k of W is prototype k. `weight_v` (K, d) holds the directions and
    `weight_g` (K, 1) the norms, under the names of DINO's released checkpoints. With
    train_norm=False (DINO's norm_last_layer) g stays 1 and gets no gradient: unit prototypes.
    """

    float32_params = True   # its scores are computed in float32: FSDP2 must not gather it in bf16 (distribute)

    def __init__(self, in_dim, out_dim, train_norm=False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        bound = 1 / math.sqrt(in_dim)     # nn.Linear's default init, which DINO's prototypes keep (no trunc_normal)
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
        x = self.mlp(x)                                             # (..., d), bf16 under autocast
        x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)   # unit norm, float32 or better
        with torch.autocast(x.device.type, enabled=False):          # float32: bf16 would round a score near 1 by up
            return self.last_layer(x)                               # to 0.004, i.e. 0.1 after / tau_t. (B, K)


class Network(nn.Module):
    """Backbone + head. One call runs both crop sizes: every block and the head take them together (under
    FSDP2 each is gathered once per step in forward and once in backward)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, xg, xl=None):               # xg (M_glo, B, 3, G, G), xl (M_loc, B, 3, L, L)
        views = [xg] if xl is None else [xg, xl]
        feats = self.backbone.forward_features_list([x.flatten(0, 1) for x in views])  # both crop sizes, one pass
        z = self.head(torch.cat([f["cls"] for f in feats])).split([len(f["cls"]) for f in feats])  # one head call
        z = [zi.unflatten(0, x.shape[:2]) for zi, x in zip(z, views)]               # (M_glo, B, .), (M_loc, B, .)
        return z[0] if xl is None else tuple(z)


def build_networks(args):
    """Student and teacher start identical; the teacher is never trained by gradients."""
    backbone = vit.build_vit(args.arch, patch_size=args.patch_size, drop_path_rate=args.drop_path_rate,
                             img_size=args.global_crops_size, num_register_tokens=args.num_register_tokens,
                             interpolate_offset=args.interpolate_offset,
                             interpolate_antialias=args.interpolate_antialias)
    backbone.grad_checkpointing = args.grad_checkpointing  # the student recomputes in backward; the teacher never
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
        ps = F.log_softmax(zs / student_temp, dim=-1)                                # (M, B, K) log student probs
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
    grads, norms = grad_norms(model)                                                # norms (P,) of full gradients
    torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0)))


def grad_norms(model):
    """(gradients to scale in place, their full norms (P,)): under FSDP2 a gradient is a DTensor of which each
    process holds a shard, and DTensor would all-reduce each norm on its own (one collective per parameter);
    here the local shards' squared norms go through one all-reduce together."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and isinstance(grads[0], DTensor):
        grads = [g.to_local() for g in grads]                                       # dim-0 shards: disjoint parts
        sq = torch.stack(torch._foreach_norm(grads)).square()                        # (P,) this process's part
        dist.all_reduce(sq)
        return grads, sq.sqrt()
    return grads, torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(0)


@torch.no_grad()
def update_teacher(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, every parameter in one fused call (under FSDP2 on
    the local shards: the two networks are sharded alike)."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)


# ----------------------------------------------------------------------------- training

def train(args):
    rank, world_size, device, ckpt_path = start_run(args)          # checks every flag; nothing written yet
    bf16 = use_bf16(args, device, rank)                               # --bf16 where the device computes bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    # ---- data: 2 global + local_crops_number local crops of every image
    transform = MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                      args.global_crops_size, args.local_crops_size, args.photometric,
                                      args.blur_radius)
    dataset = build_dataset(args.data, transform, "train", args.on_bad_image)
    global_batch, iters_per_epoch, total_iters = run_length(args, len(dataset), world_size)

    # ---- student, teacher, optimiser, the centre
    student, teacher = build_networks(args)
    if args.pretrained_weights:
        load_pretrained(args.pretrained_weights, student, teacher)    # backbones only: the heads start fresh
    student, teacher = student.to(device), teacher.to(device)
    model = distribute(student, teacher, args, world_size, bf16)
    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, fused=device.type == "cuda")
    center = torch.zeros(1, args.out_dim, device=device)                                # (1, K) EMA of teacher scores

    # ---- per-iteration schedules, as in the released recipe
    lr_schedule = cosine_schedule(args.lr * global_batch / 256, args.min_lr, args.epochs, iters_per_epoch,
                                  args.warmup_epochs)                                   # linear scaling rule
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, args.final_momentum_teacher, args.epochs,
                                        iters_per_epoch)
    teacher_temps = teacher_temp_schedule(args.warmup_teacher_temp, args.teacher_temp,
                                          args.warmup_teacher_temp_epochs, args.epochs)   # per epoch, as released

    start_it = resume_run(args, ckpt_path, total_iters, student, teacher, optimizer, center=center)   # 0: new run
    loader = run_loader(dataset, collate_multicrop, args, rank, world_size, start_it, total_iters, device)
    if rank == 0:
        print(f"DINO {args.arch}/{args.patch_size}: {len(dataset)} images, {world_size} process(es), global batch "
              f"{global_batch}, {args.out_dim} prototypes, "
              f"{args.epochs} epochs of {iters_per_epoch} iterations, from iteration {start_it}, "
              f"precision {'bf16 autocast' if bf16 else 'float32'}", flush=True)
    progress = Progress(args, rank, world_size, device, start_it, iters_per_epoch, ckpt_path, dataset)

    # ---- the DINO step, one iteration per batch
    for epoch, it, batch in progress.steps(loader):
        for g in optimizer.param_groups:
            g["lr"], g["weight_decay"] = lr_schedule[it] * g["lr_mult"], wd_schedule[it] * g["wd_mult"]
        xg = batch["xg"].to(device, non_blocking=True)                  # (M_glo, B, 3, G, G) global views
        xl = batch["xl"].to(device, non_blocking=True)                  # (M_loc, B, 3, L, L) local views
        xg, xl = transform.on_device(xg, xl)                            # uint8 -> float views, --photometric
        with autocast:
            zsg, zsl = model(xg, xl)                                    # (M_glo, B, K), (M_loc, B, K) student scores
            with torch.no_grad():
                ztg = teacher(xg)                                       # (M_glo, B, K) teacher, global views only
            loss, pt = dino_loss(zsg, zsl, ztg, center, args.student_temp, teacher_temps[epoch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            clip_gradients(student, args.clip_grad)
        if epoch < args.freeze_last_layer:                              # prototypes fixed in the first epoch(s)
            cancel_last_layer_gradients(student)
        optimizer.step()
        update_teacher(teacher, student, momentum_schedule[it])         # teacher <- EMA of the student
        update_center(center, ztg, args.center_momentum)                # centre <- EMA of the global mean score

        H = teacher_entropy(pt)                                         # loss - H: the KL that teaches
        progress.log(it, {"loss": loss, "teacher_entropy": H, "kl": loss.detach() - H},
                     lr=lr_schedule[it], wd=wd_schedule[it], momentum=momentum_schedule[it],
                     teacher_temp=teacher_temps[epoch])
        save_training_state(ckpt_path, args, it, iters_per_epoch, student, teacher, optimizer,
                            center=center)                              # when due
    progress.finish()


# ======================================================================================================================
# The run machinery. From here to get_args everything is the same, to the character, in the four method files
# (tests/test_shared_source.py keeps it so), and can be skipped on a first read. It is what makes a run launchable
# with torchrun (DDP or FSDP2), stoppable at any moment, resumable exactly (batches, views and drop path depend on
# the iteration alone), and trustworthy: atomic checkpoints, a log that reads as one run, one-line errors.
# ======================================================================================================================

def start_run(args):
    """The process group, the argument checks, and the output folder claimed before anything heavy is built (made,
    written to, locked against a second run, cleared of a killed run's partial files): (rank, world size, device,
    path of the run's checkpoint.pth)."""
    rank, world_size, device = init_distributed()
    check_args(args)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    RUN.update(rank=rank, world_size=world_size, path=ckpt_path, done=None, saved=None)
    problem = [claim_output_dir(args, ckpt_path) if rank == 0 else None]      # rank 0 writes the run's files
    if world_size > 1:
        dist.broadcast_object_list(problem)                                # every process stops, or none
    if problem[0]:
        fail(problem[0])
    seed_all(args.seed)
    return rank, world_size, device, ckpt_path


def claim_output_dir(args, ckpt_path):
    """--output_dir made and written to, and locked for this run: flock on run.lock, which the kernel releases when
    the process ends, however it ends, so a killed run's lock never blocks --resume. The partial files of a run
    killed while writing them are removed. Returns what is wrong, or None."""
    folder = args.output_dir
    release_output_dir()                                              # an earlier train() in this process
    made = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, "run.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        return f"cannot write to --output_dir {folder}: {os_problem(e)}; choose a folder this user can write"
    RUN.update(lock=fd, made=folder if made else None)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "it has not written its name yet"
        return (f"--output_dir {folder} is in use by a live run ({holder}): wait for it to end or stop it, or choose "
                f"another --output_dir")
    except OSError as e:                                              # a network filesystem without locks
        print(f"note: the filesystem of {folder} cannot lock files ({e.strerror}): a second run into the folder "
              f"would not be refused", flush=True)
    if args.resume is None and os.path.exists(ckpt_path):
        return f"{ckpt_path} exists: pass --resume to continue that run, or choose another --output_dir"
    probe = os.path.join(folder, f".write-test.{socket.gethostname()}.{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o666))     # a new file, as a checkpoint will be
        os.remove(probe)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, {os.path.basename(__file__)} started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
    except OSError as e:
        return f"cannot write to --output_dir {folder}: {os_problem(e)}; choose a folder this user can write"
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tmp") and name.startswith(("checkpoint", "log.jsonl")):
            size = os.path.getsize(os.path.join(folder, name))
            os.remove(os.path.join(folder, name))
            print(f"note: removed {name} ({size / 1e6:.1f} MB), left by a run stopped while writing it", flush=True)
    return None


def release_output_dir():
    """Unlock --output_dir; a folder this run made and wrote nothing to goes too (a failed start leaves nothing)."""
    fd, made = RUN["lock"], RUN["made"]
    if fd is None:
        return
    if made and os.listdir(made) == ["run.lock"]:
        os.remove(os.path.join(made, "run.lock"))
        os.rmdir(made)
    os.close(fd)
    RUN.update(lock=None, made=None)


def os_problem(e):
    """An OSError in the words of the fix it needs."""
    return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EEXIST: "it is a file, not a folder"}.get(e.errno, e.strerror or type(e).__name__)


def run_length(args, num_images, world_size):
    """(global batch, iterations per epoch, iterations of the run); each pass over the data drops its last partial
    batch."""
    iters_per_pass = num_images // world_size // args.batch_size_per_gpu
    global_batch = args.batch_size_per_gpu * world_size
    if iters_per_pass == 0:
        fail(f"{num_images} images are fewer than one global batch of {global_batch}: lower --batch_size_per_gpu")
    iters_per_epoch = iters_per_pass if args.epoch_length == "auto" else args.epoch_length
    return global_batch, iters_per_epoch, args.epochs * iters_per_epoch


def run_loader(dataset, collate, args, rank, world_size, start_it, total_iters, device):
    """The batches of iterations start_it..total_iters-1: each the same whatever the workers or the resume point."""
    sampler = RunSampler(len(dataset), args.batch_size_per_gpu, rank, world_size, args.seed, start_it, total_iters)
    return torch.utils.data.DataLoader(SeededViews(dataset, args.seed), batch_sampler=sampler,
                                       collate_fn=functools.partial(seeded_collate, collate=collate, seed=args.seed),
                                       num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                       worker_init_fn=worker_init)


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


def use_bf16(args, device, rank):
    """--bf16 where the device computes bf16 natively (vit.bf16_native); elsewhere float32, with a note."""
    if args.bf16 and not vit.bf16_native(device):
        if rank == 0:
            print(f"note: --bf16: this {device.type.upper()} computes bf16 only by emulation (a CPU without AMX or "
                  f"AVX512-BF16, a GPU under compute capability 8.0): training in float32", flush=True)
        return False
    return args.bf16


def distribute(student, teacher, args, world_size, bf16=False):
    """Wrap for multi-process training: DDP (default) or FSDP2. Returns the module to call.

    FSDP2: each block is a unit of its own, gathered once in forward (Network passes both crop sizes through
    a block in one call) and, in the student, once in backward; the root (embeddings, final norm, head)
    stays gathered from the student's forward to the end of its backward. bf16: parameters are gathered and
    used in bf16 and gradients reduced in float32; a module marked `float32_params` (DINO's prototype layer)
    is a unit of its own that stays float32.
    """
    if args.compile:
        for blk in [*student.backbone.blocks, *teacher.backbone.blocks]:
            blk.compile()
    if world_size == 1:
        return student
    if not args.fsdp:   # no batch norm here: the buffers are constants, which DDP would broadcast every forward
        return nn.parallel.DistributedDataParallel(student, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # inputs not cast: the residual stream stays float32 as under DDP's autocast, only the matmuls run in bf16
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for net in (student, teacher):            # same sharding, so the EMA is a local op on each shard
        for m in net.modules():
            if getattr(m, "float32_params", False):
                fully_shard(m, reshard_after_forward=net is teacher)
        for blk in net.backbone.blocks:
            fully_shard(blk, reshard_after_forward=True, mp_policy=policy)
        fully_shard(net, reshard_after_forward=net is teacher, mp_policy=policy)   # the teacher has no backward
    return student


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(*key):
    """A 64-bit seed from a few integers; SeedSequence mixes them, so neighbouring keys give unrelated streams."""
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


class RunSampler(torch.utils.data.Sampler):
    """One process's batches for iterations start..stop-1 of a run; the batch of iteration `it` depends on `it` alone.

    Pass p over the data is DistributedSampler(seed=seed, drop_last=True)'s order of epoch p, cut into
    batches (the last partial one dropped). The passes follow each other whatever --epoch_length is, and a
    run resumed at any iteration, mid-epoch included, reads exactly the batches the uninterrupted run read.
    Items are (image index, pass), for SeededViews.
    """

    def __init__(self, num_images, batch_size, rank, world_size, seed, start, stop):
        self.num_images, self.batch_size, self.rank, self.world_size = num_images, batch_size, rank, world_size
        self.seed, self.start, self.stop = seed, start, stop
        self.iters_per_pass = num_images // world_size // batch_size
        self.order = (None, None)                                     # (pass, this process's indices), cached

    def batch(self, it):
        p, j = divmod(it, self.iters_per_pass)
        if self.order[0] != p:
            perm = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(self.seed + p))
            perm = perm[:self.num_images // self.world_size * self.world_size]
            self.order = (p, perm[self.rank::self.world_size].tolist())
        return [(i, p) for i in self.order[1][j * self.batch_size:(j + 1) * self.batch_size]]

    def __iter__(self):
        return (self.batch(it) for it in range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


class SeededViews(torch.utils.data.Dataset):
    """dataset[i] with torch's RNG seeded by (seed, pass, i): an image's augmentations depend on those alone,
    not on the worker that draws them, the number of workers, or the iteration a run was resumed at."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):                                       # key: (image index, pass) from RunSampler
        with torch.random.fork_rng(devices=[]):                       # the caller's RNG is left as it was
            torch.manual_seed(stream_seed(self.seed, key[1], key[0], 0))
            return key, self.dataset[key[0]]


def seeded_collate(items, collate, seed):
    """collate under a seed of the batch's first key, so what it draws from torch's RNG (block masks) replays too."""
    (i, p), _ = items[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, p, i, 1))
        return collate([sample for _, sample in items])


def worker_init(_):
    """Data-loading workers leave SIGINT and SIGTERM to the main process, which ends them (stop_on_signals), and do
    not hold the output folder's lock."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if RUN["lock"] is not None:                                       # the lock dies with the main process alone
        os.close(RUN["lock"])


# What a stop reports and cleans up: the iteration under way and the iterations done, the run's checkpoint.pth and
# (the last complete checkpoint, the iterations it holds), the lock's file descriptor, the output folder if this run
# made it, the temporary files being written.
RUN = {"rank": 0, "world_size": 1, "iteration": None, "done": None, "path": None, "saved": None, "lock": None,
       "made": None, "partial": set()}
SAVING = threading.Lock()                # a rename and the stop thread's clean-up never interleave


def stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM end the process within a second: workers killed, the temporary file of a save
    under way removed, one line, exit 128 + signal.

    A Python signal handler runs only once the main thread is back in Python, which in the middle of a
    backward pass (one C++ call) can take minutes on a CPU. So the signal number also goes down a pipe
    (signal.set_wakeup_fd) that a thread waits on, and that thread ends the process. Checkpoints are
    written to a temporary file and renamed, so the last complete one is intact whenever it happens.
    Call once, from the main thread, before the data-loading workers start.
    """
    r, w = os.pipe()
    os.set_blocking(w, False)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: None)                             # the thread below does the work
    signal.set_wakeup_fd(w)

    def stop():
        signum = None
        while signum not in (signal.SIGINT, signal.SIGTERM):     # every signal with a Python handler is written
            signum = os.read(r, 1)[0]                            # here, the DataLoader's SIGCHLD too: skip those
        for worker in mp.active_children():
            worker.kill()
        with SAVING:                                             # held until the exit: no rename after this
            for tmp in RUN["partial"]:
                remove_quietly(tmp)
            release_output_dir()
            gone = peers_gone()
            if RUN["rank"] == min(set(range(RUN["world_size"])) - set(gone)):   # rank 0, or the first survivor
                name = signal.Signals(signum).name
                os.write(2, (f"\nstopped: {'rank' if len(gone) == 1 else 'ranks'} {', '.join(map(str, gone))} of "
                             f"this run ended first, and torchrun then stopped this process ({name}) {progress_made()}"
                             f"; torchrun's report follows\n" if gone else
                             f"\nstopped by {name} {progress_made()}\n").encode())
            os._exit(128 + signum)

    threading.Thread(target=stop, daemon=True).start()


def progress_made():
    """How far the run got and where it resumes: 'after 8 iterations; the checkpoint ... holds 8 and is intact: ...'."""
    done = "before training" if RUN["done"] is None else f"after {RUN['done']} iterations"
    if RUN["saved"] is None:
        return f"{done}; no checkpoint was written yet, so a new run starts from the beginning"
    path, iterations = RUN["saved"]
    resume = "--resume" if path == RUN["path"] else f"--resume {path}"
    return f"{done}; the checkpoint {path} holds {iterations} and is intact: {resume} continues from it"


def peers_gone(wait=2.0):
    """Under torchrun, the ranks of the run that did not stop with this one. Each process stopped by a signal says
    so in torchrun's store; one that had ended already (killed, crashed) never does, and is missing after `wait` s."""
    if RUN["world_size"] == 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return []
    key = f"stopping-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=wait))
        store.set(f"{key}{RUN['rank']}", "1")
        deadline = time.time() + wait
        while True:
            gone = [r for r in range(RUN["world_size"]) if not store.check([f"{key}{r}"])]
            if not gone or time.time() > deadline:
                return gone
            time.sleep(0.05)
    except Exception:                                                 # no store to ask: say nothing about the others
        return []


def stop_if_peer_lost(e):
    """If an exception is a broken connection to another process of the run (which ended first): one line, the
    temporary files removed, exit 1, as the stop thread ends a process (os._exit: the collectives' threads are not
    joined). Any other exception is left to the caller."""
    if RUN["world_size"] > 1 and (isinstance(e, dist.DistError) or "by peer" in str(e)):
        with SAVING:                                                  # one line, whether this or a signal is first
            for tmp in RUN["partial"]:
                remove_quietly(tmp)
            release_output_dir()
            os.write(2, f"error: another process of this run ended first (its message or torchrun's report says why), "
                        f"and this one lost its connection to it {progress_made()}\n".encode())
            os._exit(1)


class Progress:
    """The step loop's bookkeeping, one call per iteration: the progress bar of each epoch, a log.jsonl record every
    --log_every iterations, the stop on a non-finite loss, and a note when the defaults would keep a CPU busy for
    hours. The step's terms stay on the device and are read at log records only: a step costs no host sync."""

    def __init__(self, args, rank, world_size, device, start_it, iters_per_epoch, ckpt_path, dataset):
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.start_it, self.iters_per_epoch = start_it, iters_per_epoch
        self.ckpt_path, self.dataset = ckpt_path, dataset
        if rank == 0 and args.warmup_epochs >= args.epochs:
            print(f"note: --warmup_epochs {args.warmup_epochs} >= --epochs {args.epochs}: the learning rate rises "
                  f"for the whole run, never reaching its peak nor decaying; lower --warmup_epochs", flush=True)
        skipped = getattr(dataset, "skipped_by_extension", {})               # files data.py does not read
        if rank == 0 and skipped:
            print(f"note: {sum(skipped.values())} files of --data were not read, by their extension "
                  f"({', '.join(f'{n} {ext}' for ext, n in skipped.items())}): convert them to JPEG or PNG to train "
                  f"on them", flush=True)
        self.log_path = os.path.join(args.output_dir, "log.jsonl")
        self.log_fd = open_log(self.log_path, start_it) if rank == 0 else None

    def steps(self, loader):
        """(epoch, iteration, batch) for each iteration left; torch's RNG reseeded by the iteration (drop path)."""
        batches, n = iter(loader), self.iters_per_epoch        # one stream of batches for the whole run (RunSampler)
        for epoch in range(self.start_it // n, self.args.epochs):
            first = max(self.start_it - epoch * n, 0)              # a resumed run may start mid-epoch
            self.bad = torch.zeros((), device=self.device)         # non-finite losses this epoch, read at log records
            self.t0, self.done = time.time(), 0
            self.bar = tqdm(itertools.islice(batches, n - first), desc=f"epoch {epoch}", total=n, initial=first,
                            disable=self.rank != 0, dynamic_ncols=True)
            for i, batch in enumerate(self.bar, first):
                it = epoch * n + i
                seed_all(self.args.seed + 1 + it * self.world_size + self.rank)   # the same draws on resume
                RUN["iteration"], RUN["done"] = it, it
                yield epoch, it, batch

    def log(self, it, terms, **values):
        """terms: the step's loss first, then its parts (tensors, averaged over the processes); values: floats."""
        self.bad += ~torch.isfinite(next(iter(terms.values())))
        self.done += 1
        RUN["done"] = it + 1
        if it == self.start_it:
            self.t_first = time.time()                             # the first step warms up: time the second
        elif it == self.start_it + 1 and self.rank == 0 and self.device.type == "cpu":
            note_cpu_hours(time.time() - self.t_first, self.args.epochs * self.iters_per_epoch - it - 1)
        epoch, i = divmod(it, self.iters_per_epoch)
        if (i + 1) % self.args.log_every and i + 1 < self.iters_per_epoch:
            return
        stats = torch.stack([*(t.detach().float() for t in terms.values()), self.bad.float()])
        if self.world_size > 1:
            dist.all_reduce(stats)
            stats[:-1] /= self.world_size
        *means, bad = stats.tolist()
        if bad > 0:
            fail(f"loss is not finite at iteration {it} (epoch {epoch}): stopping. The last good checkpoint is "
                 f"{self.ckpt_path}; resume it with --resume and {NOT_FINITE_HINT}")
        images_per_s = self.done * self.args.batch_size_per_gpu * self.world_size / (time.time() - self.t0)
        record = {"iteration": it, "epoch": epoch, "time": time.time(), **dict(zip(terms, means)), **values,
                  "images_per_s": images_per_s, "skipped_images": getattr(self.dataset, "num_skipped", 0)}
        if self.rank == 0:
            self.bar.set_postfix({**{k: f"{record[k]:.4g}" for k in (*terms, "lr")}, "img_s": f"{images_per_s:.0f}"})
            try:
                os.write(self.log_fd, (json.dumps(record) + "\n").encode())       # unbuffered: a full disk fails here
            except OSError as e:
                fail(write_problem(self.log_path, e))

    def finish(self):
        if self.rank == 0:
            os.close(self.log_fd)
            release_output_dir()
            print(f"done: teacher weights in {self.ckpt_path} (load with vit.vit_from_checkpoint)")
        if self.world_size > 1:
            dist.destroy_process_group()


def open_log(path, start_it):
    """log.jsonl, open for appending (a file descriptor), with only its records of iterations before start_it: a killed
    run may have logged iterations past its last checkpoint, which the resumed run does again, so its log reads as one
    run."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if line.endswith("\n") and json.loads(line)["iteration"] < start_it:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):             # a line cut short by a kill
                    pass
    data = "".join(kept).encode()
    write_atomically(path, lambda f: f.write(data), len(data))
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as e:
        fail(write_problem(path, e))


def note_cpu_hours(seconds_per_it, iterations_left):
    """The defaults are the ImageNet recipe for GPUs: say so, once, when they would keep a CPU busy for hours."""
    hours = seconds_per_it * iterations_left / 3600
    if hours > 2:
        print(f"note: at {seconds_per_it:.1f} s per iteration on this CPU, the {iterations_left} iterations left take "
              f"about {hours:.0f} hours (the defaults are the ImageNet recipe, for GPUs). A CPU-sized run: "
              f"python {os.path.basename(__file__)} {CPU_FLAGS}", flush=True)


def save_training_state(path, args, it, iters_per_epoch, student, teacher, optimizer, **state):
    """After iteration `it`, if it ends an epoch or a --saveckp_every interval: checkpoint.pth, and at every
    --saveckp_freq-th epoch end checkpoint<epoch>.pth too. state: the method's own tensors (DINO's centre).
    Every process takes part (the full state dicts are gathered); rank 0 writes."""
    epoch_end = (it + 1) % iters_per_epoch == 0
    if not (epoch_end or (args.saveckp_every and (it + 1) % args.saveckp_every == 0)):
        return
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ckpt = {"student": get_model_state_dict(student, options=full),
            "teacher": get_model_state_dict(teacher, options=full),
            "optimizer": get_optimizer_state_dict(student, optimizer, options=full),
            **{name: t.cpu() for name, t in state.items()},
            "epoch": (it + 1) // iters_per_epoch, "iteration": it + 1, "args": vars(args)}
    if RUN["rank"] == 0:
        save_checkpoint(ckpt, path)
    if RUN["world_size"] > 1:
        dist.barrier()                                                # the others learn that it is written
    RUN["saved"] = (path, it + 1)                                     # on every process, for the line a stop prints
    if RUN["rank"] == 0 and epoch_end and args.saveckp_freq and ckpt["epoch"] % args.saveckp_freq == 0:
        save_checkpoint(ckpt, os.path.join(args.output_dir, f"checkpoint{ckpt['epoch']:04d}.pth"))


def save_checkpoint(obj, path):
    """torch.save, atomically (write_atomically): a crash while saving never destroys the previous file."""
    write_atomically(path, lambda f: torch.save(obj, f), tensor_bytes(obj))


def tensor_bytes(obj):
    """The bytes of the tensors in a (nested) checkpoint: what its file needs, give or take a few kB."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return obj.numel() * obj.element_size() if torch.is_tensor(obj) else 0


class RawFile:
    """The file torch.save writes through: every byte written or an OSError (ENOSPC, EDQUOT) with its errno, which
    torch.save to a path or to a buffered file turns into an 'unexpected pos' RuntimeError."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, data):
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]
        return len(data)

    def flush(self):
        pass


def write_atomically(path, write, size):
    """write(f) into a temporary file beside path (a name unique to the process), flushed to the disk, then renamed
    over path: the previous file stays whole until the new one is. A failed write removes the temporary file (so
    does the stop thread on a signal; after a SIGKILL the next run into the folder does) and stops the run with one
    line: a full disk says how much room the file needs (size: its bytes)."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with SAVING:
        RUN["partial"].add(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            write(RawFile(fd))
            os.fsync(fd)                                              # on the disk before the rename
        finally:
            os.close(fd)
        with SAVING:
            os.replace(tmp, path)
            RUN["partial"].discard(tmp)
    except BaseException as e:
        with SAVING:
            remove_quietly(tmp)
            RUN["partial"].discard(tmp)
        cause = e
        while cause is not None and not isinstance(cause, OSError):   # torch.save wraps the write's OSError
            cause = cause.__context__
        if cause is None:
            raise
        fail(write_problem(path, cause, size))


def write_problem(path, e, size=None):
    """The line for a failed write of a run's file: what, why, and for a full disk how much room it needs (size: the
    bytes of a file written atomically; None for an append)."""
    kept = f"; the previous {os.path.basename(path)} is intact" if size is not None and os.path.exists(path) else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        need = f"it needs {size / 1e6:.1f} MB and " if size else ""
        return (f"{os_problem(e)} writing {path}: {need}{free / 1e6:.1f} MB are free there{kept}. Make room, or "
                f"move the folder to a larger disk, then continue with --resume")
    return f"cannot write {path}: {os_problem(e)}{kept}; fix that, then continue with --resume"


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def resume_run(args, ckpt_path, total_iters, student, teacher, optimizer, **state):
    """--resume: the networks, the optimiser and the method's own tensors (state, restored in place) from a
    checkpoint of this script; the iteration to start at (0 for a new run)."""
    if not args.resume:
        return 0
    ckpt = load_training_state(ckpt_path if args.resume == "auto" else args.resume, student, teacher, optimizer)
    for name, tensor in state.items():
        tensor.copy_(ckpt[name])
    RUN["saved"] = (ckpt_path if args.resume == "auto" else args.resume, ckpt["iteration"])
    if ckpt["iteration"] >= total_iters:
        fail(f"--resume: the checkpoint is at iteration {ckpt['iteration']}, the end of a run of {args.epochs} epochs "
             f"of {total_iters // args.epochs} iterations: nothing to train (raise --epochs to train on)")
    return ckpt["iteration"]


def load_training_state(path, student, teacher, optimizer):
    """Restore student, teacher and optimiser from a checkpoint of this script; return the checkpoint."""
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                            # truncated, not a torch file, unsafe pickle ...
        fail(f"--resume: cannot read {path} ({type(e).__name__}; truncated, or not a PyTorch checkpoint): pass "
             f"a checkpoint.pth written by this script")
    if not isinstance(ckpt, dict) or not {"student", "teacher", "optimizer", "iteration"} <= ckpt.keys():
        fail(f"--resume: {path} is not a training checkpoint of this script (it has no student, teacher, "
             f"optimizer and iteration): pass a checkpoint.pth written by this script")
    own, saved = student.state_dict(), ckpt["student"]
    wrong = [k for k in own if k not in saved or saved[k].shape != own[k].shape] + [k for k in saved if k not in own]
    if wrong:
        fail(f"--resume: {path} holds another model ({wrong[0]} differs): resume with the arguments of the run "
             f"that wrote it (its 'args' entry)")
    set_model_state_dict(student, ckpt["student"], options=StateDictOptions(full_state_dict=True))
    set_model_state_dict(teacher, ckpt["teacher"], options=StateDictOptions(full_state_dict=True))
    load_optimizer_state(student, optimizer, ckpt["optimizer"])   # parameters not stepped yet have no state
    return ckpt


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


def load_pretrained(path, student, teacher):
    """--pretrained_weights: both backbones <- the ViT of a checkpoint (a training checkpoint's teacher), any layout
    vit_from_checkpoint reads; position embeddings resized if only their grid differs. Heads stay as built."""
    ckpt = vit.read_checkpoint(path)
    sd = vit.backbone_state_dict(ckpt)
    try:
        for net in (student, teacher):
            vit.load_state_dict(net.backbone, sd)
    except vit.CheckpointError:
        fail(f"--pretrained_weights {path} holds a {vit.describe(vit.vit_from_checkpoint(ckpt))}; this run builds a "
             f"{vit.describe(student.backbone)}: pass the architecture flags that build the file's ViT")


def fail(msg):
    """Stop every process with a one-line message and a non-zero exit code, no traceback; the output folder unlocked
    (and removed if this run made it and wrote nothing to it)."""
    release_output_dir()
    sys.exit(f"error: {msg}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help prints the docstring as written, and every flag's default and valid range."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        return text + f" (valid: {action.type.interval})" if isinstance(action.type, Ranged) else text


class Ranged:
    """An argparse type that converts a value (int, float, int_or_auto) and declares the flag's valid values: an
    interval written as the error message writes it, '[0, 1)', '(0, inf)'. check_shared_args checks each."""

    def __init__(self, convert, interval):
        self.convert, self.interval, self.__name__ = convert, interval, convert.__name__

    def __call__(self, text):
        return self.convert(text)


def int_or_auto(value):
    return value if value == "auto" else int(value)


def add_run_flags(p):
    """The flags of the run itself, the same for the four methods: data, output, resume, launch, precision."""
    p.add_argument("--data", default="synthetic",
                   help="""ImageFolder-style folder (one sub-folder per class; a 'train' sub-folder is used if
                   present), 'synthetic' for the embedded shapes dataset ('synthetic:N' for N images), or
                   'cifar10:ROOT' for torchvision's CIFAR-10 files under ROOT (downloaded there on first use).""")
    p.add_argument("--on_bad_image", default="skip", choices=["skip", "stop"],
                   help="An unreadable or truncated image is skipped and counted, or stops the run.")
    p.add_argument("--num_workers", default=8, type=Ranged(int, "[0, inf)"), help="Data-loading processes per GPU.")
    p.add_argument("--output_dir", default=f"out/{p.prog.lower()}", help="Where checkpoints and log.jsonl go.")
    p.add_argument("--saveckp_freq", default=10, type=Ranged(int, "[0, inf)"),
                   help="Also keep checkpoint<epoch>.pth every this many epochs (checkpoint.pth: every epoch).")
    p.add_argument("--saveckp_every", default=500, type=Ranged(int, "[0, inf)"),
                   help="""Also rewrite checkpoint.pth every this many iterations, so that a killed run loses at most
                   that many; --resume continues from it exactly. 0: at epoch ends only.""")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="Continue a run: from <output_dir>/checkpoint.pth, or from the checkpoint given.")
    p.add_argument("--pretrained_weights", default=None, metavar="PATH",
                   help="""Start both backbones from the ViT in this file (a released DINO / DINOv2 / SimDINO /
                   SimDINOv2 checkpoint, this project's teacher, a bare state dict); the heads start fresh. The
                   architecture flags must build the file's ViT.""")
    p.add_argument("--seed", default=0, type=Ranged(int, "[0, inf)"),
                   help="Seed of weights, augmentations and data order.")
    p.add_argument("--log_every", default=10, type=Ranged(int, "[1, inf)"),
                   help="Iterations between log records (each costs one GPU sync).")
    p.add_argument("--fsdp", action="store_true",
                   help="""Shard student and teacher with FSDP2 instead of DDP, for models that crowd a GPU
                   (docs/performance.md).""")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block.")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="Recompute the student's block activations in backward: far less memory, 1/3 more compute.")
    p.add_argument("--bf16", default=True, action=argparse.BooleanOptionalAction,
                   help="""bf16 autocast of the forwards on a device that computes bf16 natively (a GPU of compute
                   capability 8.0 or later; a CPU with AMX or AVX512-BF16), the losses in float32 or better, the
                   parameters and optimiser state in float32; with --fsdp the parameters are gathered in bf16,
                   gradients reduced in float32. Elsewhere float32, with a note (docs/precision.md).""")


def check_shared_args(args):
    """Every flag declared with a Ranged type against its interval, and the crop flags against each other: one line
    that names the flag, the value and what is valid."""
    for action in build_parser()._actions:
        if isinstance(action.type, Ranged):
            value = getattr(args, action.dest)
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(v != "auto" and not in_interval(v, action.type.interval) for v in values):
                fail(f"--{action.dest} {' '.join(map(str, values))} is out of range: valid values lie in "
                     f"{action.type.interval}")
    for name in ("global_crops_scale", "local_crops_scale", "blur_radius"):
        if getattr(args, name)[0] > getattr(args, name)[1]:
            fail(f"--{name} {getattr(args, name)[0]} {getattr(args, name)[1]} must be given as min max")
    for name in ("global_crops_size", "local_crops_size"):
        if getattr(args, name) % args.patch_size:
            fail(f"--{name} {getattr(args, name)} is not divisible by --patch_size {args.patch_size}: "
                 f"use a multiple of {args.patch_size}")


def in_interval(value, interval):
    """Whether value lies in an interval written as the error message writes it: '[1, inf)', '(0, 1]'."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return (lo < value if interval[0] == "(" else lo <= value) and (value < hi if interval[-1] == ")" else value <= hi)


# ----------------------------------------------------------------------------- this method's flags

def build_parser():
    p = argparse.ArgumentParser("DINO", description=__doc__, formatter_class=HelpFormatter)
    # Model
    p.add_argument("--arch", default="vit_small", choices=list(vit.ARCHS),
                   help="Backbone. The paper trains vit_base and vit_large on ImageNet-1k; vit_tiny is for CPU runs.")
    p.add_argument("--patch_size", default=16, type=Ranged(int, "[1, inf)"),
                   help="Patch size in pixels (Table 4: 16). Crop sizes must be multiples of it.")
    p.add_argument("--drop_path_rate", default=0.1, type=Ranged(float, "[0, 1)"),
                   help="Stochastic depth of the student, rising linearly over the blocks (Table 4, v1 family: 0.1).")
    p.add_argument("--num_register_tokens", default=0, type=Ranged(int, "[0, inf)"),
                   help="Register tokens (Darcet et al. 2024). The DINO recipe uses none; DINOv2's later ones use 4.")
    p.add_argument("--interpolate_offset", default=0.1, type=Ranged(float, "[0, 1)"),
                   help="""How position embeddings are resized for crops of another size: bicubic with scale_factor
                   (grid + offset) / stored grid, as DINO and SimDINO release it (0.1); 0 resizes to the grid
                   exactly (DINOv2's register models, SimDINOv2).""")
    p.add_argument("--interpolate_antialias", default=False, action=argparse.BooleanOptionalAction,
                   help="Anti-aliased bicubic resizing of the position embeddings (DINO and SimDINO: off).")
    p.add_argument("--proj_hidden_dim", default=2048, type=Ranged(int, "[1, inf)"),
                   help="Hidden width of the 3-layer projector MLP (released: 2048).")
    p.add_argument("--proj_dim", default=256, type=Ranged(int, "[1, inf)"),
                   help="Bottleneck dimension: the MLP's output, L2-normalised before the prototypes (released: 256).")
    p.add_argument("--out_dim", default=65536, type=Ranged(int, "[1, inf)"),
                   help="Number K of prototypes, the size of the softmax (released and Table 4: 65536).")
    p.add_argument("--norm_last_layer", default=True, action=argparse.BooleanOptionalAction,
                   help="""Fix every prototype's norm at 1 (weight norm with g = 1, not trained): the scores are
                   cosines (released default). --no-norm_last_layer trains g; DINO's authors do so for vit_small,
                   'better performance but can make the training unstable'.""")
    # Loss: centering and sharpening
    p.add_argument("--student_temp", default=0.1, type=Ranged(float, "(0, inf)"),
                   help="Student softmax temperature tau_s (released: 0.1).")
    p.add_argument("--warmup_teacher_temp", default=0.04, type=Ranged(float, "(0, inf)"),
                   help="Teacher softmax temperature tau_t in the first epoch (released: 0.04).")
    p.add_argument("--teacher_temp", default=0.07, type=Ranged(float, "(0, inf)"),
                   help="""Teacher temperature after the warm-up (DINO's ViT-S/16 recipe and Table 4: 0.07;
                   main_dino.py's own default is 0.04, and it warns that values above 0.07 are unstable).""")
    p.add_argument("--warmup_teacher_temp_epochs", default=30, type=Ranged(int, "[0, inf)"),
                   help="""Epochs of linear teacher-temperature warm-up, one value per epoch (DINO's ViT-S/16 recipe
                   and Table 4: 30; main_dino.py's own default is 0, with a help string that says 30).""")
    p.add_argument("--center_momentum", default=0.9, type=Ranged(float, "[0, 1]"),
                   help="Momentum m of the centre's EMA over the teacher's mean scores, every step (released: 0.9).")
    p.add_argument("--freeze_last_layer", default=1, type=Ranged(int, "[0, inf)"),
                   help="Epochs at the start in which the prototypes stay fixed; it stabilises DINO (released: 1).")
    # Teacher and optimisation
    p.add_argument("--momentum_teacher", default=0.996, type=Ranged(float, "[0, 1]"),
                   help="Teacher EMA momentum at the start, cosine to --final_momentum_teacher (Table 4: 0.996).")
    p.add_argument("--final_momentum_teacher", default=1.0, type=Ranged(float, "[0, 1]"),
                   help="""Teacher EMA momentum at the end (1 in every released recipe). 0 and 0: the teacher is the
                   student after every step, no self-distillation (the paper's Table 9).""")
    p.add_argument("--lr", default=0.0005, type=Ranged(float, "[0, inf)"),
                   help="""Peak learning rate per 256 images, scaled linearly with the global batch (released
                   DINO script: 0.0005, i.e. 0.001 at 512; Table 4 prints 0.002).""")
    p.add_argument("--min_lr", default=1e-6, type=Ranged(float, "[0, inf)"),
                   help="Learning rate at the end of the cosine schedule.")
    p.add_argument("--warmup_epochs", default=10, type=Ranged(int, "[0, inf)"),
                   help="Epochs of linear learning-rate warm-up from 0 (Table 4: 10).")
    p.add_argument("--weight_decay", default=0.04, type=Ranged(float, "[0, inf)"),
                   help="AdamW weight decay at the start (Table 4: 0.04).")
    p.add_argument("--weight_decay_end", default=0.4, type=Ranged(float, "[0, inf)"),
                   help="Weight decay at the end, cosine in between (Table 4: 0.4). Biases and norms get none.")
    p.add_argument("--clip_grad", default=3.0, type=Ranged(float, "[0, inf)"),
                   help="Clip each parameter's gradient to this norm, as DINO does (released: 3.0). 0 disables.")
    p.add_argument("--batch_size_per_gpu", default=64, type=Ranged(int, "[1, inf)"),
                   help="Images per process and step; the global batch is this times the processes (Table 4: 64 x 8).")
    p.add_argument("--epochs", default=100, type=Ranged(int, "[1, inf)"), help="Training epochs (Table 4: 100).")
    p.add_argument("--epoch_length", default="auto", type=Ranged(int_or_auto, "[1, inf)"),
                   help="""Iterations per epoch, the unit of --epochs and every per-epoch setting. 'auto': one pass
                   over the data (images // global batch). DINOv2's released recipe fixes 1,250 instead.""")
    # Multi-crop
    p.add_argument("--global_crops_scale", default=(0.4, 1.0), type=Ranged(float, "(0, 1]"), nargs=2,
                   help="Area range of the 2 global crops, relative to the image (DINO: 0.4 1).")
    p.add_argument("--local_crops_scale", default=(0.05, 0.4), type=Ranged(float, "(0, 1]"), nargs=2,
                   help="Area range of the local crops (DINO: 0.05 0.4).")
    p.add_argument("--local_crops_number", default=10, type=Ranged(int, "[0, inf)"),
                   help="Local crops per image, seen by the student only (Table 4: 10; main_dino.py: 8).")
    p.add_argument("--global_crops_size", default=224, type=Ranged(int, "[1, inf)"),
                   help="Side of the global crops in pixels (224).")
    p.add_argument("--local_crops_size", default=96, type=Ranged(int, "[1, inf)"),
                   help="Side of the local crops in pixels (96).")
    p.add_argument("--blur_radius", default=(0.1, 2.0), type=Ranged(float, "[0, inf)"), nargs=2,
                   metavar=("MIN", "MAX"),
                   help="""Range of the Gaussian blur's radius (PIL's: the standard deviation), in pixels of the
                   crop after resizing (DINO: 0.1 2, chosen for 224 and 96 px crops). Blur on 32 px crops at
                   DINO's radii is 7x stronger relative to the image: 0.014 0.29 is DINO's relative blur at 32 px
                   (0.017 0.33 for 16 px local crops). 0 0: no blur.""")
    p.add_argument("--photometric", default="auto", choices=["auto", "device", "pil"],
                   help="""Where colour jitter, grayscale, blur and solarisation run: 'device', batched after the
                   copy (the same distribution of views, 2.5x the images/s per loader core); 'pil', DINO's PIL
                   pipeline in the workers; 'auto': 'device' on CUDA, 'pil' on CPU (docs/performance.md).""")
    add_run_flags(p)
    return p


def get_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    """Every flag is checked here, once, before anything is built or written: a bad value stops the run with one
    line that names the flag, the value and the valid range."""
    check_shared_args(args)


if __name__ == "__main__":
    stop_on_signals()
    try:
        train(get_args())
    except (DataError, vit.CheckpointError) as e:
        fail(e)
    except Exception as e:
        stop_if_peer_lost(e)
        raise
