"""The Vision Transformer that simdino.py, simdinov2.py, dino.py and dinov2.py share.

A plain pre-norm ViT (Dosovitskiy et al. 2021) as the DINO and DINOv2 authors use it,
with the options the four recipes need: register tokens (Darcet et al. 2024),
layerscale, stochastic depth (DINO's per-sample form, or DINOv2's on a subset of the batch),
a learned mask token for masked image modelling, and position embeddings interpolated to any
crop size so 224 px global and 96 px local crops go through one model (bicubic, in DINO's or
DINOv2's exact form: `interpolate_offset`, `interpolate_antialias`). Attention runs through
`F.scaled_dot_product_attention`'s fused kernels on GPU, and as two matmuls on a CPU computing in
bf16, where that is faster (`attention`).

Parameter names follow the DINO and DINOv2 releases (`cls_token`, `pos_embed`,
`patch_embed.proj`, `blocks.i.attn.qkv`, `blocks.i.ls1.gamma`, `register_tokens`,
`mask_token`, `norm`), so the authors' checkpoints load without renaming:

    model = vit_from_checkpoint("dinov2_vits14_reg4_pretrain.pth")   # architecture and interpolation read off it
    model = vit_small(patch_size=16); load_checkpoint(model, "out/checkpoint.pth")
    cls = model(images)                                # (B, D) final-norm CLS feature
    out = model.forward_features(images)               # dict: cls (B, D), registers (B, R, D), patches (B, N, D)
    g, l = model.forward_features_list([xg, xl])       # two crop sizes (dicts as above) in one pass over the blocks
"""
import argparse
import math
import pickle
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded into the model asked for (one-line message)."""


# ----------------------------------------------------------------------------- modules

def bf16_native(device):
    """Whether the device computes bf16 natively, which makes bf16 autocast worth it: a CUDA GPU of compute
    capability 8.0 or later (A100, H100, ...), or a CPU with bf16 instructions, AMX (Xeons since Sapphire Rapids)
    or AVX512-BF16 (Cooper Lake, AMD Zen 4 and later), as the CPU reports them to PyTorch (torch.cpu's capability
    flags, which ask the CPU itself). Elsewhere bf16 is emulated: slower than float32, with nothing to gain."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    flags = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")   # torch.cpu's; private: a missing one is False
    return device.type == "cpu" and any(getattr(torch.cpu, f, lambda: False)() for f in flags)


def drop_path(x, p, training: bool):
    """Stochastic depth as DINO (and timm) write it: drop the residual branch of each sample independently with
    probability p (0-dim tensor), the kept ones scaled by 1 / (1 - p). Every sample's branch is computed."""
    if not training:
        return x
    keep = (torch.rand(x.shape[0], *(1,) * (x.ndim - 1), device=x.device) >= p).to(x.dtype)  # (B, 1, 1)
    return x * keep / (1 - p)


def bernoulli_drop_path(x, p):
    """DINOv2's per-sample form (its DropPath): a Bernoulli(1 - p) draw per sample, divided by 1 - p, in x's dtype.
    The same distribution as drop_path, drawn with another RNG call."""
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - p).div_(1 - p)     # (B, 1, 1)
    return x * keep


def subset_residual(x, branch, p):
    """x + branch(x) with the branch computed on a random subset of exactly max(int(B (1 - p)), 1) of the B samples
    only, and added back scaled by B / subset, so that over the draws its expectation is x + branch(x): DINOv2's
    stochastic depth (drop_add_residual_stochastic_depth), which skips the compute of the dropped samples.
    (B, N, D) -> (B, N, D); the subset is torch.randperm's on x's device, as released."""
    keep = draw_subset(x.shape[0], p, x.device)                                    # (k,) the samples kept
    residual = branch(x[keep]).flatten(1).to(x.dtype)                              # (k, N*D)
    return torch.index_add(x.flatten(1), 0, keep, residual, alpha=x.shape[0] / len(keep)).view_as(x)


