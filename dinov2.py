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

    python dinov2.py                                       # embedded synthetic dataset, CPU or one GPU
    torchrun --nproc_per_node=8 dinov2.py --data /path/to/imagenet --output_dir out/dinov2
"""
import argparse
import copy
import functools
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
from data import BlockMaskGenerator, DataError, MultiCropAugmentation, build_dataset, collate_multicrop


def get_args(argv=None):
    p = argparse.ArgumentParser("DINOv2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--arch", default="vit_small", choices=list(vit.ARCHS),
                   help="Backbone size. The paper trains vit_base and vit_large on ImageNet-1k; vit_tiny is for CPU smoke runs.")
    p.add_argument("--patch_size", default=16, type=int,
                   help="Patch size in pixels (Table 4: 16). Crop sizes must be multiples of it.")
    p.add_argument("--drop_path_rate", default=0.3, type=float,
                   help="""Stochastic depth of the student, in every block (see --drop_path_uniform) (Table 4, v2 family, and
                   DINOv2's ssl_default_config: 0.3).""")
    p.add_argument("--drop_path_uniform", default=True, action=argparse.BooleanOptionalAction,
                   help="""The same drop-path rate in every block (DINOv2's default config) instead of one rising
                   linearly over the blocks (DINO).""")
    p.add_argument("--num_register_tokens", default=4, type=int,
                   help="""Register tokens (Darcet et al. 2024): 4, as the v2 family in the SimDINO paper's comparison
                   (Table 4). DINOv2's ssl_default_config has none: pass 0 for the original DINOv2.""")
    p.add_argument("--layerscale", default=1e-5, type=float,
                   help="Initial layerscale of every residual branch (Table 4 and DINOv2's ssl_default_config: 1e-5). 0 disables.")
    p.add_argument("--pos_embed_antialias", default=True, action=argparse.BooleanOptionalAction,
                   help="""Anti-aliased bicubic interpolation of the position embeddings for other crop sizes (v2 family
                   with registers, Table 4; DINOv2's ssl_default_config: off).""")
    p.add_argument("--proj_hidden_dim", default=2048, type=int, help="Hidden width of the 3-layer head MLP (released: 2048).")
    p.add_argument("--proj_dim", default=256, type=int,
                   help="""Bottleneck dimension: the head MLP's output, L2-normalised before the prototype layer
                   (released: 256). A separate iBOT head has the same MLP.""")
    p.add_argument("--out_dim", default=65536, type=int,
                   help="Number K of prototypes of the DINO head, the size of its softmax (Table 4 and ssl_default_config: 65536).")
    p.add_argument("--ibot_separate_head", default=False, action=argparse.BooleanOptionalAction,
                   help="""Give the iBOT loss its own head (and centre). Off: the masked patches go through the DINO head,
                   as DINOv2's ssl_default_config (ibot.separate_head: false); its LVD-142M configs separate them.""")
    p.add_argument("--ibot_out_dim", default=65536, type=int,
                   help="Prototypes of the separate iBOT head (ssl_default_config: 65536). Unused with a shared head.")
    p.add_argument("--norm_last_layer", default=False, action=argparse.BooleanOptionalAction,
                   help="""Fix every prototype's norm g at 1 (DINO's norm_last_layer). DINOv2's DINOHead sets g = 1 at
                   the start and then trains it like its other weights (default: off, as released).""")
    # Loss: targets, temperatures, weights
    p.add_argument("--centering", default="sinkhorn_knopp", choices=["sinkhorn_knopp", "centering"],
                   help="""How the teacher's scores become targets, for the CLS tokens and the masked patches alike.
                   'sinkhorn_knopp': 3 Sinkhorn-Knopp iterations over the global batch, as the SimDINO paper describes
                   DINOv2 (and DINOv2's large-scale configs set). 'centering': softmax of the scores minus an EMA
                   centre, as DINO; the default of DINOv2's ssl_default_config, i.e. of its ImageNet-1k recipe.""")
    p.add_argument("--student_temp", default=0.1, type=float, help="Student softmax temperature tau_s (released: 0.1).")
    p.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                   help="Teacher temperature tau_t at the first iteration (Table 4 and ssl_default_config: 0.04).")
    p.add_argument("--teacher_temp", default=0.07, type=float,
                   help="Teacher temperature after the warm-up (Table 4 and ssl_default_config: 0.07).")
    p.add_argument("--warmup_teacher_temp_epochs", default=30, type=int,
                   help="""Epochs of linear teacher-temperature warm-up (Table 4 and ssl_default_config: 30). Per
                   iteration, as DINOv2's scheduler (DINO steps it once per epoch).""")
    p.add_argument("--center_momentum", default=0.9, type=float,
                   help="Momentum of the EMA centres of --centering centering, updated every step (released: 0.9).")
    p.add_argument("--freeze_last_layer_epochs", default=1, type=int,
                   help="""Epochs at the start in which the prototype layers get lr 0 (ssl_default_config: 1). As
                   released, their gradients still count in the clipping and in AdamW's moments.""")
    p.add_argument("--dino_loss_weight", default=1.0, type=float, help="Weight of the DINO (CLS) term (ssl_default_config: 1).")
    p.add_argument("--ibot_loss_weight", default=1.0, type=float, help="Weight of the iBOT (masked patch) term (ssl_default_config: 1).")
    p.add_argument("--koleo_loss_weight", default=0.1, type=float,
                   help="""Weight of the KoLeo term on the student's global-view CLS features (Table 4 and
                   ssl_default_config: 0.1). Taken per process, as released, so it depends on the per-GPU batch.""")
    # Masking (iBOT / DINOv2)
    p.add_argument("--mask_probability", default=0.5, type=float,
                   help="Fraction of the global crops of a batch that get a block mask; the rest are unmasked (DINOv2: 0.5).")
    p.add_argument("--mask_ratio", default=(0.1, 0.5), type=float, nargs=2,
                   help="Masked-patch ratios of the masked crops, spread uniformly over this range across the batch (DINOv2: 0.1 0.5).")
    # Teacher and optimisation
    p.add_argument("--momentum_teacher", default=0.992, type=float,
                   help="Teacher EMA momentum at the start; it follows a cosine schedule to 1 (DINOv2: 0.992).")
    p.add_argument("--lr", default=0.004, type=float,
                   help="""Peak learning rate for a global batch of 1024, scaled by sqrt(batch / 1024) (Table 4 and
                   ssl_default_config: 0.004, sqrt_wrt_1024). The optimiser is AdamW (betas 0.9, 0.999), as in DINOv2.""")
    p.add_argument("--layerwise_decay", default=0.9, type=float,
                   help="Block i of L gets lr x decay^(L + 1 - i); embeddings decay^(L + 1), head and final norm 1 (DINOv2: 0.9).")
    p.add_argument("--patch_embed_lr_mult", default=0.2, type=float,
                   help="Extra lr factor of the patch embedding (DINOv2: 0.2).")
    p.add_argument("--min_lr", default=1e-6, type=float, help="Learning rate at the end of the cosine schedule.")
    p.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear learning-rate warm-up from 0 (Table 4: 10).")
    p.add_argument("--weight_decay", default=0.04, type=float, help="AdamW weight decay at the start (Table 4: 0.04).")
    p.add_argument("--weight_decay_end", default=0.4, type=float,
                   help="Weight decay at the end; cosine schedule in between (Table 4: 0.4). Biases and norms get none.")
    p.add_argument("--clip_grad", default=3.0, type=float,
                   help="""Clip the gradient norm of the backbone, of the DINO head and of the iBOT head, each as a whole,
                   as DINOv2 does (3.0). 0 disables.""")
    p.add_argument("--batch_size_per_gpu", default=128, type=int,
                   help="""Images per process and step; the global batch is this times the number of processes
                   (Table 4: 128 x 8; DINOv2's ssl_default_config sets 64).""")
    p.add_argument("--epochs", default=100, type=int, help="Training epochs (Table 4: 100).")
    # Multi-crop
    p.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                   help="Area range of the 2 global crops, relative to the image (DINO: 0.4 1; ssl_default_config: 0.32 1).")
    p.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                   help="Area range of the local crops (DINO: 0.05 0.4; ssl_default_config: 0.05 0.32).")
    p.add_argument("--local_crops_number", default=10, type=int,
                   help="Local crops per image, seen by the student only (Table 4: 10; ssl_default_config: 8).")
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
    p.add_argument("--output_dir", default="out/dinov2", help="Where checkpoints and log.jsonl are written.")
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
                   help="bf16 autocast on CUDA (the prototype layers, the targets and the losses stay float32). Ignored on CPU.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model

