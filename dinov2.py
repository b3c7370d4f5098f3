"""DINOv2: DINO and iBOT with Sinkhorn-Knopp and KoLeo (Oquab et al. 2023), the baseline of SimDINO's Figure 1 (c).

A student and an EMA teacher are kept in agreement on K = 65536 prototype scores, for the CLS
token of every view (the DINO loss) and for each patch the student saw masked (the iBOT loss).
The teacher's scores become target distributions by Sinkhorn-Knopp (or by centering) and a low
temperature; the student's softmax is trained to match them by cross-entropy, and a KoLeo term
spreads the student's CLS features:

    loss = dino + ibot + 0.1 * koleo
    dino  = sum over (student view i, teacher global view j != i) pairs of mean_b H(pt_j, ps_i) / #pairs
    ibot  = mean over global crops of the mean over the crop's masked patches k of H(Pt_k, Ps_k)
    koleo = sum over the 2 global crops of -mean_b log ||y_b - y_nn(b)||     (y: L2-normalised backbone CLS)
    ps = softmax(zs / tau_s),  pt = SinkhornKnopp(zt / tau_t)  or  softmax((zt - center) / tau_t)

SimDINOv2 (`simdinov2.py`, Figure 1 (d)) keeps the masking and removes the prototype layers,
the softmax, Sinkhorn-Knopp, the centres, the temperatures and KoLeo, putting squared
distances and a coding-rate term in their place: `diff -u dinov2.py simdinov2.py` shows
exactly that change; everything else is shared.

`dinov2_loss` below is that objective; `train` is the rest of the released recipe (facebookresearch/
dinov2, ssl_default_config.yaml, with the settings of the SimDINO paper's Table 4): multi-crop views
with block masks, EMA teacher, layer-wise lr decay, prototype layers frozen in the first epoch,
DDP / FSDP2, bf16, checkpoints. Each flag's help says where its default comes from.

Below, in this order: the model and the loss, the recipe, `train`, then the run machinery (the same in
the four method files: skip it on a first read) and this method's flags.

    # a CPU-sized run on the embedded synthetic dataset: a few minutes on a laptop
    python dinov2.py --arch vit_tiny --patch_size 8 --global_crops_size 32 --local_crops_size 16 \
        --local_crops_number 4 --data synthetic:2000 --epochs 4 --warmup_epochs 1 --num_workers 2
    # the defaults are the ImageNet recipe (ViT-S/16, 224 px crops, 100 epochs): runs for GPUs
    torchrun --nproc_per_node=8 dinov2.py --data /path/to/imagenet --output_dir out/dinov2
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
from data import BlockMaskGenerator, DataError, MultiCropAugmentation, build_dataset, collate_multicrop

CPU_FLAGS = ("--arch vit_tiny --patch_size 8 --global_crops_size 32 --local_crops_size 16 --local_crops_number 4 "
             "--data synthetic:2000 --epochs 4 --warmup_epochs 1 --num_workers 2")   # minutes on a laptop CPU
NOT_FINITE_HINT = "a lower --lr or --teacher_temp"   # what to change when the loss is not finite


# ----------------------------------------------------------------------------- model

class WeightNormLinear(nn.Module):
    """y = x W^T, W = g * V / ||V|| row by row (weight normalisation, Salimans & Kingma 2016), no bias.

    The prototype layer: row k of W is prototype k. `weight_v` (K, d) holds the directions and
    `weight_g` (K, 1) the norms, under the names of DINOv2's checkpoints. g starts at 1; DINOv2
    trains it (train_norm=True), DINO's norm_last_layer keeps it at 1 (train_norm=False).
    """

    float32_params = True   # its scores are computed in float32: FSDP2 must not gather it in bf16 (distribute)

    def __init__(self, in_dim, out_dim, train_norm=False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        bound = 1 / math.sqrt(in_dim)     # nn.Linear's default init, which DINOv2's prototype layer keeps
        nn.init.uniform_(self.weight_v, -bound, bound)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_norm)

    @property
    def weight(self):                                               # (K, d), row k has norm g_k
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x):                                           # (..., d)
        return F.linear(x, self.weight)                             # (..., K)


class DINOHead(nn.Module):
    """The released DINOv2 head: 3-layer MLP, L2-normalise, weight-normalised linear layer to K prototype scores."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256, num_prototypes=65536, norm_last_layer=False):
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
            return self.last_layer(x)                               # to 0.004, i.e. 0.1 after / tau_t. (..., K)