@torch.compiler.disable
def draw_subset(b, p, device):
    """torch.randperm(b)[:max(int(b (1 - p)), 1)] on the device, as DINOv2 draws it; outside torch.compile, whose
    graphs would otherwise be specialised on each block's rate (one compile per block under rates rising linearly)."""
    return torch.randperm(b, device=device)[:max(int(b * (1 - p)), 1)]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 or better whatever the dtype of its parameters, as CUDA's autocast runs it:
    under FSDP2's bf16 parameters the float32 residual stream is normalised with float32 weights, on any device
    (the CPU's layer_norm takes no bf16 weights for float32 inputs)."""

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q, k, v (B, heads, N, d), exact, in the formulation fastest where it runs:
    F.scaled_dot_product_attention (its fused flash / memory-efficient kernels) on CUDA, and on the CPU in float32;
    on the CPU in bf16, two batched matmuls around a softmax, which run on the CPU's bf16 matrix units while
    PyTorch's CPU flash kernel is 1.5-4x slower at the 5-257 tokens of this project's crops (docs/precision.md)."""
    if q.is_cuda or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v)
    return explicit_attention(q, k, v)


def explicit_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out: (B, heads, N, d) -> (B, heads, N, d), the scores (B, heads, N, N)
    held in memory (at 257 tokens, 0.13 MB per image and head in bf16)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                    # (B, heads, N, N)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)    # each (B, heads, N, C/heads)
        x = attention(q, k, v)                            # softmax(q k^T / sqrt(C/heads)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attention branch, then x + MLP branch, each branch behind stochastic depth
    of rate drop_path when training, in one of two forms (drop_path_mode):
    "dino": DINO's (and timm's) per-sample drop path (drop_path), every sample's branches computed;
    "dinov2": DINOv2's released rule, which computes the branches on the kept samples only (subset_residual):
    a list of batches (forward_features_list; DINOv2's forward_nested) takes the subset form at any rate above 0,
    each batch drawing its own subset, all the batches' attention draws before their MLP draws; a single batch
    takes it above 0.1 and DINOv2's per-sample Bernoulli form at or below (bernoulli_drop_path)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, layerscale=None,
                 drop_path_mode="dino"):
        super().__init__()
        if drop_path_mode not in ("dino", "dinov2"):
            raise ValueError(f"drop_path_mode '{drop_path_mode}': choose 'dino' or 'dinov2'")
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        # a buffer, not a float: torch.compile would specialise each block on its own rate and recompile per block
        self.register_buffer("drop_prob", torch.tensor(float(drop_path)), persistent=False)
        # DINOv2's form needs the subset size as a Python int (one compiled graph per distinct rate)
        self.drop_path_mode, self.drop_rate = drop_path_mode, float(drop_path)

    def forward(self, x):                                  # (B, N, D) tokens, or a list of such batches
        if self.drop_path_mode == "dinov2" and self.training and self.drop_rate > 0:
            return self.dinov2_stochastic_depth(x)
        if isinstance(x, list):   # several token counts (crop sizes) in one call: FSDP gathers the weights once
            return [self.residual_branches(t) for t in x]
        return self.residual_branches(x)

    def attn_branch(self, x):                              # (B, N, D) -> (B, N, D)
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x):                               # (B, N, D) -> (B, N, D)
        return self.ls2(self.mlp(self.norm2(x)))

    def residual_branches(self, x):                        # (B, N, D) -> (B, N, D)
        x = x + drop_path(self.attn_branch(x), self.drop_prob, self.training)
        x = x + drop_path(self.mlp_branch(x), self.drop_prob, self.training)
        return x

    def dinov2_stochastic_depth(self, x):                  # (B, N, D), or a list of such batches
        p = self.drop_rate
        if isinstance(x, list):   # each batch its own subset; the compute draws nothing, so the draws' order is
            x = [subset_residual(t, self.attn_branch, p) for t in x]   # DINOv2's: all attention subsets, then
            return [subset_residual(t, self.mlp_branch, p) for t in x]  # all MLP subsets
        if p > 0.1:               # DINOv2's threshold: below it the indexing costs about what the subset saves
            x = subset_residual(x, self.attn_branch, p)
            return subset_residual(x, self.mlp_branch, p)
        x = x + bernoulli_drop_path(self.attn_branch(x), p)
        return x + bernoulli_drop_path(self.mlp_branch(x), p)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):                                  # (B, 3, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)     # (B, H/p * W/p, D)


def resize_pos_embed(pos_embed, h, w, offset, antialias):
    """(1, 1 + g*g, D) position embeddings of a g x g grid -> (1, 1 + h*w, D), bicubic, in the two forms of the
    released code. offset > 0 (DINO, SimDINO, DINOv2's default config, offset 0.1): F.interpolate with
    scale_factor (h + offset) / g, so the kernel samples the grid at a stretch of (h + offset) / g, not h / g;
    DINO added the offset against rounding the output size down. offset 0 (DINOv2's register models,
    SimDINOv2): F.interpolate with size (h, w). antialias low-pass filters when shrinking (DINOv2's
    interpolate_antialias). The CLS position is kept as is. Computed in float32 or better, returned in the
    input's dtype.
    """
    g = math.isqrt(pos_embed.shape[1] - 1)
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dtype = torch.promote_types(pos_embed.dtype, torch.float32)
    patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).to(dtype)          # (1, D, g, g)
    resize = {"scale_factor": ((h + offset) / g, (w + offset) / g)} if offset else {"size": (h, w)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **resize)  # (1, D, h, w)
    if patch_pos.shape[-2:] != (h, w):
        raise ValueError(f"interpolate_offset {offset} resizes a {g}x{g} grid to {tuple(patch_pos.shape[-2:])}, "
                         f"not {h}x{w}: use an offset in [0, 1)")
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, drop_path_uniform=False, layerscale=None,
                 num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False, grad_checkpointing=False,
                 drop_path_mode="dino"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        # how position embeddings are resized to other grids: see resize_pos_embed (defaults: DINO's and DINOv2's)
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        # recompute each block's activations in backward instead of keeping them: a block's inputs are all
        # that training stores, for about a third more compute (one more forward). A plain attribute: set it any time.
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))  # CLS + patches, no registers
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # stochastic depth: rising linearly to drop_path_rate over the blocks (DINO), or the same in all (DINOv2);
        # drop_path_mode: DINO's per-sample form or DINOv2's subset form (Block)
        dpr = [drop_path_rate if drop_path_uniform else drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], layerscale,
                                          drop_path_mode) for i in range(depth))
        self.norm = LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """Position embeddings for an h x w patch grid, (1, 1 + h*w, D): the stored grid as is, or resized."""
        g = math.isqrt(self.pos_embed.shape[1] - 1)
        if h == g and w == g:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, h, w, self.interpolate_offset, self.interpolate_antialias)

    def prepare_tokens(self, x, masks=None):
        """(B, 3, H, W) images -> (B, 1 + R + N, D) tokens; masks (B, N) bool swaps patches for the mask token."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}: "
                             f"use crop sizes that are multiples of {p}")
        x = self.patch_embed(x)                                                       # (B, N, D)
        autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        if autocast:          # the residual stream stays float32 under autocast, FSDP2's bf16 parameters included:
            x = x.float()     # only the blocks' matmuls run in bf16
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)                   # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(H // p, W // p)
        if self.register_tokens is not None:                                          # registers carry no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def run_block(self, blk, x):
        """blk(x) (x a batch of tokens or a list of them), or under grad_checkpointing (training with autograd
        on) the same through torch.utils.checkpoint: the non-reentrant kind, which works with torch.compile'd
        blocks and FSDP2, and which replays the RNG so that drop path drops the same samples in the recompute."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features_list(self, xs, masks=None):
        """forward_features of several batches of images at once, e.g. the global and the local crops (DINOv2's
        forward_features_list): every block takes all of them in one call, so that under FSDP2 each block's
        weights are gathered once in forward and once in backward, not once per crop size."""
        x = [self.prepare_tokens(t, m) for t, m in zip(xs, masks or [None] * len(xs))]  # each (B_i, 1 + R + N_i, D)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return [self.final_tokens(t) for t in x]

    def forward_features(self, x, masks=None):
        """(B, 3, H, W) -> dict of final-norm tokens: cls (B, D), registers (B, R, D), patches (B, N, D)."""
        x = self.prepare_tokens(x, masks)                                             # (B, 1 + R + N, D)
        for blk in self.blocks:                       # blocks take a batch, not a list of one (DINOv2's stochastic
            x = self.run_block(blk, x)                # depth tells the two apart, as its forward_features does)
        return self.final_tokens(x)

    def final_tokens(self, x):
        """(B, 1 + R + N, D) tokens after the last block -> dict of the final-norm cls, registers and patches."""
        x, r = self.norm(x), 1 + self.num_register_tokens
        return {"cls": x[:, 0], "registers": x[:, 1:r], "patches": x[:, r:]}

    def get_intermediate_layers(self, x, n=1):
        """Final-norm outputs (B, 1 + R + N, D) of the last n blocks, as linear probes use them."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = self.run_block(blk, x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def forward(self, x, masks=None):
        return self.forward_features(x, masks)["cls"]                                 # (B, D)