class WeightNormLinear(nn.Module):
    """y = x W^T, W = g * V / ||V|| row by row (weight normalisation, Salimans & Kingma 2016), no bias.

    The prototype layer: row k of W is prototype k. `weight_v` (K, d) holds the directions and
    `weight_g` (K, 1) the norms, under the names of DINOv2's checkpoints. g starts at 1; DINOv2
    trains it (train_norm=True), DINO's norm_last_layer keeps it at 1 (train_norm=False).
    """

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
        x = F.normalize(self.mlp(x).float(), dim=-1)                # (..., d), unit norm
        with torch.autocast(x.device.type, enabled=False):          # float32: bf16 would round a score near 1 by up
            return self.last_layer(x)                               # to 0.004, i.e. 0.1 after / tau_t. (..., K)


class Network(nn.Module):
    """Backbone + DINO head (+ iBOT head). One call runs both crop sizes (one backbone pass per size).

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
        out = self.backbone.forward_features(xg.flatten(0, 1), m)
        ibot_head = self.dino_head if self.ibot_head is None else self.ibot_head
        yg = out["cls"].unflatten(0, xg.shape[:2])                                    # (M_glo, B, D) backbone CLS
        zg = self.dino_head(yg)                                                      # (M_glo, B, K)
        Zg = ibot_head(out["patches"].flatten(0, 1).index_select(0, idx))            # (n_masked, K')
        if xl is None:
            return zg, Zg
        return zg, Zg, self.dino_head(self.backbone(xl.flatten(0, 1)).unflatten(0, xl.shape[:2])), yg  # + (M_loc, B, K)


def build_networks(args):
    """Student and teacher start identical; the teacher is never trained by gradients."""
    backbone = vit.build_vit(args.arch, patch_size=args.patch_size, drop_path_rate=args.drop_path_rate,
                             img_size=args.global_crops_size, num_register_tokens=args.num_register_tokens,
                             drop_path_uniform=args.drop_path_uniform, layerscale=args.layerscale or None,
                             pos_embed_antialias=args.pos_embed_antialias)
    backbone.grad_checkpointing = args.grad_checkpointing  # the student recomputes in backward; the teacher (eval) never
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
        n_all = s.new_full((), float(n))                                           # samples on all processes
        top = s.amax(dim=0) if n else s.new_full((K,), -math.inf)                  # (K,) best score of each prototype
        if dist.is_initialized():
            dist.all_reduce(n_all)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        # row k scaled by exp(-top_k / temp): the first row normalisation undoes that exactly, so the targets are
        # DINOv2's exp(s / temp) ones, but exp cannot overflow (float32 does past s / temp = 88) and no row is all 0
        Q = torch.exp((s - top) / temp).T                                          # (K, n)
        total = Q.sum()
        if dist.is_initialized():
            dist.all_reduce(total)
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
        ps = F.log_softmax(zs / student_temp, dim=-1)                                # (M, B, K) log student probabilities
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
    koleo_term = sum(koleo_loss(y) for y in ysg)                                     # per crop: never 2 views of an image
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
    to norm <= max_norm."""
    for part in (model.backbone, model.dino_head, model.ibot_head):
        if part is not None:                      # no iBOT head of its own when it shares the DINO head
            torch.nn.utils.clip_grad_norm_([p for p in part.parameters() if p.grad is not None], max_norm)


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
    if args.koleo_loss_weight and args.batch_size_per_gpu < 2:
        fail(f"--batch_size_per_gpu {args.batch_size_per_gpu} leaves KoLeo no nearest neighbour (it is taken per "
             f"process and crop): use at least 2 images per process, or --koleo_loss_weight 0")
    if not 0 <= args.mask_probability <= 1 or not 0 <= args.mask_ratio[0] <= args.mask_ratio[1] <= 1:
        fail(f"--mask_probability {args.mask_probability} and --mask_ratio {args.mask_ratio[0]} {args.mask_ratio[1]} "
             f"must lie in [0, 1], the ratio as min max (DINOv2: 0.5 and 0.1 0.5)")
    if args.ibot_loss_weight and not (args.mask_probability > 0 and args.mask_ratio[1] > 0):
        fail(f"--ibot_loss_weight {args.ibot_loss_weight} needs masked patches, but --mask_probability "
             f"{args.mask_probability} --mask_ratio {args.mask_ratio[0]} {args.mask_ratio[1]} masks none: raise them "
             f"(DINOv2: 0.5 and 0.1 0.5) or pass --ibot_loss_weight 0")
    for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
        if not getattr(args, name) > 0:
            fail(f"--{name} {getattr(args, name)} must be positive (the scores are divided by it)")
    for name in ("out_dim", "ibot_out_dim"):
        if getattr(args, name) < 1:
            fail(f"--{name} {getattr(args, name)} must be a positive number of prototypes (released: 65536)")
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
    grid = args.global_crops_size // args.patch_size                              # masks are drawn in the workers
    collate = functools.partial(collate_multicrop, mask_generator=BlockMaskGenerator(grid),
                                mask_ratio=args.mask_ratio, mask_probability=args.mask_probability)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=use_cuda, drop_last=True,
                                         collate_fn=collate)
    iters_per_epoch = len(loader)
    global_batch = args.batch_size_per_gpu * world_size
    if iters_per_epoch == 0:
        fail(f"{len(dataset)} images are fewer than one global batch of {global_batch}: lower --batch_size_per_gpu")

    # ---- student, teacher, optimiser
    student, teacher = build_networks(args)
    student, teacher = student.to(device), teacher.to(device)
    model = distribute(student, teacher, args, world_size)
    optimizer = torch.optim.AdamW(param_groups(student, args.layerwise_decay, args.patch_embed_lr_mult), lr=0.0,
                                  fused=use_cuda)
    center = torch.zeros(1, args.out_dim, device=device)                                # (1, K) EMA of teacher CLS scores
    patch_center = torch.zeros(1, args.ibot_out_dim if args.ibot_separate_head else args.out_dim,
                               device=device)                                           # (1, K') and of patch scores

    # ---- per-iteration schedules, as in the released recipe
    lr_schedule = cosine_schedule(args.lr * math.sqrt(global_batch / 1024), args.min_lr, args.epochs, iters_per_epoch,
                                  args.warmup_epochs)                                   # square-root scaling rule
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
    teacher_temp_schedule = cosine_schedule(args.teacher_temp, args.teacher_temp, args.epochs, iters_per_epoch,
                                            args.warmup_teacher_temp_epochs, args.warmup_teacher_temp)  # per iteration

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start_epoch = 0
    if args.resume:
        ckpt = load_training_state(ckpt_path if args.resume == "auto" else args.resume, student, teacher,
                                   optimizer)
        center.copy_(ckpt["center"])
        patch_center.copy_(ckpt["patch_center"])
        start_epoch = ckpt["epoch"]
        del ckpt
    if rank == 0:
        print(f"DINOv2 {args.arch}/{args.patch_size}: {len(dataset)} images, {world_size} process(es), global batch "
              f"{global_batch}, {iters_per_epoch} it/epoch, {args.out_dim} prototypes, {args.centering}, "
              f"from epoch {start_epoch}")
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
                if g["last_layer"] and epoch < args.freeze_last_layer_epochs:
                    g["lr"] = 0.0                                           # prototypes fixed in the first epoch(s)
            teacher_temp = teacher_temp_schedule[it]

            m = batch["masks"]                                              # (M_glo*B, N) bool: patches to mask
            idx = m.flatten().nonzero().squeeze(1).to(device, non_blocking=True)  # (n_masked,) found on CPU: no sync
            w = patch_weights(m).to(device, non_blocking=True)              # (n_masked,)
            m = m.to(device, non_blocking=True)
            xg = batch["xg"].to(device, non_blocking=True)                  # (M_glo, B, 3, G, G) global views
            xl = batch["xl"].to(device, non_blocking=True)                  # (M_loc, B, 3, L, L) local views
            xg, xl = transform.on_device(xg, xl)                            # uint8 -> float views: --photometric, normalised
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
            with torch.no_grad():                                           # teacher <- EMA of the student
                momentum = momentum_schedule[it]
                torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)
            bad += ~torch.isfinite(loss)
            done += 1

            if (i + 1) % args.log_every == 0 or i + 1 == iters_per_epoch:
                stats = torch.stack([loss.detach().float(), dino_term.float(), ibot_term.float(), koleo_term.float(),
                                     bad.float()])
                if world_size > 1:
                    dist.all_reduce(stats)
                    stats[:4] /= world_size
                loss_v, dino_v, ibot_v, koleo_v, bad_v = stats.tolist()
                if bad_v > 0:
                    fail(f"loss is not finite at iteration {it} (epoch {epoch}): stopping. The last good checkpoint "
                         f"is {ckpt_path}; resume it with --resume and a lower --lr or --teacher_temp")
                ips = done * global_batch / (time.time() - t0)
                record = {"iteration": it, "epoch": epoch, "time": time.time(), "loss": loss_v, "dino": dino_v, "ibot": ibot_v,
                          "koleo": koleo_v, "teacher_temp": teacher_temp,
                          "lr": lr_schedule[it], "wd": wd_schedule[it], "momentum": momentum, "images_per_s": ips,
                          "skipped_images": getattr(dataset, "num_skipped", 0)}
                if rank == 0:
                    bar.set_postfix(loss=f"{loss_v:.4f}", dino=f"{dino_v:.4f}", ibot=f"{ibot_v:.4f}", koleo=f"{koleo_v:.2f}",
                                    lr=f"{lr_schedule[it]:.2e}", img_s=f"{ips:.0f}")
                    log.write(json.dumps(record) + "\n")
                    log.flush()

        # ---- checkpoint (every process takes part in gathering the full state dicts)
        state = {"student": get_model_state_dict(student, options=full),
                 "teacher": get_model_state_dict(teacher, options=full),
                 "optimizer": get_optimizer_state_dict(student, optimizer, options=full),
                 "center": center.cpu(), "patch_center": patch_center.cpu(),
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