class Network(nn.Module):
    """Backbone + DINO head (+ iBOT head). One call runs both crop sizes: every block takes them together
    and each head takes its tokens at once (under FSDP2 each is gathered once per step in forward and once
    in backward).

    Global views give the prototype scores of each view's CLS token (DINO head) and of the patches
    listed in `idx` (flat indices into the M_glo*B*N patch tokens; the iBOT head, which is the DINO
    head unless separate); `m` masks the input patches. With local views, the global views'
    backbone CLS features (KoLeo's input) come back too.
    """

    def __init__(self, backbone, dino_head, ibot_head=None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head                # None: the masked patches share the DINO head (DINOv2's default)

    def forward(self, xg, idx, m=None, xl=None):  # xg (M_glo, B, 3, G, G), xl (M_loc, B, 3, L, L), m (M_glo*B, N)
        views = [xg] if xl is None else [xg, xl]
        feats = self.backbone.forward_features_list([x.flatten(0, 1) for x in views], [m, None])  # one pass
        cls = [f["cls"] for f in feats]                                              # (M_glo*B, D), (M_loc*B, D)
        patches = feats[0]["patches"].flatten(0, 1).index_select(0, idx)             # (n_masked, D)
        if self.ibot_head is None:                  # one call of the shared head for all tokens, as DINOv2 does
            z = self.dino_head(torch.cat(cls + [patches])).split([len(t) for t in cls + [patches]])
        else:
            z = [*self.dino_head(torch.cat(cls)).split([len(t) for t in cls]), self.ibot_head(patches)]
        zg, Zg = z[0].unflatten(0, xg.shape[:2]), z[-1]                              # (M_glo, B, K), (n_masked, K')
        if xl is None:
            return zg, Zg
        yg = cls[0].unflatten(0, xg.shape[:2])                                       # (M_glo, B, D) backbone CLS
        return zg, Zg, z[1].unflatten(0, xl.shape[:2]), yg                           # + (M_loc, B, K), KoLeo's input


def build_networks(args):
    """Student and teacher start identical; the teacher is never trained by gradients."""
    backbone = vit.build_vit(args.arch, patch_size=args.patch_size, drop_path_rate=args.drop_path_rate,
                             img_size=args.global_crops_size, num_register_tokens=args.num_register_tokens,
                             drop_path_uniform=args.drop_path_uniform, layerscale=args.layerscale or None,
                             interpolate_offset=args.interpolate_offset,
                             interpolate_antialias=args.interpolate_antialias, drop_path_mode=args.drop_path_mode)
    backbone.grad_checkpointing = args.grad_checkpointing  # the student recomputes in backward; the teacher never
    head = functools.partial(DINOHead, backbone.embed_dim, args.proj_hidden_dim, args.proj_dim,
                             norm_last_layer=args.norm_last_layer)
    student = Network(backbone, head(args.out_dim), head(args.ibot_out_dim) if args.ibot_separate_head else None)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False).eval()      # eval: no stochastic depth, the teacher's forward is deterministic
    return student, teacher


# ----------------------------------------------------------------------------- loss: targets, cross-entropies, KoLeo