# ----------------------------------------------------------------------------- sizes

ARCHS = {  # name: (embed_dim, depth, num_heads), the DeiT / ViT sizes used by DINO and DINOv2
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def build_vit(arch, **kwargs):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}': choose one of {', '.join(ARCHS)}")
    dim, depth, heads = ARCHS[arch]
    return VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, **kwargs)


def vit_tiny(**kwargs):
    return build_vit("vit_tiny", **kwargs)


def vit_small(**kwargs):
    return build_vit("vit_small", **kwargs)


def vit_base(**kwargs):
    return build_vit("vit_base", **kwargs)


def vit_large(**kwargs):
    return build_vit("vit_large", **kwargs)


# ----------------------------------------------------------------------------- checkpoints

def backbone_state_dict(checkpoint, which="teacher"):
    """The ViT weights, in this file's names, out of any checkpoint layout we support.

    Accepts a bare backbone state dict (DINO / DINOv2 hub files), a training checkpoint
    holding `teacher` / `student` (DINO, DINOv2, SimDINO, SimDINOv2 and this project's
    scripts) or `model` / `state_dict`, with `module.` (DDP), `_orig_mod.` (torch.compile)
    and `backbone.` prefixes, and DINOv2's FSDP block chunks (`blocks.<chunk>.<i>.`).
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict: pass a "
                              f"DINO / DINOv2 / SimDINO / SimDINOv2 or this project's checkpoint")
    sd = checkpoint
    networks = [k for k in ("teacher", "student") if isinstance(sd.get(k), dict)]
    if which in networks:
        sd = sd[which]
    elif networks:
        raise CheckpointError(f"the checkpoint holds no '{which}' network, only {' and '.join(networks)}")
    else:
        sd = next((sd[k] for k in ("model", "state_dict") if isinstance(sd.get(k), dict)), sd)
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k.replace("module.", "").replace("_orig_mod.", "")
        out[k] = v
    if any(k.startswith("backbone.") for k in out):  # heads (head., dino_head., ibot_head.) are not the ViT
        out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in out.items()}


def describe(model):
    layerscale = "on" if isinstance(model.blocks[0].ls1, LayerScale) else "off"
    return (f"ViT width {model.embed_dim}, depth {len(model.blocks)}, patch {model.patch_size}, "
            f"{model.num_register_tokens} registers, layerscale {layerscale}")


def load_state_dict(model, sd):
    """Load backbone weights, resizing `pos_embed` if only the stored grid differs.

    The resize is the model's own (resize_pos_embed with its offset and antialias), so a
    checkpoint stored at 518 px loaded into a 224 px model gives, at 224 px, the position
    embeddings the released code interpolates at run time. A missing `mask_token` is allowed
    (DINO checkpoints have none; it only matters for masked training). Anything else that
    does not match raises a one-line CheckpointError.
    """
    own = model.state_dict()
    sd = dict(sd)
    pe = sd.get("pos_embed")
    if pe is not None and pe.shape != own["pos_embed"].shape and pe.shape[-1] == own["pos_embed"].shape[-1]:
        g, g_new = math.isqrt(pe.shape[1] - 1), math.isqrt(own["pos_embed"].shape[1] - 1)
        if g * g == pe.shape[1] - 1:  # the checkpoint was trained at another resolution: resize its grid
            sd["pos_embed"] = resize_pos_embed(pe.float(), g_new, g_new, model.interpolate_offset,
                                               model.interpolate_antialias)
    missing = [k for k in own if k not in sd and k != "mask_token"]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} {lst[:3]}{' ...' if len(lst) > 3 else ''}"
                 for name, lst in (("missing", missing), ("unexpected", unexpected),
                                   ("shape (checkpoint vs model)", wrong)) if lst]
        raise CheckpointError(f"checkpoint does not fit the model ({describe(model)}): {'; '.join(parts)}; "
                              f"build the model with the checkpoint's architecture (or use vit_from_checkpoint)")
    model.load_state_dict(sd, strict=False)
    return model


def checkpoint_globals():
    """What torch.load(weights_only=True) may build beyond tensors, for the training checkpoints of DINO's
    main_dino.py and the SimDINO release: their args are an argparse.Namespace, and their optimizer state keeps
    each param group's lr and weight_decay as numpy float64 scalars (read off numpy schedule arrays). torch.save
    pickles such a scalar as numpy.core.multiarray.scalar (numpy 1.x) or numpy._core.multiarray.scalar (numpy 2.x)
    called on a numpy.dtype whose state is then set (the concrete class: numpy.dtypes.Float64DType on numpy 2.x).
    Both module names are allowed, so a file written under either numpy loads under the other. Only numeric
    dtypes: no object arrays, no numpy arrays, nothing that calls code."""
    import numpy as np
    core = np._core if hasattr(np, "_core") else np.core          # numpy 2.x; numpy.core warns there
    scalar = core.multiarray.scalar
    numeric = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
    return [argparse.Namespace, np.dtype, *sorted(numeric, key=str), (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]


# the weights-only unpickler's refusals of an object it may not build (torch 2.4 - 2.14): the file is a checkpoint
REFUSED = ("Unsupported global", "Can only build", "Can only create new object", "Trying to call reduce", "is blocked")


def read_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint cannot run code. What DINO's and SimDINO's full
    training checkpoints hold beyond tensors (argparse.Namespace, numpy scalars) is allowed: checkpoint_globals."""
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist: pass the path of a .pth file") from None
    except pickle.UnpicklingError as e:
        if not any(s in str(e) for s in REFUSED):   # not a pickle of allowed objects: not a checkpoint at all
            raise CheckpointError(f"checkpoint '{path}' could not be read (UnpicklingError): is it a PyTorch .pth "
                                  f"file?") from None
        raise CheckpointError(f"checkpoint '{path}' holds Python objects beyond tensors, which are not loaded: if you "
                              f"trust it, torch.load(path, weights_only=False) it yourself and pass the dict") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(e).__name__}): is it a PyTorch .pth "
                              f"file?") from None