def at_least_float32(*tensors):
    return (t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


@torch.no_grad()
def sinkhorn_knopp(scores, temp, n_iterations=3):
    """DINOv2's Sinkhorn-Knopp targets: this process's teacher scores (n, K) -> targets (n, K), rows sum to 1.

    Q = exp(scores / temp)^T, K prototypes x n_all samples of all processes, is scaled to total mass 1,
    then n_iterations times each row (prototype) to mass 1/K and each column (sample) to 1/n_all;
    finally Q x n_all, so each sample's targets sum to 1 and, once converged, each prototype holds
    n_all/K of the mass: the batch is spread evenly over the prototypes. The total, the row sums
    and n_all are all-reduced, so each process gets its rows of what one process computes on the
    whole batch. Float32 at least (float64 stays float64).
    """
    s, = at_least_float32(scores)
    with torch.autocast(s.device.type, enabled=False):
        n, K = s.shape
        top = s.amax(dim=0) if n else s.new_full((K,), -math.inf)                  # (K,) best score of each prototype
        if dist.is_initialized():
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        # row k scaled by exp(-top_k / temp): the first row normalisation undoes that exactly, so the targets are
        # DINOv2's exp(s / temp) ones, but exp cannot overflow (float32 does past s / temp = 88) and no row is all 0
        Q = torch.exp((s - top) / temp).T                                          # (K, n)
        counts = torch.stack([s.new_full((), float(n)), Q.sum()])                   # (2,) samples, total mass
        if dist.is_initialized():
            dist.all_reduce(counts)                                                # of all processes, in one call
        n_all, total = counts
        Q = Q / total                                                              # total mass 1
        for _ in range(n_iterations):
            rows = Q.sum(dim=1, keepdim=True)                                      # (K, 1) mass of each prototype
            if dist.is_initialized():
                dist.all_reduce(rows)
            Q = Q / rows / K                                                       # each prototype: 1/K
            Q = Q / Q.sum(dim=0, keepdim=True) / n_all                             # each sample: 1/n_all
        return (Q * n_all).T                                                       # (n, K), rows sum to 1


@torch.no_grad()
def softmax_center(scores, center, temp):
    """DINO's targets: softmax((scores - center) / temp) over the K prototypes. scores (..., K), center (1, K)."""
    s, c = at_least_float32(scores, center)
    with torch.autocast(s.device.type, enabled=False):
        return F.softmax((s - c) / temp, dim=-1)


@torch.no_grad()
def update_center(center, scores, momentum):
    """center <- m center + (1 - m) mean of the scores over the global batch, in place; returns center.

    scores (..., K): this process's teacher scores, every leading index a sample (the CLS scores
    of the global views, or the scores of the masked patches). Sum and count are all-reduced, so
    each process holds the centre one process computes on the whole batch; a batch without any
    sample (no masked patch anywhere) leaves the centre as it is. The release weights the patch
    centre slightly differently: it averages the per-process means over the masked patches of
    each process (iBOTPatchLoss), which is the same when every process has as many masked patches.
    """
    s, = at_least_float32(scores)
    s = s.reshape(-1, s.shape[-1])                                                  # (n, K)
    stats = torch.cat([s.sum(0), s.new_full((1,), len(s))])                         # (K + 1,) sum, count (no host copy)
    if dist.is_initialized():
        dist.all_reduce(stats)
    total, count = stats[:-1].to(center.dtype), stats[-1].to(center.dtype)
    new = center * momentum + (1 - momentum) * total / count.clamp(min=1)
    return center.copy_(torch.where(count > 0, new, center))


@torch.no_grad()
def teacher_targets(ztg, Ztg, temp, centering, center, patch_center, center_momentum):
    """The teacher's targets pt (M_glo, B, K) for the CLS tokens and Pt (n_masked, K') for the masked
    patches, from its scores ztg and Ztg, by Sinkhorn-Knopp or by centering (which then moves the
    centres, after they are used, as DINO and DINOv2 do). The CLS tokens of both global views form one
    Sinkhorn-Knopp problem over the global batch, the masked patches another."""
    if centering == "sinkhorn_knopp":
        pt = sinkhorn_knopp(ztg.flatten(0, 1), temp).unflatten(0, ztg.shape[:2])    # (M_glo, B, K)
        return pt, sinkhorn_knopp(Ztg, temp)                                       # + (n_masked, K')
    pt, Pt = softmax_center(ztg, center, temp), softmax_center(Ztg, patch_center, temp)
    update_center(center, ztg, center_momentum)
    update_center(patch_center, Ztg, center_momentum)
    return pt, Pt


def patch_weights(m):
    """Weight of each masked patch, 1 / (masked patches of its image), in the order of m's True entries."""
    n = m.sum(-1)                                                                    # (M_glo*B,) masked per crop
    return (1.0 / n.clamp(min=1)).repeat_interleave(n)                               # (n_masked,)


def dino_loss(zsg, zsl, pt, student_temp):
    """DINOv2's DINO term: the cross-entropy H(pt_j, ps_i) between the teacher targets of global view j
    and the student softmax of view i, averaged over the B samples, for every pair but i == j; the
    pairs are summed and divided by M_glo*(M_glo - 1) + max(M_loc*M_glo, 1).

    That is the released weighting (ssl_meta_arch.py): the local-view terms, and the global terms
    (each global view against the other one, computed as 2 x their mean), are both divided by
    n_global_crops_loss_terms + n_local_crops_loss_terms. With local views this is the mean over the
    M*M_glo - M_glo pairs, as in DINO; without any, the max(., 1) makes the divisor 3, not 2.
    zsg (M_glo, B, K), zsl (M_loc, B, K): student scores; pt (M_glo, B, K): teacher targets.
    """
    zsg, zsl, pt = at_least_float32(zsg, zsl, pt)
    M_glo, M_loc = len(zsg), len(zsl)
    with torch.autocast(zsg.device.type, enabled=False):                             # no bf16 einsum
        zs = torch.cat([zsg, zsl])                                                   # (M, B, K) all student views
        ps = F.log_softmax(zs / student_temp, dim=-1)                                # (M, B, K) log student probs
        ce = -torch.einsum("ibk,jbk->ijb", ps, pt)                                   # (M, M_glo, B) H(pt_j, ps_i)
        pairs = torch.ones(len(zs), M_glo, 1, device=zs.device)                       # (M, M_glo, 1) pairs that count
        pairs[:M_glo].diagonal().zero_()                                             # no (i, i) pairs
        B = zs.shape[1]
        return (pairs * ce).sum() / B / (M_glo * (M_glo - 1) + max(M_loc * M_glo, 1))  # sum over pairs of means over B


def ibot_loss(Zsg, Pt, w, n_crops, student_temp):
    """DINOv2's iBOT term (iBOTPatchLoss.forward_masked): H(Pt_k, Ps_k) for each masked patch k, times
    w_k = 1 / (masked patches of its crop), summed and divided by the number of global crops: the mean
    over crops of the mean over each crop's masked patches, crops without any adding 0.
    Zsg (n_masked, K'): student scores; Pt (n_masked, K'): teacher targets; w: patch_weights(m).
    """
    Zsg, Pt, w = at_least_float32(Zsg, Pt, w)
    with torch.autocast(Zsg.device.type, enabled=False):
        ce = -(Pt * F.log_softmax(Zsg / student_temp, dim=-1)).sum(-1)               # (n_masked,) H(Pt_k, Ps_k)
        return (w * ce).sum() / n_crops


def koleo_loss(x, eps=1e-8):
    """KoLeo regulariser (Sablayrolles et al. 2019, as DINOv2's KoLeoLoss): -mean_b log(||y_b - y_nn(b)|| + eps)
    for y = x / ||x|| and nn(b) the nearest other sample (largest inner product). x (n, D) -> scalar.

    It rewards spreading the features uniformly. The distance is F.pairwise_distance's
    ||y_b - y_nn(b) + eps||, as released (nn.PairwiseDistance(eps=1e-8)).
    """
    x, = at_least_float32(x)
    with torch.autocast(x.device.type, enabled=False):
        y = F.normalize(x, eps=eps, dim=-1)                                          # (n, D)
        with torch.no_grad():
            dots = y @ y.T                                                           # (n, n) cosines
            dots.fill_diagonal_(-math.inf)                                           # not oneself
            nearest = dots.argmax(dim=1)                                             # (n,)
        return -torch.log(F.pairwise_distance(y, y[nearest], eps=eps) + eps).mean()


def dinov2_loss(zsg, zsl, pt, Zsg, Pt, w, ysg, student_temp, dino_loss_weight=1.0, ibot_loss_weight=1.0,
                koleo_loss_weight=0.1):
    """The DINOv2 objective, as released. Returns (loss, DINO term, iBOT term, KoLeo term).

    zsg (M_glo, B, K), zsl (M_loc, B, K): student CLS scores of the (masked) global and the local
    views; pt (M_glo, B, K): teacher targets of the global views; Zsg (n_masked, K'): student scores of
    the patches it saw masked, Pt (n_masked, K') their teacher targets; w (n_masked,): patch_weights(m);
    ysg (M_glo, B, D): the student's backbone CLS features of the global views.
    """
    M_glo, B = zsg.shape[:2]
    dino_term = dino_loss(zsg, zsl, pt, student_temp)
    ibot_term = ibot_loss(Zsg, Pt, w, M_glo * B, student_temp)                       # / M_glo*B crops of this process
    koleo_term = sum(koleo_loss(y) for y in ysg)                                     # per crop: no 2 views of one image
    loss = dino_loss_weight * dino_term + ibot_loss_weight * ibot_term + koleo_loss_weight * koleo_term
    return loss, dino_term.detach(), ibot_term.detach(), koleo_term.detach()


# ----------------------------------------------------------------------------- recipe

def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Per-iteration values (floats): linear warm-up from warmup_start to base, then cosine from base to final."""
    warmup = np.linspace(warmup_start, base, warmup_epochs * iters_per_epoch)
    t = np.arange(epochs * iters_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warmup, cosine]).tolist()


def param_groups(model, layerwise_decay, patch_embed_lr_mult):
    """DINOv2's AdamW groups: lr x layerwise_decay^(L + 1 - layer), where the embeddings are layer 0, block i
    is layer i + 1 and the final norm and heads are layer L + 1; the patch embedding also gets
    x patch_embed_lr_mult. No weight decay on biases, norms and layerscales. The prototype layers
    get groups of their own (`last_layer`), frozen in the first epoch(s) by lr 0."""
    L = len(model.backbone.blocks)
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n.startswith("backbone.blocks."):
            layer = int(n.split(".")[2]) + 1
        elif n.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed",
                           "backbone.register_tokens", "backbone.mask_token")):
            layer = 0
        else:
            layer = L + 1
        lr_mult = layerwise_decay ** (L + 1 - layer) * (patch_embed_lr_mult if "patch_embed" in n else 1.0)
        wd_mult = 0.0 if n.endswith(".bias") or "norm" in n or "gamma" in n else 1.0
        groups.setdefault((lr_mult, wd_mult, ".last_layer." in n), []).append(p)
    return [{"params": ps, "lr_mult": lr, "wd_mult": wd, "last_layer": last} for (lr, wd, last), ps in groups.items()]


@torch.no_grad()
def clip_gradients(model, max_norm):
    """DINOv2's clipping: the backbone's, the DINO head's and the iBOT head's gradients, each as one vector,
    to norm <= max_norm (torch.nn.utils.clip_grad_norm_ on each part, with one all-reduce for all under FSDP2)."""
    parts = [model.backbone, model.dino_head] + ([model.ibot_head] if model.ibot_head is not None else [])
    clip_parts(parts, max_norm)         # no iBOT head of its own when it shares the DINO head


def clip_parts(parts, max_norm):
    """Scale each part's gradients, as one vector, to norm <= max_norm, as clip_grad_norm_ does."""
    grads, norms = grad_norms(nn.ModuleList(parts))                                 # (P,) over all parts
    sizes = [sum(p.grad is not None for p in part.parameters()) for part in parts]
    total = torch.stack([n.square().sum().sqrt() for n in norms.split(sizes)])     # (parts,) each part's norm
    factors = (max_norm / (total + 1e-6)).clamp(max=1.0)                           # (parts,)
    torch._foreach_mul_(grads, [f for f, n in zip(factors, sizes) for _ in range(n)])


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

    # ---- data: 2 global + local_crops_number local crops of every image, block masks for the global ones
    transform = MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                      args.global_crops_size, args.local_crops_size, args.photometric,
                                      args.blur_radius)
    dataset = build_dataset(args.data, transform, "train", args.on_bad_image)
    grid = args.global_crops_size // args.patch_size                              # masks are drawn in the workers
    collate = functools.partial(collate_multicrop, mask_generator=BlockMaskGenerator(grid),
                                mask_ratio=args.mask_ratio, mask_probability=args.mask_probability)
    global_batch, iters_per_epoch, total_iters = run_length(args, len(dataset), world_size)

    # ---- student, teacher, optimiser, the centres
    student, teacher = build_networks(args)
    if args.pretrained_weights:
        load_pretrained(args.pretrained_weights, student, teacher)    # backbones only: the heads start fresh
    student, teacher = student.to(device), teacher.to(device)
    model = distribute(student, teacher, args, world_size, bf16)
    optimizer = torch.optim.AdamW(param_groups(student, args.layerwise_decay, args.patch_embed_lr_mult), lr=0.0,
                                  fused=device.type == "cuda")
    center = torch.zeros(1, args.out_dim, device=device)                        # (1, K) EMA of teacher CLS scores
    patch_center = torch.zeros(1, args.ibot_out_dim if args.ibot_separate_head else args.out_dim,
                               device=device)                                   # (1, K') and of patch scores

    # ---- per-iteration schedules, as in the released recipe
    lr_schedule = cosine_schedule(args.lr * math.sqrt(global_batch / 1024), args.min_lr, args.epochs,
                                  iters_per_epoch, args.warmup_epochs)                  # square-root scaling rule
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, args.final_momentum_teacher, args.epochs,
                                        iters_per_epoch)
    teacher_temp_schedule = cosine_schedule(args.teacher_temp, args.teacher_temp, args.epochs, iters_per_epoch,
                                            args.warmup_teacher_temp_epochs, args.warmup_teacher_temp)  # per iteration

    start_it = resume_run(args, ckpt_path, total_iters, student, teacher, optimizer, center=center,
                          patch_center=patch_center)                    # 0 for a new run
    loader = run_loader(dataset, collate, args, rank, world_size, start_it, total_iters, device)
    if rank == 0:
        print(f"DINOv2 {args.arch}/{args.patch_size}: {len(dataset)} images, {world_size} process(es), global batch "
              f"{global_batch}, {args.out_dim} prototypes, {args.centering}, "
              f"{args.epochs} epochs of {iters_per_epoch} iterations, from iteration {start_it}, "
              f"precision {'bf16 autocast' if bf16 else 'float32'}", flush=True)
    progress = Progress(args, rank, world_size, device, start_it, iters_per_epoch, ckpt_path, dataset)

    # ---- the DINOv2 step, one iteration per batch
    for epoch, it, batch in progress.steps(loader):
        for g in optimizer.param_groups:
            g["lr"], g["weight_decay"] = lr_schedule[it] * g["lr_mult"], wd_schedule[it] * g["wd_mult"]
            if g["last_layer"] and epoch < args.freeze_last_layer_epochs:
                g["lr"] = 0.0                                           # prototypes fixed in the first epoch(s)
        teacher_temp = teacher_temp_schedule[it]
        m = batch["masks"]                                              # (M_glo*B, N) bool: patches to mask
        idx = m.flatten().nonzero().squeeze(1).to(device, non_blocking=True)  # (n_masked,) found on CPU: no sync
        w = patch_weights(m).to(device, non_blocking=True)              # (n_masked,)
        m = m.to(device, non_blocking=True)
        xg = batch["xg"].to(device, non_blocking=True)                  # (M_glo, B, 3, G, G) global views
        xl = batch["xl"].to(device, non_blocking=True)                  # (M_loc, B, 3, L, L) local views
        xg, xl = transform.on_device(xg, xl)                            # uint8 -> float views, --photometric
        with autocast:
            # the student sees xmg: xg with the patches in m swapped for the mask token (inside the ViT)
            zsg, Zsg, zsl, ysg = model(xg, idx, m, xl)                  # (M_glo, B, K), (n_masked, K'), (M_loc, B, K),
            with torch.no_grad():                                       # and (M_glo, B, D) backbone CLS for KoLeo
                ztg, Ztg = teacher(xg, idx)                             # (M_glo, B, K), (n_masked, K') unmasked views
                pt, Pt = teacher_targets(ztg, Ztg, teacher_temp, args.centering, center, patch_center,
                                         args.center_momentum)          # (M_glo, B, K), (n_masked, K') targets
            # (the local views' patch tokens enter no loss term: not computed)
            loss, dino_term, ibot_term, koleo_term = dinov2_loss(
                zsg, zsl, pt, Zsg, Pt, w, ysg, args.student_temp, args.dino_loss_weight, args.ibot_loss_weight,
                args.koleo_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            clip_gradients(student, args.clip_grad)
        optimizer.step()
        update_teacher(teacher, student, momentum_schedule[it])         # teacher <- EMA of the student

        progress.log(it, {"loss": loss, "dino": dino_term, "ibot": ibot_term, "koleo": koleo_term},
                     teacher_temp=teacher_temp, lr=lr_schedule[it], wd=wd_schedule[it], momentum=momentum_schedule[it])
        save_training_state(ckpt_path, args, it, iters_per_epoch, student, teacher, optimizer, center=center,
                            patch_center=patch_center)                  # when due
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
    p = argparse.ArgumentParser("DINOv2", description=__doc__, formatter_class=HelpFormatter)
    # Model
    p.add_argument("--arch", default="vit_small", choices=list(vit.ARCHS),
                   help="Backbone. The paper trains vit_base and vit_large on ImageNet-1k; vit_tiny is for CPU runs.")
    p.add_argument("--patch_size", default=16, type=Ranged(int, "[1, inf)"),
                   help="Patch size in pixels (Table 4: 16). Crop sizes must be multiples of it.")
    p.add_argument("--drop_path_rate", default=0.3, type=Ranged(float, "[0, 1)"),
                   help="""Stochastic depth of the student, in every block (see --drop_path_uniform) (Table 4, v2
                   family, and DINOv2's ssl_default_config: 0.3).""")
    p.add_argument("--drop_path_uniform", default=True, action=argparse.BooleanOptionalAction,
                   help="""The same drop-path rate in every block (DINOv2's default config) instead of one rising
                   linearly over the blocks (DINO).""")
    p.add_argument("--drop_path_mode", default="dinov2", choices=["dinov2", "dino"],
                   help="""The form of stochastic depth. dinov2 (the released DINOv2 code, which the SimDINOv2 release
                   shares): each block computes its attention and MLP branches on a random subset of exactly
                   max(int(B (1 - p)), 1) of each crop size's B samples only and adds them back scaled by B / subset,
                   which at p = 0.3 skips about 30%% of the blocks' compute. dino: DINO's per-sample drop path,
                   each sample dropped independently, every branch computed (the v1 methods' form).""")
    p.add_argument("--num_register_tokens", default=4, type=Ranged(int, "[0, inf)"),
                   help="""Register tokens (Darcet et al. 2024): 4, as the v2 family in the SimDINO paper's
                   comparison (Table 4). DINOv2's ssl_default_config has none: pass 0 for the original DINOv2.""")
    p.add_argument("--layerscale", default=1e-5, type=Ranged(float, "[0, inf)"),
                   help="""Initial layerscale of every residual branch (Table 4 and DINOv2's ssl_default_config:
                   1e-5). 0 disables.""")
    p.add_argument("--interpolate_offset", default=0.0, type=Ranged(float, "[0, 1)"),
                   help="""How the position embeddings are resized for crops of another size (the 96 px local
                   crops): 0 resizes to the grid exactly, as SimDINOv2's configs and DINOv2's register models do;
                   0.1 is DINOv2's ssl_default_config and DINO (bicubic with scale_factor (grid + 0.1) / stored
                   grid).""")
    p.add_argument("--interpolate_antialias", default=True, action=argparse.BooleanOptionalAction,
                   help="""Anti-aliased bicubic resizing of the position embeddings (SimDINOv2's configs and
                   DINOv2's register models: on; DINOv2's ssl_default_config and DINO: off).""")
    p.add_argument("--proj_hidden_dim", default=2048, type=Ranged(int, "[1, inf)"),
                   help="Hidden width of the 3-layer head MLP (released: 2048).")
    p.add_argument("--proj_dim", default=256, type=Ranged(int, "[1, inf)"),
                   help="""Bottleneck dimension: the head MLP's output, L2-normalised before the prototype layer
                   (released: 256). A separate iBOT head has the same MLP.""")
    p.add_argument("--out_dim", default=65536, type=Ranged(int, "[1, inf)"),
                   help="""Number K of prototypes of the DINO head, the size of its softmax (Table 4 and
                   ssl_default_config: 65536).""")
    p.add_argument("--ibot_separate_head", default=False, action=argparse.BooleanOptionalAction,
                   help="""Give the iBOT loss its own head (and centre). Off: the masked patches go through the DINO
                   head, as DINOv2's ssl_default_config (ibot.separate_head: false); its LVD-142M configs separate
                   them.""")
    p.add_argument("--ibot_out_dim", default=65536, type=Ranged(int, "[1, inf)"),
                   help="Prototypes of the separate iBOT head (ssl_default_config: 65536). Unused with a shared head.")
    p.add_argument("--norm_last_layer", default=False, action=argparse.BooleanOptionalAction,
                   help="""Fix every prototype's norm g at 1 (DINO's norm_last_layer). DINOv2's DINOHead sets g = 1
                   at the start and then trains it like its other weights (default: off, as released).""")
    # Loss: targets, temperatures, weights
    p.add_argument("--centering", default="sinkhorn_knopp", choices=["sinkhorn_knopp", "centering"],
                   help="""How the teacher's scores become targets, for the CLS tokens and the masked patches alike.
                   'sinkhorn_knopp': 3 Sinkhorn-Knopp iterations over the global batch, as the SimDINO paper
                   describes DINOv2 (and DINOv2's large-scale configs set). 'centering': softmax of the scores minus
                   an EMA centre, as DINO; the default of DINOv2's ssl_default_config, i.e. of its ImageNet-1k
                   recipe.""")
    p.add_argument("--student_temp", default=0.1, type=Ranged(float, "(0, inf)"),
                   help="Student softmax temperature tau_s (released: 0.1).")
    p.add_argument("--warmup_teacher_temp", default=0.04, type=Ranged(float, "(0, inf)"),
                   help="Teacher temperature tau_t at the first iteration (Table 4 and ssl_default_config: 0.04).")
    p.add_argument("--teacher_temp", default=0.07, type=Ranged(float, "(0, inf)"),
                   help="Teacher temperature after the warm-up (Table 4 and ssl_default_config: 0.07).")
    p.add_argument("--warmup_teacher_temp_epochs", default=30, type=Ranged(int, "[0, inf)"),
                   help="""Epochs of linear teacher-temperature warm-up (Table 4 and ssl_default_config: 30). Per
                   iteration, as DINOv2's scheduler (DINO steps it once per epoch).""")
    p.add_argument("--center_momentum", default=0.9, type=Ranged(float, "[0, 1]"),
                   help="Momentum of the EMA centres of --centering centering, updated every step (released: 0.9).")
    p.add_argument("--freeze_last_layer_epochs", default=1, type=Ranged(int, "[0, inf)"),
                   help="""Epochs at the start in which the prototype layers get lr 0 (ssl_default_config: 1). As
                   released, their gradients still count in the clipping and in AdamW's moments.""")
    p.add_argument("--dino_loss_weight", default=1.0, type=Ranged(float, "[0, inf)"),
                   help="Weight of the DINO (CLS) term (ssl_default_config: 1).")
    p.add_argument("--ibot_loss_weight", default=1.0, type=Ranged(float, "[0, inf)"),
                   help="Weight of the iBOT (masked patch) term (ssl_default_config: 1).")
    p.add_argument("--koleo_loss_weight", default=0.1, type=Ranged(float, "[0, inf)"),
                   help="""Weight of the KoLeo term on the student's global-view CLS features (Table 4 and
                   ssl_default_config: 0.1). Taken per process, as released, so it depends on the per-GPU batch.""")
    # Masking (iBOT / DINOv2)
    p.add_argument("--mask_probability", default=0.5, type=Ranged(float, "[0, 1]"),
                   help="""Fraction of the global crops of a batch that get a block mask; the rest are unmasked
                   (DINOv2: 0.5).""")
    p.add_argument("--mask_ratio", default=(0.1, 0.5), type=Ranged(float, "[0, 1]"), nargs=2,
                   help="""Masked-patch ratios of the masked crops, spread uniformly over this range across the
                   batch (DINOv2: 0.1 0.5).""")
    # Teacher and optimisation
    p.add_argument("--momentum_teacher", default=0.992, type=Ranged(float, "[0, 1]"),
                   help="""Teacher EMA momentum at the start; it follows a cosine schedule to
                   --final_momentum_teacher (DINOv2: 0.992).""")
    p.add_argument("--final_momentum_teacher", default=1.0, type=Ranged(float, "[0, 1]"),
                   help="""Teacher EMA momentum at the end of the cosine schedule (DINOv2's name; 1 in every
                   released recipe). --momentum_teacher 0 --final_momentum_teacher 0: the teacher is the student
                   after every step, training without self-distillation (the paper's Table 9).""")
    p.add_argument("--lr", default=0.004, type=Ranged(float, "[0, inf)"),
                   help="""Peak learning rate for a global batch of 1024, scaled by sqrt(batch / 1024) (Table 4 and
                   ssl_default_config: 0.004, sqrt_wrt_1024). The optimiser is AdamW (betas 0.9, 0.999), as in
                   DINOv2.""")
    p.add_argument("--layerwise_decay", default=0.9, type=Ranged(float, "(0, 1]"),
                   help="""Block i of L gets lr x decay^(L + 1 - i); embeddings decay^(L + 1), head and final norm 1
                   (DINOv2: 0.9).""")
    p.add_argument("--patch_embed_lr_mult", default=0.2, type=Ranged(float, "[0, inf)"),
                   help="Extra lr factor of the patch embedding (DINOv2: 0.2).")
    p.add_argument("--min_lr", default=1e-6, type=Ranged(float, "[0, inf)"),
                   help="Learning rate at the end of the cosine schedule.")
    p.add_argument("--warmup_epochs", default=10, type=Ranged(int, "[0, inf)"),
                   help="Epochs of linear learning-rate warm-up from 0 (Table 4: 10).")
    p.add_argument("--weight_decay", default=0.04, type=Ranged(float, "[0, inf)"),
                   help="AdamW weight decay at the start (Table 4: 0.04).")
    p.add_argument("--weight_decay_end", default=0.4, type=Ranged(float, "[0, inf)"),
                   help="""Weight decay at the end; cosine schedule in between (Table 4: 0.4). Biases and norms get
                   none.""")
    p.add_argument("--clip_grad", default=3.0, type=Ranged(float, "[0, inf)"),
                   help="""Clip the gradient norm of the backbone, of the DINO head and of the iBOT head, each as a
                   whole, as DINOv2 does (3.0). 0 disables.""")
    p.add_argument("--batch_size_per_gpu", default=128, type=Ranged(int, "[1, inf)"),
                   help="""Images per process and step; the global batch is this times the number of processes
                   (Table 4: 128 x 8; DINOv2's ssl_default_config sets 64).""")
    p.add_argument("--epochs", default=100, type=Ranged(int, "[1, inf)"), help="Training epochs (Table 4: 100).")
    p.add_argument("--epoch_length", default="auto", type=Ranged(int_or_auto, "[1, inf)"),
                   help="""Iterations per epoch, the unit of --epochs and every per-epoch setting. 'auto': one pass
                   over the data (images // global batch). DINOv2's released recipe fixes 1,250 instead.""")
    # Multi-crop
    p.add_argument("--global_crops_scale", default=(0.4, 1.0), type=Ranged(float, "(0, 1]"), nargs=2,
                   help="""Area range of the 2 global crops, relative to the image (DINO: 0.4 1; ssl_default_config:
                   0.32 1).""")
    p.add_argument("--local_crops_scale", default=(0.05, 0.4), type=Ranged(float, "(0, 1]"), nargs=2,
                   help="Area range of the local crops (DINO: 0.05 0.4; ssl_default_config: 0.05 0.32).")
    p.add_argument("--local_crops_number", default=10, type=Ranged(int, "[0, inf)"),
                   help="Local crops per image, seen by the student only (Table 4: 10; ssl_default_config: 8).")
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
    """Every flag is checked here, once, before anything is built or written: a bad value stops the run with
    one line that names the flag, the value and the valid range."""
    check_shared_args(args)
    if args.koleo_loss_weight and args.batch_size_per_gpu < 2:
        fail(f"--batch_size_per_gpu {args.batch_size_per_gpu} leaves KoLeo no nearest neighbour (it is taken per "
             f"process and crop): use at least 2 images per process, or --koleo_loss_weight 0")
    if args.mask_ratio[0] > args.mask_ratio[1]:
        fail(f"--mask_ratio {args.mask_ratio[0]} {args.mask_ratio[1]} must be given as min max (DINOv2: 0.1 0.5)")
    if args.ibot_loss_weight and not (args.mask_probability > 0 and args.mask_ratio[1] > 0):
        fail(f"--ibot_loss_weight {args.ibot_loss_weight} needs masked patches, but --mask_probability "
             f"{args.mask_probability} --mask_ratio {args.mask_ratio[0]} {args.mask_ratio[1]} masks none: raise them "
             f"(DINOv2: 0.5 and 0.1 0.5) or pass --ibot_loss_weight 0")


if __name__ == "__main__":
    stop_on_signals()
    try:
        train(get_args())
    except (DataError, vit.CheckpointError) as e:
        fail(e)
    except Exception as e:
        stop_if_peer_lost(e)
        raise