def load_checkpoint(model, checkpoint, which="teacher"):
    """Load a checkpoint (path or loaded dict, any supported layout) into `model`."""
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    return load_state_dict(model, backbone_state_dict(ckpt, which))


def released_interpolation(checkpoint, sd):
    """(interpolate_offset, interpolate_antialias) the checkpoint's own code used, by its layout:
    this project's checkpoints store theirs in `args` (older ones, without the keys, resized by size: offset 0);
    a backbone with register tokens is a DINOv2 register model or SimDINOv2: (0, True); anything else is
    DINO, SimDINO or an original DINOv2 model: (0.1, False)."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, dict):        # this project writes a plain dict; DINO / SimDINO an argparse.Namespace
        return (float(args.get("interpolate_offset", 0.0)),
                bool(args.get("interpolate_antialias", args.get("pos_embed_antialias", False))))
    return (0.0, True) if "register_tokens" in sd else (0.1, False)


def vit_from_checkpoint(checkpoint, which="teacher", interpolate_offset=None, interpolate_antialias=None, **kwargs):
    """Build the ViT a checkpoint holds, its architecture read off the weights, and load it.

    The position-embedding interpolation is the checkpoint's own (released_interpolation) unless
    interpolate_offset / interpolate_antialias are given. kwargs are passed to the model.
    """
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    sd = backbone_state_dict(ckpt, which)
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    if any(k not in sd for k in needed):
        raise CheckpointError(f"checkpoint holds no ViT backbone (no {', '.join(k for k in needed if k not in sd)}): "
                              f"pass a DINO / DINOv2 / SimDINO / SimDINOv2 or this project's checkpoint")
    offset, antialias = released_interpolation(ckpt, sd)
    kwargs["interpolate_offset"] = offset if interpolate_offset is None else interpolate_offset
    kwargs["interpolate_antialias"] = antialias if interpolate_antialias is None else interpolate_antialias
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    arch = next((a for a, (d, L, _) in ARCHS.items() if d == dim and L == depth), None)
    if arch is None:
        raise CheckpointError(f"checkpoint has width {dim} and depth {depth}, which is none of {', '.join(ARCHS)}")
    ls = sd.get("blocks.0.ls1.gamma")
    model = build_vit(arch, img_size=grid * patch, patch_size=patch,
                      num_register_tokens=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
                      layerscale=1.0 if ls is not None else None, **kwargs)
    return load_state_dict(model, sd)
